"""Reading a record's training log: the ``Hyperparameters:`` block, the architecture it implies, and checks.

A ``.ptz`` carries no hyperparameters, but every record's log prints them all at the start::

    Hyperparameters:
      embed_bits: 7
      model_dim: 512
      ...
    train_shards: 80

(two-space indent, ``key: value`` with Python's ``str`` of the value, keys in lower case). Keys that
are ``ModelConfig`` fields become the architecture (found through ``dataclasses.fields``, so new
architecture knobs are picked up as they are added); the rest (TTT, training, quantization settings)
are kept as ``other``. A log does not print what is code rather than a setting (the model family,
the BOS mask of SmearGate), so those come from a base preset, named in what is reported.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import PRESETS, ConfigError, ModelConfig, parse_scalar
from .format import CheckpointError
from .quant import QuantizedTensor

MAX_LOG_BYTES = 64 << 20
# The base for the fields a log cannot print, by family: the family's newest record.
FAMILY_BASE = {"frontier": "pr1855", "2026-04-09": "pg-2026-04-09"}
_LINE = re.compile(r"^  ([a-z][a-z0-9_]*): ?(.*)$")
_CODE_BYTES = re.compile(r"^Code size \(compressed\): (\d+) bytes$", re.MULTILINE)
_MODEL_PARAMS = re.compile(r"^model_params:\s*(\d+)$", re.MULTILINE)


@dataclass(frozen=True)
class TrainingLog:
    path: Path
    architecture: dict[str, Any]  # ModelConfig fields the log printed, typed
    other: dict[str, Any]  # every other key of the block (TTT settings among them), typed loosely
    model_params: int | None = None  # the log's "model_params:N" line
    code_bytes: int | None = None  # the log's "Code size (compressed): N bytes" line (spec 4.3)
    unprinted: tuple[str, ...] = field(default=())  # ModelConfig fields the log did not print

    def base_preset(self) -> str:
        """The preset that supplies the fields the log does not print."""
        frontier = "parallel_start_layer" in self.architecture
        return FAMILY_BASE["frontier" if frontier else "2026-04-09"]

    def config(self, preset: str | None = None, overrides: dict[str, Any] | None = None) -> ModelConfig:
        """``preset`` (default: ``base_preset()``), then the log's values, then ``overrides``."""
        base = PRESETS[preset or self.base_preset()]
        values = dict(self.architecture)
        if base.frontier and "parallel_start_layer" in values:
            values["parallel_residual_start"] = None
        try:
            config = base.with_overrides(values | (overrides or {}))
        except ConfigError as exc:
            raise CheckpointError(
                f"{self.path}: the log's hyperparameters are not a valid architecture: {exc}"
            ) from None
        if self.model_params is not None and self.model_params != config.num_parameters():
            raise CheckpointError(
                f"{self.path}: the log says model_params:{self.model_params}, the architecture it describes has "
                f"{config.num_parameters()} (a log from another record, or the wrong --preset/--set?)"
            )
        return config


def _typed(raw: str, kind: type | None) -> Any:
    if raw == "None":
        return None
    if kind is not None:
        return parse_scalar(raw, kind)
    if raw in ("True", "False"):  # str() of a bool; "1" is an int here
        return raw == "True"
    for guess in (int, float):
        try:
            return guess(raw)
        except ValueError:
            continue
    return raw


def _field_types() -> dict[str, type]:
    hints = {f.name: f.type for f in dataclasses.fields(ModelConfig)}
    kinds: dict[str, type] = {}
    for name, hint in hints.items():
        text = str(hint)
        kinds[name] = next((t for t in (bool, int, float, str) if t.__name__ in text.split(" | ")), str)
    return kinds


def read_training_log(path: str | os.PathLike) -> TrainingLog:
    """The log's Hyperparameters block, or a CheckpointError naming the file and the line."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            data = f.read(MAX_LOG_BYTES + 1)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read the training log: {exc.strerror or exc}") from None
    if len(data) > MAX_LOG_BYTES:
        raise CheckpointError(f"{path}: larger than {MAX_LOG_BYTES:,} bytes; not a training log")
    text = data.decode("utf-8", errors="replace")
    lines = text.splitlines()
    try:
        start = lines.index("Hyperparameters:")
    except ValueError:
        raise CheckpointError(f"{path}: no 'Hyperparameters:' block (is this a record's train_seed*.log?)") from None
    kinds = _field_types()
    architecture: dict[str, Any] = {}
    other: dict[str, Any] = {}
    for number, line in enumerate(lines[start + 1 :], start=start + 2):
        if not line.startswith("  "):
            break
        match = _LINE.match(line)
        if match is None:
            raise CheckpointError(f"{path}:{number}: not a 'key: value' line of the Hyperparameters block: {line!r}")
        key, raw = match.groups()
        try:
            if key in kinds:
                architecture[key] = _typed(raw.strip(), kinds[key])
            else:
                other[key] = _typed(raw.strip(), None)
        except ValueError:
            raise CheckpointError(f"{path}:{number}: {key}={raw!r} is not a valid {kinds[key].__name__}") from None
    if not architecture:
        raise CheckpointError(
            f"{path}: the Hyperparameters block names no architecture key (known: {', '.join(kinds)})"
        )
    params = _MODEL_PARAMS.search(text)
    code = _CODE_BYTES.search(text)
    return TrainingLog(
        path=path,
        architecture=architecture,
        other=other,
        model_params=int(params.group(1)) if params else None,
        code_bytes=int(code.group(1)) if code else None,
        unprinted=tuple(k for k in kinds if k not in architecture),
    )


def check_quantization(log: TrainingLog, tensors: dict[str, QuantizedTensor], where: str) -> None:
    """Refuse an artifact whose quantization is not what the log's settings produce (another record's log)."""
    o = log.other
    problems = []
    embed = tensors.get("tok_emb.weight")
    if "embed_bits" in o and embed is not None and embed.scheme not in ("float16", f"int{o['embed_bits']}"):
        problems.append(f"embed_bits={o['embed_bits']} but tok_emb.weight is {embed.scheme}")
    if "matrix_bits" in o:
        others = sorted(
            {qt.scheme for n, qt in tensors.items() if n != "tok_emb.weight" and qt.scheme.startswith("int")}
        )
        if others and others != [f"int{o['matrix_bits']}"]:
            problems.append(f"matrix_bits={o['matrix_bits']} but the matrices are {', '.join(others)}")
    lqer = [n for n, qt in tensors.items() if qt.lqer is not None]
    if o.get("lqer_enabled") is False and lqer:
        problems.append(f"lqer_enabled=False but {len(lqer)} tensors carry LQER factors")
    if o.get("lqer_enabled") is True and "lqer_top_k" in o and len(lqer) != o["lqer_top_k"]:
        problems.append(f"lqer_top_k={o['lqer_top_k']} but {len(lqer)} tensors carry LQER factors")
    if o.get("lqer_enabled") is True and "lqer_rank" in o:
        ranks = sorted({qt.lqer.rank for qt in tensors.values() if qt.lqer is not None})
        if ranks and ranks != [o["lqer_rank"]]:
            problems.append(f"lqer_rank={o['lqer_rank']} but the LQER factors have rank {ranks}")
    gates = sorted({qt.scheme for n, qt in tensors.items() if n.endswith(".attn_gate_w")})
    if "gated_attn_quant_gate" in o and gates:
        want = "gate_int8_row" if o["gated_attn_quant_gate"] else "float16"
        if gates != [want]:
            problems.append(f"gated_attn_quant_gate={o['gated_attn_quant_gate']} but the gates are {', '.join(gates)}")
    if problems:
        raise CheckpointError(
            f"{where}: the artifact disagrees with the training log {log.path.name}: "
            f"{'; '.join(problems)} (a log from another record?)"
        )
