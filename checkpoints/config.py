"""The architecture configuration of the Parameter Golf GPT family, its presets and overrides.

Keys are the challenge's own hyperparameter names in lower case (its environment variables), so
users can copy them from a training log: ``--set num_layers=9 --set mlp_mult=3``.
Longer than our usual 400 lines on purpose: ``ModelConfig`` declares every knob of both model families
with its check in one place, and each preset spells its fields out one per line.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, fields
from typing import Any

from pgttt.errors import PgtttError


class ConfigError(PgtttError, ValueError):
    """An architecture configuration that is unknown, malformed or impossible."""


FAMILIES: tuple[str, ...] = ("2026-04-09", "frontier")
PARALLEL_FINAL_LANES: tuple[str, ...] = ("mean", "mlp", "attn")
ATTN_OUT_GATE_SOURCES: tuple[str, ...] = ("proj", "q")
# Upper bounds that keep a hostile config cheap to check (building a model on the meta device costs
# ~2 ms per layer application); the records sit far inside them (11 layers, 512 wide, 17 applications).
MAX_LAYERS = 64
MAX_APPLICATIONS = 256
MAX_MODEL_DIM = 8192
MAX_HEADS = 256
MAX_MLP_HIDDEN = 65536
MAX_SEQ_LEN = 1 << 20
MAX_LOOPS = 16
# Layer-index knobs mean "none" or "all" beyond the layer range, as in the records' scripts.
MAX_LAYER_INDEX = 1 << 16


@dataclass(frozen=True)
class ModelConfig:
    # "2026-04-09": the 04-09 record's GPT (spec section 5). "frontier": the model code of the records
    # from 2026-04-10 (#1530) on, which always holds the two-lane decoder's scalars (spec section 3).
    family: str = "2026-04-09"
    vocab_size: int = 8192
    num_layers: int = 11
    model_dim: int = 512
    num_heads: int = 8
    num_kv_heads: int = 4
    mlp_mult: float = 4.0
    tie_embeddings: bool = True
    logit_softcap: float = 30.0
    rope_base: float = 10000.0
    # 0 or less: every head dim (the scripts' ``ROPE_DIMS=0``).
    rope_dims: int = 16
    # Scale RoPE's base for rows longer than train_seq_len (04-09 always; ROPE_YARN=0 in later records).
    rope_yarn: bool = True
    # Sequence length the model was trained at: RoPE's base is scaled beyond it, and it is the
    # default evaluation length (the challenge evaluates at its training length).
    train_seq_len: int = 2048
    ln_scale: bool = True
    qk_gain_init: float = 5.25
    num_loops: int = 2
    loop_start: int = 3
    loop_end: int = 5
    # 04-09 family: single-stream parallel residual for layers >= this (None in the frontier family).
    parallel_residual_start: int | None = 7
    # Frontier family: two-lane decoder for decoder layers >= this when it is > 0 (None in 04-09).
    parallel_start_layer: int | None = None
    parallel_final_lane: str | None = None
    # XSA on layers max(0, num_layers - xsa_last_n) .. num_layers - 1 (all of them beyond num_layers).
    xsa_last_n: int = 11
    skip_gates_enabled: bool = True
    # SmearGate (04-16) on the raw embeddings; with the BOS mask (04-27) never across a document start.
    smear_gate_enabled: bool = False
    smear_gate_bos_mask: bool = True
    # Width of the inputs of SmearGate and the windowed attention gates.
    gate_window: int = 12
    # Attention output gates, at most one: AttnOutGate (04-16), dense GatedAttn (04-19), sparse (04-23).
    attn_out_gate_enabled: bool = False
    attn_out_gate_src: str = "proj"
    gated_attn_enabled: bool = False
    sparse_attn_gate_enabled: bool = False
    sparse_attn_gate_scale: float = 1.0

    def __post_init__(self) -> None:
        self.validate()

    # ---- derived shapes -------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.model_dim // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        return int(self.mlp_mult * self.model_dim)

    @property
    def rotary_dims(self) -> int:
        """Dims of each head that RoPE rotates."""
        return self.rope_dims if 0 < self.rope_dims < self.head_dim else self.head_dim

    @property
    def frontier(self) -> bool:
        return self.family == "frontier"

    def layer_schedule(self) -> list[int]:
        """Physical block index of every block application, depth recurrence included (the scripts' formula,
        which for ``loop_end < loop_start`` repeats nothing and runs layers loop_end+1.. after 0..loop_start-1)."""
        if self.num_loops <= 0:
            return list(range(self.num_layers))
        segment = list(range(self.loop_start, self.loop_end + 1))
        return (
            list(range(self.loop_start))
            + segment * (self.num_loops + 1)
            + list(range(self.loop_end + 1, self.num_layers))
        )

    def encoder_decoder(self) -> tuple[list[int], list[int]]:
        """The schedule split into encoder (first half) and decoder (the rest)."""
        schedule = self.layer_schedule()
        half = len(schedule) // 2
        return schedule[:half], schedule[half:]

    @property
    def num_skip_weights(self) -> int:
        enc, dec = self.encoder_decoder()
        return min(len(enc), len(dec))

    def xsa_layers(self) -> range:
        return range(max(0, self.num_layers - self.xsa_last_n), self.num_layers) if self.xsa_last_n > 0 else range(0)

    @property
    def attn_gate(self) -> str | None:
        """The attention output gate: "attn_out", "dense", "sparse" or None."""
        for name, on in (
            ("attn_out", self.attn_out_gate_enabled),
            ("dense", self.gated_attn_enabled),
            ("sparse", self.sparse_attn_gate_enabled),
        ):
            if on:
                return name
        return None

    def num_parameters(self) -> int:
        d, kv = self.model_dim, self.num_kv_heads * self.head_dim
        per_block = 4 * d + self.num_heads + 2 * d * d + 2 * kv * d + 2 * self.mlp_hidden * d
        gate_in = {"attn_out": self.gate_window, "dense": d, "sparse": self.gate_window, None: 0}[self.attn_gate]
        per_block += self.num_heads * gate_in
        total = self.vocab_size * d + self.num_layers * per_block
        total += self.num_skip_weights * d * (2 if self.skip_gates_enabled else 1)
        if not self.tie_embeddings:
            total += self.vocab_size * d
        if self.smear_gate_enabled:
            total += self.gate_window + 1
        if self.frontier:
            total += self.num_layers * 6  # parallel_post_lambdas (L,2,2) and parallel_resid_lambdas (L,2)
        return total

    # ---- validation -----------------------------------------------------------------------
    def validate(self) -> None:
        def need(ok: bool, key: str, why: str) -> None:
            if not ok:
                raise ConfigError(f"{key}={getattr(self, key)!r}: {why}", field=key, value=getattr(self, key))

        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                need(_OPTIONAL[f.name], f.name, "must be set")
                continue
            problem = type_problem(value, _FIELD_TYPES[f.name])
            need(problem is None, f.name, problem or "")
            if _FIELD_TYPES[f.name] is float:
                need(math.isfinite(value), f.name, "must be a finite number")
        need(self.family in FAMILIES, "family", f"must be one of {', '.join(FAMILIES)}")
        need(2 <= self.vocab_size <= 65536, "vocab_size", "must be within 2..65536 (token shards store uint16 ids)")
        need(1 <= self.num_layers <= MAX_LAYERS, "num_layers", f"must be within 1..{MAX_LAYERS}")
        need(2 <= self.model_dim <= MAX_MODEL_DIM, "model_dim", f"must be within 2..{MAX_MODEL_DIM}")
        need(1 <= self.num_heads <= MAX_HEADS, "num_heads", f"must be within 1..{MAX_HEADS}")
        need(self.model_dim % self.num_heads == 0, "num_heads", f"must divide model_dim={self.model_dim}")
        need(self.num_kv_heads >= 1, "num_kv_heads", "must be at least 1")
        need(self.num_heads % self.num_kv_heads == 0, "num_kv_heads", f"must divide num_heads={self.num_heads}")
        need(self.head_dim % 2 == 0, "num_heads", f"head dim model_dim/num_heads={self.head_dim} must be even")
        need(
            1 <= self.mlp_hidden <= MAX_MLP_HIDDEN,
            "mlp_mult",
            f"must give an MLP width int(mlp_mult * model_dim) within 1..{MAX_MLP_HIDDEN}",
        )
        need(self.logit_softcap > 0, "logit_softcap", "must be positive")
        need(self.rope_base > 0, "rope_base", "must be positive")
        need(
            self.rope_dims <= 0 or (self.rope_dims <= self.head_dim and self.rope_dims % 2 == 0),
            "rope_dims",
            f"must be even and at most head_dim={self.head_dim} (0 or less: every head dim)",
        )
        need(1 <= self.train_seq_len <= MAX_SEQ_LEN, "train_seq_len", f"must be within 1..{MAX_SEQ_LEN}")
        need(self.num_loops <= MAX_LOOPS, "num_loops", f"must be at most {MAX_LOOPS} (0 or less: no recurrence)")
        for key in ("loop_start", "loop_end", "xsa_last_n", "parallel_residual_start", "parallel_start_layer"):
            value = getattr(self, key)
            bound = MAX_LAYER_INDEX
            need(value is None or abs(value) <= bound, key, f"must be within -{bound}..{bound}")
        if self.num_loops > 0:
            # Any schedule the scripts can run is fine; an index outside the layers would crash them.
            need(
                0 <= self.loop_start <= self.num_layers, "loop_start", f"must be within 0..num_layers={self.num_layers}"
            )
            need(self.loop_end < self.num_layers, "loop_end", f"must be at most num_layers-1={self.num_layers - 1}")
            need(
                len(self.layer_schedule()) <= MAX_APPLICATIONS,
                "num_loops",
                f"gives {len(self.layer_schedule())} layer applications, more than {MAX_APPLICATIONS}",
            )
        if self.frontier:
            need(
                self.parallel_residual_start is None,
                "parallel_residual_start",
                "is the 2026-04-09 family's; the frontier decoder uses parallel_start_layer (set this to null)",
            )
            need(self.parallel_start_layer is not None, "parallel_start_layer", "must be set in the frontier family")
            need(
                self.parallel_final_lane in PARALLEL_FINAL_LANES,
                "parallel_final_lane",
                f"must be one of {', '.join(PARALLEL_FINAL_LANES)}",
            )
        else:
            need(
                self.parallel_residual_start is not None,
                "parallel_residual_start",
                "must be set in the 2026-04-09 family",
            )
            for key in ("parallel_start_layer", "parallel_final_lane"):
                need(getattr(self, key) is None, key, "is the frontier family's (family=frontier); must be null here")
        need(0 <= self.gate_window <= self.model_dim, "gate_window", f"must be within 0..model_dim={self.model_dim}")
        need(
            self.attn_out_gate_src in ATTN_OUT_GATE_SOURCES,
            "attn_out_gate_src",
            f"must be one of {', '.join(ATTN_OUT_GATE_SOURCES)}",
        )
        gates = [
            k for k in ("attn_out_gate_enabled", "gated_attn_enabled", "sparse_attn_gate_enabled") if getattr(self, k)
        ]
        need(
            len(gates) <= 1,
            gates[-1] if gates else "family",
            f"the attention gates are mutually exclusive ({', '.join(gates)} are on)",
        )

    # ---- (de)serialisation ----------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, where: str = "config") -> ModelConfig:
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: expected a mapping of architecture keys, got {type(data).__name__}")
        unknown = sorted(set(data) - set(_FIELD_TYPES))
        if unknown:
            raise ConfigError(f"{where}: unknown architecture key(s) {', '.join(unknown)}; known: {known_keys()}")
        values = dict(data)
        for key, value in values.items():
            # JSON has no int/float distinction worth trusting for float fields.
            if _FIELD_TYPES[key] is float and isinstance(value, int) and not isinstance(value, bool):
                values[key] = float(value)
            # The scripts lower-case the lane name; accept any case, store it lower.
            if _FIELD_TYPES[key] is str and isinstance(value, str):
                values[key] = value.lower()
        return cls(**values)

    def with_overrides(self, overrides: dict[str, Any]) -> ModelConfig:
        merged = self.to_dict()
        merged.update(overrides)
        return ModelConfig.from_dict(merged, where="overrides")


def _field_kind(name: str) -> tuple[type, bool]:
    hint = typing.get_type_hints(ModelConfig)[name]
    if isinstance(hint, types.UnionType):
        (inner,) = [a for a in typing.get_args(hint) if a is not type(None)]
        return inner, True
    return hint, False


_FIELD_TYPES: dict[str, type] = {f.name: _field_kind(f.name)[0] for f in fields(ModelConfig)}
_OPTIONAL: dict[str, bool] = {f.name: _field_kind(f.name)[1] for f in fields(ModelConfig)}


def type_problem(value: Any, kind: type) -> str | None:
    """Why ``value`` is not a ``kind`` (bool, int, float or str) of a typed config, or None when it is."""
    if kind is str:
        return None if isinstance(value, str) else "must be a string"
    if kind is bool:
        return None if isinstance(value, bool) else "must be true or false"
    if isinstance(value, bool):
        return "must be an integer" if kind is int else "must be a number"
    if kind is int:
        return None if isinstance(value, int) else "must be an integer"
    return None if isinstance(value, (int, float)) else "must be a number"


def parse_scalar(raw: str, kind: type) -> Any:
    """A command-line value as a bool (1/0, true/false, yes/no, on/off), int or float; ValueError otherwise."""
    raw = raw.strip()
    if kind is bool:
        lowered = raw.lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ValueError(raw)
    if kind is str:
        return raw.lower()
    return kind(raw)


def known_keys() -> str:
    return ", ".join(_FIELD_TYPES)


# The spec's defaults are the 2026-04-09 record. Tiny presets keep the same structure (recurrence,
# parallel residuals, XSA, skip gates) at a size that runs in milliseconds on a CPU.
_PG0409 = ModelConfig()
PRESETS: dict[str, ModelConfig] = {
    "pg-2026-04-09": _PG0409,
    "pr1493": _PG0409,
    "tiny": ModelConfig(
        vocab_size=1024,
        num_layers=4,
        model_dim=64,
        num_heads=4,
        num_kv_heads=2,
        mlp_mult=2.0,
        rope_dims=8,
        train_seq_len=128,
        num_loops=1,
        loop_start=1,
        loop_end=2,
        parallel_residual_start=2,
        xsa_last_n=4,
    ),
    "tiny-flat": ModelConfig(
        vocab_size=1024,
        num_layers=3,
        model_dim=32,
        num_heads=2,
        num_kv_heads=1,
        mlp_mult=2.0,
        rope_dims=16,
        train_seq_len=64,
        num_loops=0,
        parallel_residual_start=3,
        xsa_last_n=0,
        skip_gates_enabled=False,
        ln_scale=False,
        tie_embeddings=False,
    ),
}
# The frontier records, by pull request, as their logs ran them (spec sections 1a and 3); the 04-10
# model is shared by #1530, #1610, #1626 and #1729 (CaseOps changes the data, not the net).
_FRONTIER = _PG0409.with_overrides(
    {
        "family": "frontier",
        "parallel_residual_start": None,
        "parallel_start_layer": 8,
        "parallel_final_lane": "mean",
        "rope_yarn": False,
        "qk_gain_init": 5.0,
    }
)
PRESETS |= {
    "pr1530": _FRONTIER,
    "pr1610": _FRONTIER,
    "pr1626": _FRONTIER,
    "pr1729": _FRONTIER,
    "pr1667": _FRONTIER.with_overrides(
        {"qk_gain_init": 5.25, "smear_gate_enabled": True, "smear_gate_bos_mask": False, "attn_out_gate_enabled": True}
    ),
    "pr1736": _FRONTIER.with_overrides({"gated_attn_enabled": True}),
    "pr1769": _FRONTIER.with_overrides({"gated_attn_enabled": True}),  # 04-22: the 04-19 model
    "pr1787": _FRONTIER.with_overrides({"sparse_attn_gate_enabled": True, "sparse_attn_gate_scale": 1.0}),
    "pr1851": _FRONTIER.with_overrides(
        {"smear_gate_enabled": True, "sparse_attn_gate_enabled": True, "sparse_attn_gate_scale": 1.0}
    ),
    "pr1868": _FRONTIER.with_overrides(
        {"smear_gate_enabled": True, "sparse_attn_gate_enabled": True, "sparse_attn_gate_scale": 1.0}
    ),  # 04-29: #1851's code
    "pr1855": _FRONTIER.with_overrides(
        {"smear_gate_enabled": True, "sparse_attn_gate_enabled": True, "sparse_attn_gate_scale": 0.5}
    ),
    # Tiny frontier models for tests: every knob of section 3 at a size that runs in milliseconds.
    "tiny-frontier": _FRONTIER.with_overrides(
        {
            "vocab_size": 1024,
            "num_layers": 4,
            "model_dim": 64,
            "num_heads": 4,
            "num_kv_heads": 2,
            "mlp_mult": 2.0,
            "rope_dims": 8,
            "train_seq_len": 128,
            "num_loops": 1,
            "loop_start": 1,
            "loop_end": 2,
            "parallel_start_layer": 2,
            "xsa_last_n": 4,
            "smear_gate_enabled": True,
            "sparse_attn_gate_enabled": True,
            "sparse_attn_gate_scale": 0.5,
            "gate_window": 6,
        }
    ),
}


def preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(
            f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}", field="preset", value=name
        ) from None


def parse_override(text: str) -> tuple[str, Any]:
    """``key=value`` with a JSON-ish value: ``num_layers=9``, ``mlp_mult=3.5``, ``ln_scale=false``."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {text!r}: expected key=value, for example num_layers=9")
    if key not in _FIELD_TYPES:
        raise ConfigError(f"override {text!r}: unknown key {key!r}; known: {known_keys()}")
    raw = raw.strip()
    kind = _FIELD_TYPES[key]
    if _OPTIONAL[key] and raw.lower() in ("none", "null"):
        return key, None
    try:
        return key, parse_scalar(raw, kind)
    except ValueError:
        raise ConfigError(f"override {text!r}: {raw!r} is not a valid {kind.__name__}") from None


def resolve_config(preset_name: str | None, overrides: list[str] | dict[str, Any] | None = None) -> ModelConfig:
    """Preset (default ``pg-2026-04-09``) plus ``key=value`` overrides, validated once."""
    base = preset(preset_name or "pg-2026-04-09")
    if not overrides:
        return base
    if isinstance(overrides, dict):
        return base.with_overrides(overrides)
    return base.with_overrides(dict(parse_override(o) for o in overrides))


def config_json(config: ModelConfig) -> str:
    return json.dumps(config.to_dict(), sort_keys=True)
