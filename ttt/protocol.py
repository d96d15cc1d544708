"""What every evaluation protocol gives the session, and the result types they share.

A protocol is a module (``chunked``, ``phased``, ``doc_masked``) whose module-level object satisfies
``Protocol``: ``warm_up`` compiles what a configuration needs, ``run`` evaluates the val stream on a working
model in place, ``describe`` and ``warnings`` word its result. ``run`` is each protocol's own loop, written
like its spec: plan the units, score each with the current weights, then train on it, and finish by merging the
ranks' sums and checking the compliance record. The interface stops at ``run`` because the loops differ in
shape: chunked TTT scores then trains chunk by chunk; the phased protocol scores and trains each batch's
documents chunk step by chunk step, with phases of global SGD between batches; ``doc_masked`` only scores.
``EvalSession`` finds a protocol by ``EvalConfig.protocol`` (``session.PROTOCOLS``): a new protocol is a new
module and one entry there.
"""

from __future__ import annotations

import math
import typing
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pgttt.api.units import UnitSums
from pgttt.checkpoints.model import GPT

from .config import EvalConfig
from .data import ByteSource
from .distributed import World
from .errors import EvalError


class CancelEvent(typing.Protocol):
    def is_set(self) -> bool: ...


@dataclass(frozen=True)
class Progress:
    phase: str  # "scoring" or "training"
    chunk: int
    chunks_done: int
    num_chunks: int
    tokens_scored: int  # through finished chunks, plus this rank's batches of the current chunk
    tokens_total: int
    loss: float | None  # running values, as of the last finished chunk
    bpb: float | None
    elapsed_s: float
    # The phased protocol's (chunk/chunks count documents there): its documents, phases and an estimate.
    docs_done: int | None = None
    docs_total: int | None = None
    phases_done: int | None = None
    num_phases: int | None = None
    eta_s: float | None = None


ProgressFn = Callable[[Progress], None]


@dataclass
class ChunkTrace:
    index: int
    windows: int
    scored_tokens: int
    scored_bytes: int
    running_loss: float
    running_bpb: float | None
    lr: float | None  # None: not trained on (the last chunk, epochs 0, or shorter than seq_len)
    train_loss: list[float]  # mean training loss of each epoch
    scoring_s: float
    training_s: float


@dataclass
class ProtocolRun:
    """What a protocol's ``run`` returns: every rank's sums, its trace and its compliance record."""

    loss_sum: float
    tokens: int
    bytes: int
    chunks: list[ChunkTrace]
    compliance: dict[str, Any]
    scoring_s: float
    training_s: float
    units: UnitSums
    # The phased protocol's: its other timings (global_sgd_s), counts, phase schedule and per-batch trace.
    other_timings: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] | None = None
    schedule: dict[str, Any] | None = None
    batches: list[Any] = field(default_factory=list)

    @property
    def val_loss(self) -> float:
        return self.loss_sum / self.tokens

    @property
    def val_bpb(self) -> float:
        bpb = bits_per_byte(self.loss_sum, self.tokens, self.bytes)
        if bpb is None:
            raise EvalError(f"the {self.tokens} scored tokens stand for 0 bytes: bits per byte is undefined")
        return bpb


@dataclass(frozen=True)
class Compiled:
    """A working model's compiled twins, kept from one evaluation to the next (a graph serves every later one),
    each protocol's under keys of its own, and the session's choice of CUDA-graph replay for each protocol."""

    twins: dict[Hashable, Any]
    cuda_graphs: bool = True  # chunked TTT's static training graphs (chunked_compiled.Steps)
    phased_cuda_graphs: bool = False  # the phased chunk step (phased_compiled.PhasedStep): off until measured

    def twin(self, key: Hashable, make: Callable[[], Any]) -> Any:
        """The twin under ``key``, made by ``make`` the first time it is asked for."""
        if key not in self.twins:
            self.twins[key] = make()
        return self.twins[key]


class Protocol(typing.Protocol):
    """One evaluation protocol, as ``EvalSession`` runs it. ``config`` is always resolved (``EvalConfig.resolved``)."""

    name: str  # its EvalConfig.protocol
    # Whether SDPA on CUDA may take cuDNN's kernel (checkpoints.layers.cudnn_attention): for fixed shapes only.
    cudnn_attention: bool

    def warm_up(
        self,
        model: GPT,
        compiled: Compiled,
        config: EvalConfig,
        world: World,
        *,
        tokens: np.ndarray | None = None,
        static_training: bool = False,
        fallback: bool | None = None,
    ) -> None:
        """Compile what ``config`` needs on ``model`` (the shapes of ``tokens``' evaluation when given), so the
        evaluation itself never compiles; nothing when ``config.compile`` is off. ``static_training``: an
        explicit warm-up (``EvalSession.warmup``), which may compile graphs an evaluation would not.
        ``fallback``: a protocol's graph for shapes no warm-up saw, if it has one (chunked: training batches of
        any size): False leaves it to a later warm-up that passes True, and evaluations until then run those
        shapes uncompiled; None: as the last explicit warm-up chose."""
        ...

    def run(
        self,
        model: GPT,
        compiled: Compiled,
        tokens: np.ndarray,
        source: ByteSource,
        config: EvalConfig,
        world: World,
        progress: ProgressFn | None,
        cancel: CancelEvent | None,
    ) -> ProtocolRun:
        """The protocol on ``model`` in place over the trimmed val stream ``tokens`` (T + 1 ids), the bytes of its
        targets from ``source``; ``progress`` between batches; ``cancel`` checked there (``EvalCancelled``)."""
        ...

    def describe(self, config: dict[str, Any], compliance: dict[str, Any]) -> tuple[str, str]:
        """The summary line's words for what ran (the settings) and for its compliance record."""
        ...

    def warnings(self, config: EvalConfig, run: ProtocolRun) -> list[str]:
        """What a caller should know about this result (e.g. TTT settings that trained on nothing)."""
        ...


def bits_per_byte(loss_sum: float, tokens: int, nbytes: int) -> float | None:
    """Spec section 2: ``(loss_sum / tokens) / ln 2 * tokens / bytes``; None before any byte is scored."""
    if tokens <= 0 or nbytes <= 0:
        return None
    return loss_sum / tokens / math.log(2.0) * tokens / nbytes


def resolved_shape(config: EvalConfig) -> tuple[int, str]:
    """``seq_len`` and ``precision`` of a resolved config (``EvalConfig.resolved``)."""
    if config.seq_len is None or config.precision is None:
        raise ValueError("the engine needs a resolved EvalConfig (EvalConfig.resolved)")
    return config.seq_len, config.precision
