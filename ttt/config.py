"""The settings of one evaluation (spec sections 3-4), validated once, with every default resolved.

Names follow the challenge's (``ttt_epochs``, ``chunk_tokens``, ``ttt_lr`` ...). ``None`` means "what
the checkpoint or the device implies"; ``resolved()`` fills those in so a result records what ran.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
from dataclasses import dataclass, fields
from typing import Any

import torch

from pgttt.checkpoints.config import ModelConfig
from pgttt.checkpoints.model import PRECISIONS

from .errors import EvalError

# "chunked": sliding windows, with score-first chunked TTT unless ttt_epochs is 0 (spec sections 3-4).
# "doc_masked": the frontier records' diagnostic eval_val, no TTT (frontier spec 2.12, ttt/doc_masked.py).
PROTOCOLS: tuple[str, ...] = ("chunked", "doc_masked")
LR_SCHEDULES: tuple[str, ...] = ("cosine", "constant")
OPTIMIZERS: tuple[str, ...] = ("sgd", "adamw")
MAX_SEQ_LEN = 65_536
MAX_EPOCHS = 100
MAX_BATCH_SEQS = 4096
MAX_LR = 10.0


@dataclass(frozen=True)
class EvalConfig:
    protocol: str = "chunked"  # one of PROTOCOLS
    seq_len: int | None = None  # None: the checkpoint's train_seq_len
    stride: int = 64
    ttt_epochs: int = 3  # 0: plain sliding-window evaluation
    chunk_tokens: int = 32_768
    ttt_lr: float = 0.005
    ttt_momentum: float = 0.9
    batch_seqs: int = 32  # windows per scoring batch and sequences per training batch
    grad_clip: float = 1.0
    lr_schedule: str = "cosine"
    optimizer: str = "sgd"
    adapt_include: tuple[str, ...] = ()  # fnmatch patterns on parameter names; empty: every parameter
    adapt_exclude: tuple[str, ...] = ()
    max_tokens: int | None = None  # evaluate only the first max_tokens targets of the trimmed stream
    precision: str | None = None  # None: bf16 on CUDA, fp32 elsewhere
    seed: int = 0
    compile: bool | None = None  # None: on for CUDA
    # doc_masked only: the records' VAL_BATCH_TOKENS (their default), split over 8 = ranks x grad-accumulation
    # steps, so a packed row holds val_batch_tokens // 8 // seq_len sequences (32 of 2048 tokens here).
    val_batch_tokens: int = 524_288

    def __post_init__(self) -> None:
        # Lists from JSON or argparse become tuples so the config stays hashable and frozen.
        for name in ("adapt_include", "adapt_exclude"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
        self.validate()

    def validate(self) -> None:
        def need(ok: bool, key: str, why: str) -> None:
            if not ok:
                raise EvalError(f"{key}={getattr(self, key)!r}: {why}")

        def integer(key: str, low: int, high: int, optional: bool = False) -> None:
            value = getattr(self, key)
            if optional and value is None:
                return
            need(isinstance(value, int) and not isinstance(value, bool), key, "must be an integer")
            need(low <= value <= high, key, f"must be within {low}..{high}")

        def number(key: str, low: float, high: float, high_open: bool = False) -> None:
            value = getattr(self, key)
            need(isinstance(value, (int, float)) and not isinstance(value, bool), key, "must be a number")
            need(math.isfinite(value), key, "must be finite")
            need(low <= value and (value < high if high_open else value <= high), key,
                 f"must be within {low}..{high}" + (" (exclusive)" if high_open else ""))

        need(self.protocol in PROTOCOLS, "protocol", f"expected one of {', '.join(PROTOCOLS)}")
        integer("seq_len", 1, MAX_SEQ_LEN, optional=True)
        integer("stride", 1, MAX_SEQ_LEN)
        if self.seq_len is not None and self.protocol == "chunked":  # the other protocols have no stride
            need(self.stride <= self.seq_len, "stride", f"must not exceed seq_len={self.seq_len}")
        integer("ttt_epochs", 0, MAX_EPOCHS)
        integer("chunk_tokens", 1, 2**40)
        number("ttt_lr", 0.0, MAX_LR)
        number("ttt_momentum", 0.0, 1.0, high_open=True)
        integer("batch_seqs", 1, MAX_BATCH_SEQS)
        number("grad_clip", 0.0, math.inf)
        need(self.grad_clip > 0, "grad_clip", "must be positive")
        need(self.lr_schedule in LR_SCHEDULES, "lr_schedule", f"expected one of {', '.join(LR_SCHEDULES)}")
        need(self.optimizer in OPTIMIZERS, "optimizer", f"expected one of {', '.join(OPTIMIZERS)}")
        for key in ("adapt_include", "adapt_exclude"):
            patterns = getattr(self, key)
            need(isinstance(patterns, tuple), key, "must be a list of patterns")
            need(all(isinstance(p, str) and p for p in patterns), key, "patterns must be non-empty strings")
        integer("max_tokens", 1, 2**40, optional=True)
        need(self.precision is None or self.precision in PRECISIONS, "precision",
             f"expected one of {', '.join(PRECISIONS)} (or none: bf16 on CUDA, fp32 elsewhere)")
        integer("seed", 0, 2**63 - 1)
        need(self.compile is None or isinstance(self.compile, bool), "compile", "must be true, false or none")
        integer("val_batch_tokens", 1, 2**40)

    # ---- resolution and serialisation ---------------------------------------------------------
    def resolved(self, model_config: ModelConfig, device: torch.device | str) -> EvalConfig:
        """Every ``None`` filled in for this model and device, and checked against them."""
        cuda = torch.device(device).type == "cuda"
        seq_len = model_config.train_seq_len if self.seq_len is None else self.seq_len
        if self.stride > seq_len and self.protocol == "chunked":
            raise EvalError(f"stride={self.stride}: must not exceed seq_len={seq_len} (the checkpoint's train_seq_len)")
        return dataclasses.replace(
            self,
            seq_len=seq_len,
            precision=self.precision or ("bf16" if cuda else "fp32"),
            compile=cuda if self.compile is None else self.compile,
        )

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
                    raise EvalError(f"{key}: pattern {pattern!r} matches no parameter (names look like {names[0]!r})")
        def matches(name: str, patterns: tuple[str, ...]) -> bool:
            return any(fnmatch.fnmatchcase(name, p) for p in patterns)

        included = [n for n in names if not self.adapt_include or matches(n, self.adapt_include)]
        return [n for n in included if not matches(n, self.adapt_exclude)]

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["adapt_include"], data["adapt_exclude"] = list(self.adapt_include), list(self.adapt_exclude)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, where: str = "eval config") -> EvalConfig:
        if not isinstance(data, dict):
            raise EvalError(f"{where}: expected a mapping of evaluation settings, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise EvalError(f"{where}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**data)
