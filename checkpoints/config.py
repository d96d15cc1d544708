"""The architecture configuration of the Parameter Golf GPT family, its presets and overrides.

Keys are the challenge's own hyperparameter names in lower case (its environment variables), so
users can copy them from a training log: ``--set num_layers=9 --set mlp_mult=3``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, fields
from typing import Any

from pgttt.errors import PgtttError


class ConfigError(PgtttError, ValueError):
    """An architecture configuration that is unknown, malformed or impossible."""


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 8192
    num_layers: int = 11
    model_dim: int = 512
    num_heads: int = 8
    num_kv_heads: int = 4
    mlp_mult: float = 4.0
    tie_embeddings: bool = True
    logit_softcap: float = 30.0
    rope_base: float = 10000.0
    rope_dims: int = 16
    # Sequence length the model was trained at: RoPE's base is scaled beyond it, and it is the
    # default evaluation length (the challenge evaluates at its training length).
    train_seq_len: int = 2048
    ln_scale: bool = True
    qk_gain_init: float = 5.25
    num_loops: int = 2
    loop_start: int = 3
    loop_end: int = 5
    parallel_residual_start: int = 7
    xsa_last_n: int = 11
    skip_gates_enabled: bool = True

    def __post_init__(self) -> None:
        self.validate()

    # ---- derived shapes -------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.model_dim // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        return int(self.mlp_mult * self.model_dim)

    def layer_schedule(self) -> list[int]:
        """Physical block index of every block application, depth recurrence included."""
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

    def num_parameters(self) -> int:
        d, kv = self.model_dim, self.num_kv_heads * self.head_dim
        per_block = 4 * d + self.num_heads + 2 * d * d + 2 * kv * d + 2 * self.mlp_hidden * d
        total = self.vocab_size * d + self.num_layers * per_block
        total += self.num_skip_weights * d * (2 if self.skip_gates_enabled else 1)
        if not self.tie_embeddings:
            total += self.vocab_size * d
        return total

    # ---- validation -----------------------------------------------------------------------
    def validate(self) -> None:
        def need(ok: bool, key: str, why: str) -> None:
            if not ok:
                raise ConfigError(f"{key}={getattr(self, key)!r}: {why}")

        for f in fields(self):
            problem = type_problem(getattr(self, f.name), _FIELD_TYPES[f.name])
            need(problem is None, f.name, problem or "")
        need(self.vocab_size >= 2, "vocab_size", "must be at least 2")
        need(self.vocab_size <= 65536, "vocab_size", "token shards store uint16 ids, so at most 65536")
        need(self.num_layers >= 1, "num_layers", "must be at least 1")
        need(self.model_dim >= 2, "model_dim", "must be at least 2")
        need(self.num_heads >= 1, "num_heads", "must be at least 1")
        need(self.model_dim % self.num_heads == 0, "num_heads", f"must divide model_dim={self.model_dim}")
        need(self.num_kv_heads >= 1, "num_kv_heads", "must be at least 1")
        need(self.num_heads % self.num_kv_heads == 0, "num_kv_heads", f"must divide num_heads={self.num_heads}")
        need(self.head_dim % 2 == 0, "num_heads", f"head dim model_dim/num_heads={self.head_dim} must be even")
        need(self.mlp_mult > 0 and self.mlp_hidden >= 1, "mlp_mult", "must give an MLP width of at least 1")
        need(self.logit_softcap > 0, "logit_softcap", "must be positive")
        need(self.rope_base > 1, "rope_base", "must be greater than 1")
        need(
            2 <= self.rope_dims <= self.head_dim and self.rope_dims % 2 == 0,
            "rope_dims",
            f"must be even and within 2..head_dim={self.head_dim}",
        )
        need(self.train_seq_len >= 1, "train_seq_len", "must be at least 1")
        need(self.num_loops >= 0, "num_loops", "must be 0 (no recurrence) or more")
        if self.num_loops > 0:
            need(0 <= self.loop_start < self.num_layers, "loop_start", f"must be within 0..{self.num_layers - 1}")
            need(
                self.loop_start <= self.loop_end < self.num_layers,
                "loop_end",
                f"must be within loop_start={self.loop_start}..num_layers-1={self.num_layers - 1}",
            )
        need(self.parallel_residual_start >= 0, "parallel_residual_start", "must be 0 or more (num_layers: none)")
        need(0 <= self.xsa_last_n <= self.num_layers, "xsa_last_n", f"must be within 0..num_layers={self.num_layers}")

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
        return cls(**values)

    def with_overrides(self, overrides: dict[str, Any]) -> ModelConfig:
        merged = self.to_dict()
        merged.update(overrides)
        return ModelConfig.from_dict(merged, where="overrides")


_FIELD_TYPES: dict[str, type] = {
    f.name: {"int": int, "float": float, "bool": bool}[str(f.type)] for f in fields(ModelConfig)
}


def type_problem(value: Any, kind: type) -> str | None:
    """Why ``value`` is not a ``kind`` (bool, int or float) of a typed config, or None when it is."""
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
    return kind(raw)


def known_keys() -> str:
    return ", ".join(_FIELD_TYPES)


# The spec's defaults are the 2026-04-09 record. Tiny presets keep the same structure (recurrence,
# parallel residuals, XSA, skip gates) at a size that runs in milliseconds on a CPU.
PRESETS: dict[str, ModelConfig] = {
    "pg-2026-04-09": ModelConfig(),
    "tiny": ModelConfig(
        vocab_size=1024, num_layers=4, model_dim=64, num_heads=4, num_kv_heads=2, mlp_mult=2.0,
        rope_dims=8, train_seq_len=128, num_loops=1, loop_start=1, loop_end=2,
        parallel_residual_start=2, xsa_last_n=4,
    ),
    "tiny-flat": ModelConfig(
        vocab_size=1024, num_layers=3, model_dim=32, num_heads=2, num_kv_heads=1, mlp_mult=2.0,
        rope_dims=16, train_seq_len=64, num_loops=0, parallel_residual_start=3, xsa_last_n=0,
        skip_gates_enabled=False, ln_scale=False, tie_embeddings=False,
    ),
}


def preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}") from None


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
