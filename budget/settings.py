"""The inputs of the budget oracle: a dataset family, a model's shape, and one protocol's knobs.

Names are the engine's (``ttt_epochs``, ``chunk_tokens`` ...) and, for the phased protocol, the records'
environment variables in lower case (``ttt_lora_rank`` ...), so an ``EvalConfig.to_dict()`` or a sweep
point reads straight in (:func:`settings_from_dict`). Plain Python: no torch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from typing import Any

from pgttt.api.settings import KNOBS, EvalSettings
from pgttt.errors import PgtttError


class BudgetError(PgtttError):
    """Settings the oracle cannot price: an unknown family or knob, a value out of range."""


@dataclass(frozen=True)
class ValFamily:
    """The full validation set of one tokenizer: targets as the records' logs print them (records.md 1.1)."""

    name: str
    targets: int  # val_tokens at eval seq_len 2048
    documents: int = 50_000
    vocab_size: int = 8192


FAMILIES: dict[str, ValFamily] = {
    "sp8192": ValFamily("sp8192", 40_540_160),
    "caseops": ValFamily("caseops", 47_851_520),
    "sp4096": ValFamily("sp4096", 45_508_608, vocab_size=4096),
    "sp1024": ValFamily("sp1024", 62_021_632, vocab_size=1024),
}


def family_for(dataset: str | None) -> ValFamily:
    """The family a dataset name points at (``fineweb10B_sp8192`` -> sp8192, ``..caseops..`` -> caseops);
    a name that says nothing gets sp8192, the pgttt preset's."""
    name = (dataset or "").lower()
    if name in FAMILIES:
        return FAMILIES[name]
    if "caseops" in name or "lossless_caps" in name:
        return FAMILIES["caseops"]
    for key in ("sp1024", "sp4096", "sp8192"):
        if key in name:
            return FAMILIES[key]
    return FAMILIES["sp8192"]


@dataclass(frozen=True)
class ModelShape:
    """What sets the FLOPs of one token through the model: width, layer applications (loops count), vocab."""

    model_dim: int = 512
    num_layers: int = 11
    applications: int = 17  # pg-2026-04-09 and every phased record: layers 3-5 run three times
    mlp_mult: float = 4.0
    kv_dim: int = 256
    vocab_size: int = 8192

    def linear_flops(self) -> float:
        """Forward FLOPs per token of the matmuls, the tied output layer included."""
        d = self.model_dim
        per_layer = 2 * d * (2 * d + 2 * self.kv_dim + 2 * self.mlp_mult * d)
        return self.applications * per_layer + 2 * d * self.vocab_size

    def attention_flops(self, context: float) -> float:
        """Forward FLOPs per token of causal attention over ``context`` keys (QK^T and AV)."""
        return self.applications * 4 * context * self.model_dim

    @classmethod
    def from_model_config(cls, config: dict[str, Any]) -> ModelShape:
        """From a checkpoint's ModelConfig dict (the challenge's names); missing keys keep the preset's."""
        base = cls()
        layers = int(config.get("num_layers", base.num_layers))
        loops = int(config.get("num_loops", 0) or 0)
        start, end = int(config.get("loop_start", 0) or 0), int(config.get("loop_end", -1) or -1)
        looped = max(0, end - start + 1) * loops if loops else 0
        dim, heads = int(config.get("model_dim", base.model_dim)), int(config.get("num_heads", 8) or 8)
        kv_heads = int(config.get("num_kv_heads", heads // 2) or heads)
        return cls(
            model_dim=dim,
            num_layers=layers,
            applications=layers + looped,
            mlp_mult=float(config.get("mlp_mult", base.mlp_mult)),
            kv_dim=dim // heads * kv_heads,
            vocab_size=int(config.get("vocab_size", base.vocab_size)),
        )


@dataclass(frozen=True)
class ChunkedSettings:
    """Sliding windows + score-first whole-model SGD TTT (parameter-golf spec 3-4); ttt_epochs 0: sliding only.
    Defaults: the engine's (``pgttt.api.settings``); seq_len: every record's train_seq_len."""

    ttt_epochs: int = EvalSettings.ttt_epochs
    chunk_tokens: int = EvalSettings.chunk_tokens
    batch_seqs: int = EvalSettings.batch_seqs
    stride: int = EvalSettings.stride
    seq_len: int = 2048
    protocol: str = field(default="chunked", init=False)


@dataclass(frozen=True)
class PhasedSettings:
    """Per-document LoRA TTT with global-SGD phases (frontier spec 2). Defaults: the 1.0611 record's as-run
    values (pr1855), the ones ``ttt/record_defaults.py`` fills in for a checkpoint of no known record."""

    ttt_lora_rank: int = 80
    ttt_chunk_size: int = 48
    ttt_eval_seq_len: int = 2048
    ttt_batch_size: int = 64
    ttt_grad_steps: int = 1
    phased_ttt_prefix_docs: int = 2500
    phased_ttt_num_phases: int = 3
    global_ttt_epochs: int = 1
    global_ttt_chunk_tokens: int = 32_768
    global_ttt_batch_seqs: int = 32
    protocol: str = field(default="phased", init=False)


Settings = ChunkedSettings | PhasedSettings
# Within the engine's declared bounds, and no more documents than a val set has.
MAX_PREFIX_DOCS = ValFamily.documents


def make_settings(protocol: str, values: dict[str, Any]) -> Settings:
    """Settings of ``protocol`` from ``values`` (unknown keys are an error; None keeps the default)."""
    classes = {"chunked": ChunkedSettings, "phased": PhasedSettings}
    if protocol not in classes:
        raise BudgetError(
            f"protocol={protocol!r}: expected one of {', '.join(classes)}", field="protocol", value=protocol
        )
    cls = classes[protocol]
    known = {f.name for f in fields(cls) if f.init}
    unknown = sorted(set(values) - known)
    if unknown:
        raise BudgetError(
            f"{', '.join(unknown)}: not a knob of the {protocol} protocol (knobs: {', '.join(sorted(known))})",
            field=unknown[0],
            value=values[unknown[0]],
        )
    given = {k: v for k, v in values.items() if v is not None}
    for key, value in given.items():
        why = KNOBS[key].problem(value)
        if why is None and key == "phased_ttt_prefix_docs" and value > MAX_PREFIX_DOCS:
            why = f"must be within 0..{MAX_PREFIX_DOCS} (the documents of a val set)"
        if why is not None:
            raise BudgetError(f"{key}={value!r}: {why}", field=key, value=value)
    settings = cls(**given)
    if isinstance(settings, PhasedSettings) and settings.ttt_chunk_size > settings.ttt_eval_seq_len:
        raise BudgetError(
            f"ttt_chunk_size={settings.ttt_chunk_size}: must not exceed ttt_eval_seq_len={settings.ttt_eval_seq_len}",
            field="ttt_chunk_size",
            value=settings.ttt_chunk_size,
        )
    if isinstance(settings, ChunkedSettings) and settings.stride > settings.seq_len:
        raise BudgetError(
            f"stride={settings.stride}: must not exceed seq_len={settings.seq_len}",
            field="stride",
            value=settings.stride,
        )
    return settings


def settings_from_dict(config: dict[str, Any]) -> Settings:
    """Settings from an engine config or a request: ``protocol`` picks the family (default chunked); keys
    that do not change the reference's time (lr, seed, precision, max_tokens ...) are ignored."""
    protocol = config.get("protocol") or "chunked"
    cls = ChunkedSettings if protocol == "chunked" else PhasedSettings
    knobs = {f.name for f in fields(cls) if f.init}
    return make_settings(protocol, {k: v for k, v in config.items() if k in knobs})


def as_dict(settings: Settings) -> dict[str, Any]:
    return dataclasses.asdict(settings)
