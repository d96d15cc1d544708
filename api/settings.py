"""Every evaluation knob, declared once: its type, default, range, choices and help (torch-free).

``EvalSettings`` is the declaration; the engine's ``EvalConfig`` extends it, and every other view is derived
from it by a function that takes the declaration as an argument (``pgttt eval``'s flags, the HTTP request
model, the sweep spec's types, the report's columns), so a knob added here appears in all of them.
Names follow the challenge's (``ttt_epochs``, ``chunk_tokens`` ...); the phased protocol's knobs are the
frontier records' environment variables in lower case (``ttt_lora_rank`` ...). ``None`` means "what the
checkpoint, its record or the device implies" (``unset`` says which); the engine resolves it.
"""

from __future__ import annotations

import functools
import math
import typing
from dataclasses import dataclass, field, fields
from typing import Any

# "chunked": sliding windows, with score-first chunked TTT unless ttt_epochs is 0 (spec sections 3-4).
# "doc_masked": the frontier records' diagnostic eval_val, no TTT (frontier spec 2.12, ttt/doc_masked.py).
# "phased": per-document LoRA TTT with global-SGD phases (frontier spec 2, ttt/phased.py); ``seq_len`` is
# then the records' EVAL_SEQ_LEN (the stream's cut, the global-SGD rows).
PROTOCOLS: tuple[str, ...] = ("chunked", "doc_masked", "phased")
LR_SCHEDULES: tuple[str, ...] = ("cosine", "constant")
OPTIMIZERS: tuple[str, ...] = ("sgd", "adamw")
LORA_OPTIMIZERS: tuple[str, ...] = ("adam", "sgd")  # the records' TTT_OPTIMIZER: adam is AdamW
PRECISIONS: tuple[str, ...] = ("bf16", "fp32")
MAX_SEQ_LEN = 65_536
MAX_EPOCHS = 100
MAX_BATCH_SEQS = 4096
MAX_LR = 10.0
MAX_EMULATED_RANKS = 1024
MAX_COUNT = 2**40  # tokens, documents, chunks: far above any val set, far below overflow

# Groups: what a knob is about. "record": a phased knob that the checkpoint's record fills when unset.
GROUPS: dict[str, str] = {
    "common": "every protocol",
    "chunked": "the chunked protocol: sliding windows, score-first TTT",
    "doc_masked": "the doc_masked protocol",
    "phased": "the phased protocol: how its knobs are chosen",
    "record": "the phased protocol's knobs (unset: the checkpoint's record's value)",
}
_META = "pgttt.knob"


@dataclass(frozen=True)
class Knob:
    """One knob as the views read it. ``kind`` is int, float, str, bool or tuple (of strings)."""

    name: str
    kind: type
    optional: bool  # None is allowed (and means ``unset``)
    default: Any
    help: str
    group: str
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    choices: tuple[str, ...] | None = None
    unset: str | None = None  # what None (or an empty list) means
    request: bool = True  # an HTTP request may set it (compile is the server's to choose)

    def default_text(self) -> str:
        if self.default is None or self.default == ():
            return f"default: {self.unset}" if self.unset else ""
        return f"default {self.default}"

    def range_text(self) -> str:
        """The declared range in interval notation ("in [0, 100]", "in (0.0, inf)"), or ""."""
        low, high = (self.ge if self.ge is not None else self.gt), (self.le if self.le is not None else self.lt)
        if low is None and high is None:
            return ""
        opening, closing = "(" if self.ge is None else "[", ")" if self.le is None else "]"
        return f"in {opening}{'-inf' if low is None else low}, {'inf' if high is None else high}{closing}"

    def problem(self, value: Any) -> str | None:
        """Why ``value`` is not a valid setting of this knob, or None."""
        if value is None and self.optional:
            return None
        if self.kind is bool:
            return None if isinstance(value, bool) else "must be true or false" + self._or_none()
        if self.kind is tuple:
            if not isinstance(value, tuple):
                return "must be a list of patterns"
            return None if all(isinstance(v, str) and v for v in value) else "patterns must be non-empty strings"
        if self.kind is str:
            if self.choices is not None:
                return None if value in self.choices else f"expected one of {', '.join(self.choices)}" + self._or_none()
            return None if isinstance(value, str) else "must be a string"
        if self.kind is int and not (isinstance(value, int) and not isinstance(value, bool)):
            return "must be an integer"
        if self.kind is float:
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                return "must be a number"
            if not math.isfinite(value):
                return "must be finite"
        return self._range_problem(value)

    def _range_problem(self, value: float) -> str | None:
        if self.gt is not None and not value > self.gt:
            return "must be positive" if self.gt == 0 else f"must exceed {self.gt}"
        low = self.ge if self.ge is not None else self.gt
        high = self.le if self.le is not None else self.lt
        if (
            (self.ge is not None and value < self.ge)
            or (self.le is not None and value > self.le)
            or (self.lt is not None and value >= self.lt)
        ):
            if high is None:
                return f"must be at least {low}"
            return f"must be within {low}..{high}" + (" (exclusive)" if self.lt is not None else "")
        return None

    def _or_none(self) -> str:
        return f" (or none: {self.unset})" if self.optional and self.unset else ""


def knob(
    default: Any,
    help: str,
    *,
    group: str = "chunked",
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    choices: tuple[str, ...] | None = None,
    unset: str | None = None,
    request: bool = True,
) -> Any:
    """A field of a settings class with its declaration (the dataclass field's metadata)."""
    assert group in GROUPS, group
    meta = dict(help=help, group=group, ge=ge, gt=gt, le=le, lt=lt, choices=choices, unset=unset, request=request)
    return field(default=default, metadata={_META: meta})


_RECORD = "the checkpoint's record's value"


@dataclass(frozen=True)
class EvalSettings:
    """The settings of one evaluation (spec sections 3-4; frontier spec 2)."""

    protocol: str = knob(
        "chunked",
        "chunked: sliding windows / score-first TTT; doc_masked: the frontier records' "
        "diagnostic eval_val (document-masked packed rows, no TTT; some targets never scored); "
        "phased: per-document LoRA TTT with global-SGD phases (the 04-10 ... 04-29 records)",
        group="common",
        choices=PROTOCOLS,
    )
    seq_len: int | None = knob(
        None,
        "window length (phased: the records' EVAL_SEQ_LEN)",
        group="common",
        ge=1,
        le=MAX_SEQ_LEN,
        unset="the checkpoint's train_seq_len",
    )
    stride: int = knob(64, "sliding-window stride", ge=1, le=MAX_SEQ_LEN)
    ttt_epochs: int = knob(3, "TTT epochs per chunk; 0: sliding-window evaluation", ge=0, le=MAX_EPOCHS)
    chunk_tokens: int = knob(32_768, "tokens per score-then-train chunk", ge=1, le=MAX_COUNT)
    ttt_lr: float = knob(0.005, "peak TTT learning rate (decayed over chunks by lr_schedule)", ge=0.0, le=MAX_LR)
    ttt_momentum: float = knob(0.9, "SGD momentum, or AdamW's beta1", ge=0.0, lt=1.0)
    batch_seqs: int = knob(32, "windows per scoring batch and sequences per training batch", ge=1, le=MAX_BATCH_SEQS)
    grad_clip: float = knob(1.0, "clip each TTT step's gradient norm to this", gt=0.0)
    lr_schedule: str = knob("cosine", "learning rate over chunks", choices=LR_SCHEDULES)
    optimizer: str = knob("sgd", "TTT optimizer", choices=OPTIMIZERS)
    adapt_include: tuple[str, ...] = knob(
        (), "adapt only parameters matching these fnmatch patterns", unset="every parameter"
    )
    adapt_exclude: tuple[str, ...] = knob((), "freeze parameters matching these fnmatch patterns", unset="none")
    max_tokens: int | None = knob(
        None,
        "score only the first max_tokens targets of the trimmed val stream",
        group="common",
        ge=1,
        le=MAX_COUNT,
        unset="all of them",
    )
    precision: str | None = knob(
        None, "the model's compute precision", group="common", choices=PRECISIONS, unset="bf16 on CUDA, fp32 elsewhere"
    )
    seed: int = knob(
        0, "random seed; the phased protocol's SEED: LoRA A draws, val_doc_fraction", group="common", ge=0, le=2**63 - 1
    )
    compile: bool | None = knob(None, "torch.compile the model", group="common", unset="on for CUDA", request=False)
    # The records' VAL_BATCH_TOKENS (their default), split over 8 = ranks x grad-accumulation steps, so a
    # packed row holds val_batch_tokens // 8 // seq_len sequences (32 of 2048 tokens here).
    val_batch_tokens: int = knob(524_288, "the records' VAL_BATCH_TOKENS", group="doc_masked", ge=1, le=MAX_COUNT)
    # ---- the phased protocol (frontier spec 2); None: the record's as-run value (ttt/record_defaults.py)
    record_defaults: str | None = knob(
        None,
        "the record (e.g. pr1855) whose as-run values fill unset knobs",
        group="phased",
        unset="the checkpoint's preset's record",
    )
    ttt_lora_rank: int | None = knob(None, "TTT_LORA_RANK", group="record", ge=1, le=4096, unset=_RECORD)
    ttt_lora_lr: float | None = knob(None, "TTT_LORA_LR", group="record", ge=0.0, le=MAX_LR, unset=_RECORD)
    ttt_lora_alpha: float | None = knob(
        None,
        "TTT_LORA_ALPHA: adapters scale by alpha / rank (a record without alpha gets rank)",
        group="record",
        gt=0.0,
        unset=_RECORD,
    )
    ttt_warm_start_a: bool | None = knob(
        None,
        "TTT_WARM_START_A: keep A between batches of a slot (else re-drawn per batch)",
        group="record",
        unset=_RECORD,
    )
    ttt_chunk_size: int | None = knob(
        None, "TTT_CHUNK_SIZE: target tokens per LoRA chunk", group="record", ge=1, le=MAX_SEQ_LEN, unset=_RECORD
    )
    ttt_eval_seq_len: int | None = knob(
        None, "TTT_EVAL_SEQ_LEN: the longest scoring window", group="record", ge=1, le=MAX_SEQ_LEN, unset=_RECORD
    )
    ttt_batch_size: int | None = knob(
        None, "TTT_BATCH_SIZE: documents per LoRA batch", group="record", ge=1, le=MAX_BATCH_SEQS, unset=_RECORD
    )
    ttt_grad_steps: int | None = knob(None, "TTT_GRAD_STEPS", group="record", ge=1, le=MAX_EPOCHS, unset=_RECORD)
    ttt_optimizer: str | None = knob(
        None,
        "TTT_OPTIMIZER: adam (AdamW, decoupled weight decay) or sgd (momentum beta1, L2 decay)",
        group="record",
        choices=LORA_OPTIMIZERS,
        unset=_RECORD,
    )
    ttt_beta1: float | None = knob(None, "TTT_BETA1", group="record", ge=0.0, lt=1.0, unset=_RECORD)
    ttt_beta2: float | None = knob(None, "TTT_BETA2", group="record", ge=0.0, lt=1.0, unset=_RECORD)
    ttt_eps: float | None = knob(None, "TTT_EPS", group="record", gt=0.0, unset=_RECORD)
    ttt_weight_decay: float | None = knob(None, "TTT_WEIGHT_DECAY", group="record", ge=0.0, le=1e6, unset=_RECORD)
    ttt_k_lora: bool | None = knob(None, "TTT_K_LORA", group="record", unset=_RECORD)
    ttt_mlp_lora: bool | None = knob(None, "TTT_MLP_LORA", group="record", unset=_RECORD)
    ttt_o_lora: bool | None = knob(None, "TTT_O_LORA", group="record", unset=_RECORD)
    phased_ttt_prefix_docs: int | None = knob(
        None,
        "PHASED_TTT_PREFIX_DOCS: documents the global phases train on (0: LoRA TTT only)",
        group="record",
        ge=0,
        le=MAX_COUNT,
        unset=_RECORD,
    )
    phased_ttt_num_phases: int | None = knob(
        None, "PHASED_TTT_NUM_PHASES", group="record", ge=1, le=1000, unset=_RECORD
    )
    global_ttt_lr: float | None = knob(None, "GLOBAL_TTT_LR", group="record", ge=0.0, le=MAX_LR, unset=_RECORD)
    global_ttt_momentum: float | None = knob(None, "GLOBAL_TTT_MOMENTUM", group="record", ge=0.0, lt=1.0, unset=_RECORD)
    global_ttt_epochs: int | None = knob(None, "GLOBAL_TTT_EPOCHS", group="record", ge=0, le=MAX_EPOCHS, unset=_RECORD)
    global_ttt_chunk_tokens: int | None = knob(
        None, "GLOBAL_TTT_CHUNK_TOKENS", group="record", ge=1, le=MAX_COUNT, unset=_RECORD
    )
    global_ttt_batch_seqs: int | None = knob(
        None, "GLOBAL_TTT_BATCH_SEQS", group="record", ge=1, le=MAX_BATCH_SEQS, unset=_RECORD
    )
    global_ttt_grad_clip: float | None = knob(
        None, "GLOBAL_TTT_GRAD_CLIP (0: no clipping)", group="record", ge=0.0, unset=_RECORD
    )
    global_ttt_warmup_start_lr: float | None = knob(
        None, "GLOBAL_TTT_WARMUP_START_LR", group="record", ge=0.0, le=MAX_LR, unset=_RECORD
    )
    global_ttt_warmup_chunks: int | None = knob(
        None, "GLOBAL_TTT_WARMUP_CHUNKS", group="record", ge=0, le=MAX_COUNT, unset=_RECORD
    )
    global_ttt_respect_doc_boundaries: bool | None = knob(
        None, "GLOBAL_TTT_RESPECT_DOC_BOUNDARIES", group="record", unset=_RECORD
    )
    val_doc_fraction: float | None = knob(
        None,
        "VAL_DOC_FRACTION: < 1, the record's seeded random share of the documents",
        group="record",
        gt=0.0,
        le=1.0,
        unset=_RECORD,
    )
    max_docs: int | None = knob(
        None,
        "only the stream's first max_docs documents (before val_doc_fraction)",
        group="phased",
        ge=1,
        le=MAX_COUNT,
        unset="all of them",
    )
    # The schedule of phase pauses and the global-SGD packing of this many ranks of the reference (spec
    # 2.11): 8, as every record ran; 1, as one GPU runs it. Independent of the GPUs this job runs on.
    emulate_ranks: int = knob(
        8,
        "the schedule and packing of this many reference ranks (8, as the records ran; 1: one GPU's)",
        group="phased",
        ge=1,
        le=MAX_EMULATED_RANKS,
    )


def _kind(hint: Any) -> tuple[type, bool]:
    args = typing.get_args(hint)
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), hint) if optional else hint
    origin = typing.get_origin(base) or base
    return origin, optional


def knobs(settings: type = EvalSettings) -> tuple[Knob, ...]:
    """The declared knobs of a settings class, in declaration order."""
    return _knobs(settings)


# Cached behind a plain function: mypy takes a frozen dataclass's class (``type(config)``) for an unhashable
# argument of a functools.cache function.
@functools.cache
def _knobs(settings: type) -> tuple[Knob, ...]:
    hints = typing.get_type_hints(settings)
    out = []
    for f in fields(settings):
        if _META in f.metadata:
            kind, optional = _kind(hints[f.name])
            out.append(Knob(name=f.name, kind=kind, optional=optional, default=f.default, **f.metadata[_META]))
    return tuple(out)


def request_knobs(settings: type = EvalSettings) -> tuple[Knob, ...]:
    """The knobs an HTTP request (and so a sweep point) may set."""
    return tuple(k for k in knobs(settings) if k.request)


KNOBS: dict[str, Knob] = {k.name: k for k in knobs()}
# The phased protocol's knobs (frontier spec 1b, 2): None until resolved from the record's row.
PHASED_KNOBS: tuple[str, ...] = tuple(k.name for k in KNOBS.values() if k.group == "record")
