"""The settings of one evaluation (spec sections 3-4; frontier spec 2), validated once, defaults resolved.

The knobs, their defaults, ranges and choices are declared once, in :mod:`pgttt.api.settings`. ``None``
means "what the checkpoint, its record or the device implies"; ``resolved()`` fills those in so a result
records what ran, and for the phased protocol names the record whose as-run values it took
(``record_defaults``) and which knobs came from there (``defaults_filled``).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
from dataclasses import dataclass, fields
from typing import Any

import torch

from pgttt.api.settings import PHASED_KNOBS, EvalSettings, knobs
from pgttt.checkpoints.config import ModelConfig

from .errors import EvalError
from .record_defaults import RECORD_TTT_DEFAULTS, record_for

# Read by the phased protocol only: unset (None) under the others.
_PHASED_ONLY: tuple[str, ...] = (*PHASED_KNOBS, "record_defaults", "max_docs")


@dataclass(frozen=True)
class EvalConfig(EvalSettings):
    """The declared settings (``pgttt.api.settings``), checked against their declared ranges and choices and
    against each other, and resolved for a model and device."""

    defaults_filled: tuple[str, ...] = ()  # set by resolved(): the knobs taken from record_defaults

    def __post_init__(self) -> None:
        # Lists from JSON or argparse become tuples so the config stays hashable and frozen.
        for name in (*(k.name for k in knobs(type(self)) if k.kind is tuple), "defaults_filled"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
        self.validate()

    def validate(self) -> None:
        def need(ok: bool, key: str, why: str) -> None:
            if not ok:
                value = getattr(self, key)
                raise EvalError(f"{key}={value!r}: {why}", field=key, value=value)

        for knob in knobs(type(self)):  # a subclass's extra knobs too
            why = knob.problem(getattr(self, knob.name))
            need(why is None, knob.name, why or "")
        # The records a phased run may take its knobs from are the engine's (ttt/record_defaults.py).
        need(
            self.record_defaults is None or self.record_defaults in RECORD_TTT_DEFAULTS,
            "record_defaults",
            f"expected one of {', '.join(RECORD_TTT_DEFAULTS)} (or none: the checkpoint's preset)",
        )
        need(
            isinstance(self.defaults_filled, tuple) and set(self.defaults_filled) <= set(PHASED_KNOBS),
            "defaults_filled",
            "must list phased knobs",
        )
        if self.seq_len is not None and self.protocol == "chunked":  # the other protocols have no stride
            need(self.stride <= self.seq_len, "stride", f"must not exceed seq_len={self.seq_len}")
        if self.protocol != "phased":
            for key in _PHASED_ONLY:
                need(getattr(self, key) is None, key, f"only the phased protocol reads it (protocol={self.protocol!r})")
        if self.ttt_chunk_size is not None and self.ttt_eval_seq_len is not None:
            need(
                self.ttt_chunk_size <= self.ttt_eval_seq_len,
                "ttt_chunk_size",
                f"must not exceed ttt_eval_seq_len={self.ttt_eval_seq_len}: a chunk is scored in one window",
            )

    # ---- resolution and serialisation ---------------------------------------------------------
    def resolved(
        self, model_config: ModelConfig, device: torch.device | str, *, preset: str | None = None
    ) -> EvalConfig:
        """Every ``None`` filled in for this model and device, and checked against them. ``preset``: the
        checkpoint's preset name, whose record's as-run values the phased protocol takes (spec 1b)."""
        cuda = torch.device(device).type == "cuda"
        seq_len = model_config.train_seq_len if self.seq_len is None else self.seq_len
        if self.stride > seq_len and self.protocol == "chunked":
            raise EvalError(
                f"stride={self.stride}: must not exceed seq_len={seq_len} (the checkpoint's train_seq_len)",
                field="stride",
                value=self.stride,
            )
        config = dataclasses.replace(
            self,
            seq_len=seq_len,
            precision=self.precision or ("bf16" if cuda else "fp32"),
            compile=cuda if self.compile is None else self.compile,
        )
        return config._resolved_phased(preset) if self.protocol == "phased" else config

    def _resolved_phased(self, preset: str | None) -> EvalConfig:
        """Unset phased knobs from the record's row (``record_defaults``, else the preset's record)."""
        record = self.record_defaults or record_for(preset)[0]
        row = RECORD_TTT_DEFAULTS[record]
        filled = tuple(k for k in PHASED_KNOBS if getattr(self, k) is None)
        values = {k: row[k] for k in filled}
        rank = values.get("ttt_lora_rank", self.ttt_lora_rank)
        assert rank is not None  # given, or filled from the row
        if values.get("ttt_lora_alpha", self.ttt_lora_alpha) is None:
            values["ttt_lora_alpha"] = float(rank)  # the record has no alpha: scale alpha / rank = 1
        # Re-resolving a resolved config changes nothing and keeps its provenance.
        filled = tuple(k for k in PHASED_KNOBS if k in filled or k in self.defaults_filled)
        config = dataclasses.replace(self, record_defaults=record, defaults_filled=filled, **values)
        assert config.seq_len is not None and config.global_ttt_chunk_tokens is not None  # given, or from the row
        trains = bool(config.phased_ttt_prefix_docs and config.global_ttt_epochs)
        if trains and config.global_ttt_chunk_tokens < config.seq_len:
            raise EvalError(
                f"global_ttt_chunk_tokens={config.global_ttt_chunk_tokens}: must be at least seq_len={config.seq_len} "
                "(global SGD trains on whole seq_len sequences of each chunk; a shorter chunk trains on none)",
                field="global_ttt_chunk_tokens",
                value=config.global_ttt_chunk_tokens,
            )
        return config

    @property
    def lora_scale(self) -> float:
        """The adapters' output scale alpha / rank (resolved configs)."""
        assert self.ttt_lora_rank is not None
        return 1.0 if self.ttt_lora_alpha is None else self.ttt_lora_alpha / self.ttt_lora_rank

    def lr_at(self, chunk: int, num_chunks: int) -> float:
        """The learning rate for training on chunk ``chunk`` (spec section 4's cosine, or constant)."""
        if self.lr_schedule == "constant":
            return self.ttt_lr
        return self.ttt_lr * 0.5 * (1.0 + math.cos(math.pi * chunk / max(num_chunks - 1, 1)))

    def adapted(self, names: list[str]) -> list[str]:
        """Parameter names that TTT updates: matching an include pattern (or all), none of the excludes."""
        for key in ("adapt_include", "adapt_exclude"):
            for pattern in getattr(self, key):
                if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
                    raise EvalError(
                        f"{key}: pattern {pattern!r} matches no parameter (names look like {names[0]!r})",
                        field=key,
                        value=pattern,
                    )

        def matches(name: str, patterns: tuple[str, ...]) -> bool:
            return any(fnmatch.fnmatchcase(name, p) for p in patterns)

        included = [n for n in names if not self.adapt_include or matches(n, self.adapt_include)]
        return [n for n in included if not matches(n, self.adapt_exclude)]

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["adapt_include"], data["adapt_exclude"] = list(self.adapt_include), list(self.adapt_exclude)
        data["defaults_filled"] = list(self.defaults_filled)
        if self.protocol != "phased":  # what ran: the phased knobs are unset and unread
            for key in (*PHASED_KNOBS, "record_defaults", "max_docs", "emulate_ranks", "defaults_filled"):
                del data[key]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, where: str = "eval config") -> EvalConfig:
        if not isinstance(data, dict):
            raise EvalError(f"{where}: expected a mapping of evaluation settings, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise EvalError(
                f"{where}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}",
                field=unknown[0],
                value=data[unknown[0]],
            )
        return cls(**data)
