"""Errors of the evaluation engine: bad evaluation settings or data, and a cancelled evaluation."""

from __future__ import annotations

from pgttt.errors import PgtttError


class EvalError(PgtttError, ValueError):
    """An evaluation that cannot run as asked (a setting, a tokenizer, a model/data mismatch)."""


class DataError(EvalError):
    """A token shard or val set that breaks the challenge's format (spec section 1)."""


class EvalCancelled(PgtttError):
    """The caller's cancel event was set; the evaluation stopped between two batches."""
