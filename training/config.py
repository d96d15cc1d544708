"""The training recipe: one typed, validated ``TrainConfig`` under the challenge's hyperparameter names.

Defaults are the records' (2026-04-09, with the 2026-04-25 submission's split Muon weight decay).
The sequence length is the architecture's ``train_seq_len`` (``ModelConfig``), so one ``--set`` sets
both kinds of key: ``--set num_layers=9 --set matrix_lr=0.02``.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, fields
from typing import Any

from pgttt.api.challenge import TRAIN_BUDGET_S
from pgttt.checkpoints.config import (
    ConfigError,
    ModelConfig,
    parse_override,
    parse_scalar,
    resolve_config,
    type_problem,
)
from pgttt.errors import PgtttError


class TrainConfigError(PgtttError, ValueError):
    """A training hyperparameter that is unknown, malformed or out of range."""


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 1337
    iterations: int = 20000
    # Progress (learning-rate schedule, looping) follows wall-clock time when capped, steps otherwise (0).
    max_wallclock_seconds: float = TRAIN_BUDGET_S
    train_batch_tokens: int = 786432
    # A step's batch is cut into this many micro-batches, spread over the ranks (8 GPUs: one each).
    grad_accum_micro_batches: int = 8
    # Steps run before the clock starts and then undone (weights, optimizers, data order), to warm up
    # torch.compile and the kernels, as the record does.
    warmup_steps: int = 20
    warmdown_frac: float = 0.72
    min_lr: float = 0.0
    matrix_lr: float = 0.022
    scalar_lr: float = 0.02
    tied_embed_lr: float = 0.03
    embed_lr: float = 0.6
    head_lr: float = 0.008
    tied_embed_init_std: float = 0.005
    muon_momentum: float = 0.99
    muon_momentum_warmup_start: float = 0.92
    muon_momentum_warmup_steps: int = 1500
    muon_backend_steps: int = 5
    muon_row_normalize: bool = True
    beta1: float = 0.9
    beta2: float = 0.95
    adam_eps: float = 1e-8
    grad_clip_norm: float = 0.3
    muon_wd: float = 0.095
    # None: muon_wd. The 2026-04-25 submission decays MLP matrices harder than attention matrices.
    muon_wd_attn: float | None = None
    muon_wd_mlp: float | None = 0.115
    embed_wd: float = 0.085
    adam_wd: float = 0.02
    ema_decay: float = 0.9965
    enable_looping_at: float = 0.35
    train_log_every: int = 500
    val_loss_every: int = 4000
    # GPTQ export.
    gptq_calibration_batches: int = 64
    gptq_reserve_seconds: float = 12.0
    gptq_block_size: int = 128
    gptq_damp: float = 0.01
    matrix_clip_sigmas: float = 12.85
    embed_clip_sigmas: float = 20.0

    def __post_init__(self) -> None:
        self.validate()

    def wd_for(self, kind: str) -> float:
        """Muon weight decay of a matrix of kind ``attn`` or ``mlp``."""
        split = {"attn": self.muon_wd_attn, "mlp": self.muon_wd_mlp}[kind]
        return self.muon_wd if split is None else split

    def validate(self) -> None:
        def need(ok: bool, key: str, why: str) -> None:
            if not ok:
                raise TrainConfigError(f"{key}={getattr(self, key)!r}: {why}")

        for f in fields(self):
            value, kind = getattr(self, f.name), _FIELD_TYPES[f.name]
            if value is None:
                need(_OPTIONAL[f.name], f.name, "must be set")
                continue
            problem = type_problem(value, kind)
            need(problem is None, f.name, problem or "")
            if kind is float:
                need(value >= 0, f.name, "must not be negative")
        for key in (
            "iterations",
            "train_batch_tokens",
            "grad_accum_micro_batches",
            "muon_backend_steps",
            "gptq_block_size",
        ):
            need(getattr(self, key) >= 1, key, "must be at least 1")
        for key in (
            "warmup_steps",
            "muon_momentum_warmup_steps",
            "train_log_every",
            "val_loss_every",
            "gptq_calibration_batches",
            "seed",
        ):
            need(getattr(self, key) >= 0, key, "must be 0 or more")
        for key in ("warmdown_frac", "min_lr", "enable_looping_at"):
            need(getattr(self, key) <= 1, key, "must be within 0..1")
        for key in ("muon_momentum", "muon_momentum_warmup_start", "beta1", "beta2", "ema_decay"):
            need(getattr(self, key) < 1, key, "must be within 0..1 (exclusive)")
        need(self.adam_eps > 0, "adam_eps", "must be positive")
        need(
            self.max_wallclock_seconds == 0 or self.max_wallclock_seconds > self.gptq_reserve_seconds,
            "max_wallclock_seconds",
            f"leaves no training time after gptq_reserve_seconds={self.gptq_reserve_seconds} (0: no time cap)",
        )
        need(self.matrix_clip_sigmas > 0, "matrix_clip_sigmas", "must be positive")
        need(self.embed_clip_sigmas > 0, "embed_clip_sigmas", "must be positive")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, where: str = "training config") -> TrainConfig:
        unknown = sorted(set(data) - set(_FIELD_TYPES))
        if unknown:
            raise TrainConfigError(f"{where}: unknown training key(s) {', '.join(unknown)}")
        return cls(**data)


def _field_kind(annotation: str) -> tuple[type, bool]:
    hint = typing.get_type_hints(TrainConfig)[annotation]
    if isinstance(hint, types.UnionType):
        (inner,) = [a for a in typing.get_args(hint) if a is not type(None)]
        return inner, True
    return hint, False


_FIELD_TYPES: dict[str, type] = {f.name: _field_kind(f.name)[0] for f in fields(TrainConfig)}
_OPTIONAL: dict[str, bool] = {f.name: _field_kind(f.name)[1] for f in fields(TrainConfig)}


def train_keys() -> str:
    return ", ".join(_FIELD_TYPES)


def parse_train_override(text: str) -> tuple[str, Any]:
    """``name=value`` for a TrainConfig field; ``none`` clears an optional one."""
    key, sep, raw = text.partition("=")
    key, raw = key.strip(), raw.strip()
    if not sep or key not in _FIELD_TYPES:
        raise TrainConfigError(f"--set {text!r}: unknown key {key!r}; training keys: {train_keys()}")
    kind = _FIELD_TYPES[key]
    if _OPTIONAL[key] and raw.lower() == "none":
        return key, None
    try:
        return key, parse_scalar(raw, kind)
    except ValueError:
        raise TrainConfigError(f"--set {text!r}: {raw!r} is not a valid {kind.__name__}") from None


def resolve_run_config(preset: str | None, overrides: list[str]) -> tuple[ModelConfig, TrainConfig]:
    """Split ``--set`` overrides between the architecture (preset + keys) and the training recipe."""
    model_overrides: dict[str, Any] = {}
    train_overrides: dict[str, Any] = {}
    for text in overrides:
        key = text.partition("=")[0].strip()
        if key in _FIELD_TYPES:
            name, value = parse_train_override(text)
            train_overrides[name] = value
        else:
            try:
                name, value = parse_override(text)
            except ConfigError as exc:
                raise TrainConfigError(f"{exc}; training keys: {train_keys()}") from None
            model_overrides[name] = value
    return resolve_config(preset, model_overrides), TrainConfig(**train_overrides)


def describe(model: ModelConfig, train: TrainConfig) -> str:
    """The run's configuration as printed at start: one JSON object per line."""
    return f"model: {json.dumps(model.to_dict(), sort_keys=True)}\ntrain: {json.dumps(train.to_dict(), sort_keys=True)}"
