"""The settings of one evaluation (spec sections 3-4; frontier spec 2), validated once, defaults resolved.

Names follow the challenge's (``ttt_epochs``, ``chunk_tokens``, ``ttt_lr`` ...); the phased protocol's
knobs are the frontier records' environment variables in lower case (``ttt_lora_rank``, ...). ``None``
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

from pgttt.checkpoints.config import ModelConfig
from pgttt.checkpoints.model import PRECISIONS

from .errors import EvalError
from .record_defaults import RECORD_TTT_DEFAULTS, record_for

# "chunked": sliding windows, with score-first chunked TTT unless ttt_epochs is 0 (spec sections 3-4).
# "doc_masked": the frontier records' diagnostic eval_val, no TTT (frontier spec 2.12, ttt/doc_masked.py).
# "phased": per-document LoRA TTT with global-SGD phases (frontier spec 2, ttt/phased.py); ``seq_len`` is
# then the records' EVAL_SEQ_LEN (the stream's cut, the global-SGD rows).
PROTOCOLS: tuple[str, ...] = ("chunked", "doc_masked", "phased")
LR_SCHEDULES: tuple[str, ...] = ("cosine", "constant")
OPTIMIZERS: tuple[str, ...] = ("sgd", "adamw")
MAX_SEQ_LEN = 65_536
MAX_EPOCHS = 100
MAX_BATCH_SEQS = 4096
MAX_LR = 10.0
LORA_OPTIMIZERS: tuple[str, ...] = ("adam", "sgd")  # the records' TTT_OPTIMIZER: adam is AdamW
MAX_EMULATED_RANKS = 1024
# The phased protocol's knobs (frontier spec 1b, 2): None until resolved from the record's row.
PHASED_KNOBS: tuple[str, ...] = (
    "ttt_lora_rank", "ttt_lora_lr", "ttt_lora_alpha", "ttt_warm_start_a", "ttt_chunk_size", "ttt_eval_seq_len",
    "ttt_batch_size", "ttt_grad_steps", "ttt_optimizer", "ttt_beta1", "ttt_beta2", "ttt_eps", "ttt_weight_decay",
    "ttt_k_lora", "ttt_mlp_lora", "ttt_o_lora", "phased_ttt_prefix_docs", "phased_ttt_num_phases",
    "global_ttt_lr", "global_ttt_momentum", "global_ttt_epochs", "global_ttt_chunk_tokens", "global_ttt_batch_seqs",
    "global_ttt_grad_clip", "global_ttt_warmup_start_lr", "global_ttt_warmup_chunks",
    "global_ttt_respect_doc_boundaries", "val_doc_fraction",
)
# Every setting of the phased protocol a request or flag may give (the knobs and how they are chosen).
PHASED_SETTINGS: tuple[str, ...] = ("protocol", "record_defaults", *PHASED_KNOBS, "max_docs", "emulate_ranks")


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
    # ---- the phased protocol (frontier spec 2); None: the record's as-run value (record_defaults.py)
    record_defaults: str | None = None  # whose values fill unset knobs; None: the checkpoint's preset's record
    ttt_lora_rank: int | None = None
    ttt_lora_lr: float | None = None
    ttt_lora_alpha: float | None = None  # adapters scale by alpha / rank; resolved: a record without alpha gets rank
    ttt_warm_start_a: bool | None = None  # keep A between batches of a slot (else re-drawn per batch)
    ttt_chunk_size: int | None = None  # target tokens per chunk
    ttt_eval_seq_len: int | None = None  # the longest scoring window
    ttt_batch_size: int | None = None  # documents per batch
    ttt_grad_steps: int | None = None
    ttt_optimizer: str | None = None  # adam (AdamW, decoupled weight decay) or sgd (momentum beta1, L2 decay)
    ttt_beta1: float | None = None
    ttt_beta2: float | None = None
    ttt_eps: float | None = None
    ttt_weight_decay: float | None = None
    ttt_k_lora: bool | None = None
    ttt_mlp_lora: bool | None = None
    ttt_o_lora: bool | None = None
    phased_ttt_prefix_docs: int | None = None  # D: documents the phases train on (0: LoRA TTT only)
    phased_ttt_num_phases: int | None = None  # P
    global_ttt_lr: float | None = None
    global_ttt_momentum: float | None = None
    global_ttt_epochs: int | None = None
    global_ttt_chunk_tokens: int | None = None
    global_ttt_batch_seqs: int | None = None
    global_ttt_grad_clip: float | None = None  # 0: no clipping
    global_ttt_warmup_start_lr: float | None = None
    global_ttt_warmup_chunks: int | None = None
    global_ttt_respect_doc_boundaries: bool | None = None
    val_doc_fraction: float | None = None  # < 1: the record's seeded random subset of the documents
    max_docs: int | None = None  # only the stream's first max_docs documents (before val_doc_fraction)
    # The schedule of phase pauses and the global-SGD packing of this many ranks of the reference (spec
    # 2.11): 8, as every record ran; 1, as one GPU runs it. Independent of the GPUs this job runs on.
    emulate_ranks: int = 8
    defaults_filled: tuple[str, ...] = ()  # set by resolved(): the knobs taken from record_defaults

    def __post_init__(self) -> None:
        # Lists from JSON or argparse become tuples so the config stays hashable and frozen.
        for name in ("adapt_include", "adapt_exclude", "defaults_filled"):
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
        self._validate_phased(need, integer, number)

    def _validate_phased(self, need: Any, integer: Any, number: Any) -> None:
        def optional(key: str, check: Any, *args: Any) -> None:
            if getattr(self, key) is not None:
                check(key, *args)

        def flag(key: str) -> None:
            need(isinstance(getattr(self, key), bool), key, "must be true or false")

        def choice(key: str, options: tuple[str, ...]) -> None:
            need(getattr(self, key) in options, key, f"expected one of {', '.join(options)}")

        def positive(key: str) -> None:
            number(key, 0.0, math.inf)
            need(getattr(self, key) > 0, key, "must be positive")

        need(self.record_defaults is None or self.record_defaults in RECORD_TTT_DEFAULTS, "record_defaults",
             f"expected one of {', '.join(RECORD_TTT_DEFAULTS)} (or none: the checkpoint's preset)")
        for key, args in (("ttt_lora_rank", (1, 4096)), ("ttt_chunk_size", (1, MAX_SEQ_LEN)),
                          ("ttt_eval_seq_len", (1, MAX_SEQ_LEN)), ("ttt_batch_size", (1, MAX_BATCH_SEQS)),
                          ("ttt_grad_steps", (1, MAX_EPOCHS)), ("phased_ttt_prefix_docs", (0, 2**40)),
                          ("phased_ttt_num_phases", (1, 1000)), ("global_ttt_epochs", (0, MAX_EPOCHS)),
                          ("global_ttt_chunk_tokens", (1, 2**40)), ("global_ttt_batch_seqs", (1, MAX_BATCH_SEQS)),
                          ("global_ttt_warmup_chunks", (0, 2**40)), ("max_docs", (1, 2**40))):
            optional(key, integer, *args)
        for key in ("ttt_lora_lr", "global_ttt_lr", "global_ttt_warmup_start_lr"):
            optional(key, number, 0.0, MAX_LR)
        for key in ("ttt_beta1", "ttt_beta2", "global_ttt_momentum"):
            optional(key, number, 0.0, 1.0, True)
        for key in ("ttt_lora_alpha", "ttt_eps", "val_doc_fraction"):
            optional(key, positive)
        optional("val_doc_fraction", number, 0.0, 1.0)
        optional("ttt_weight_decay", number, 0.0, 1e6)
        optional("global_ttt_grad_clip", number, 0.0, math.inf)
        for key in ("ttt_warm_start_a", "ttt_k_lora", "ttt_mlp_lora", "ttt_o_lora",
                    "global_ttt_respect_doc_boundaries"):
            optional(key, flag)
        optional("ttt_optimizer", choice, LORA_OPTIMIZERS)
        integer("emulate_ranks", 1, MAX_EMULATED_RANKS)
        need(isinstance(self.defaults_filled, tuple) and set(self.defaults_filled) <= set(PHASED_KNOBS),
             "defaults_filled", "must list phased knobs")
        if self.protocol != "phased":
            for key in (*PHASED_KNOBS, "record_defaults", "max_docs"):
                need(getattr(self, key) is None, key, f"only the phased protocol reads it (protocol={self.protocol!r})")
        if self.ttt_chunk_size is not None and self.ttt_eval_seq_len is not None:
            need(self.ttt_chunk_size <= self.ttt_eval_seq_len, "ttt_chunk_size",
                 f"must not exceed ttt_eval_seq_len={self.ttt_eval_seq_len}: a chunk is scored in one window")

    # ---- resolution and serialisation ---------------------------------------------------------
    def resolved(self, model_config: ModelConfig, device: torch.device | str, *,
                 preset: str | None = None) -> EvalConfig:
        """Every ``None`` filled in for this model and device, and checked against them. ``preset``: the
        checkpoint's preset name, whose record's as-run values the phased protocol takes (spec 1b)."""
        cuda = torch.device(device).type == "cuda"
        seq_len = model_config.train_seq_len if self.seq_len is None else self.seq_len
        if self.stride > seq_len and self.protocol == "chunked":
            raise EvalError(f"stride={self.stride}: must not exceed seq_len={seq_len} (the checkpoint's train_seq_len)")
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
        if values.get("ttt_lora_alpha", self.ttt_lora_alpha) is None:
            values["ttt_lora_alpha"] = float(rank)  # the record has no alpha: scale alpha / rank = 1
        # Re-resolving a resolved config changes nothing and keeps its provenance.
        filled = tuple(k for k in PHASED_KNOBS if k in filled or k in self.defaults_filled)
        config = dataclasses.replace(self, record_defaults=record, defaults_filled=filled, **values)
        assert config.seq_len is not None
        trains = bool(config.phased_ttt_prefix_docs and config.global_ttt_epochs)
        if trains and config.global_ttt_chunk_tokens < config.seq_len:
            raise EvalError(
                f"global_ttt_chunk_tokens={config.global_ttt_chunk_tokens}: must be at least seq_len={config.seq_len} "
                "(global SGD trains on whole seq_len sequences of each chunk; a shorter chunk trains on none)"
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
                    raise EvalError(f"{key}: pattern {pattern!r} matches no parameter (names look like {names[0]!r})")
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
            raise EvalError(f"{where}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**data)
