"""One way to open a checkpoint of either kind (``model.bin`` or a challenge ``.ptz``) and build its GPT.

The kind is decided by the file's first bytes, not its name: a ``model.bin`` carries its config in
its header (a preset, log or overrides would be ignored, so they are refused); a ``.ptz`` carries
none, so its record's training log (``--log``, whose Hyperparameters block names the architecture) or
a preset is required; a preset and ``--set`` overrides take precedence over the log.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from .config import ModelConfig, parse_override, resolve_config
from .format import (
    MAGIC,
    CheckpointError,
    TokenizerIdentity,
    parse_model_bin,
    read_file_bytes,
    tokenizer_identity,
)
from .hparams_log import TrainingLog, check_quantization, read_training_log
from .model import GPT, apply_precision
from .ptz import parse_ptz
from .quant import QuantizedTensor, dequantize_state

Kind = Literal["model.bin", "ptz"]


@dataclass(frozen=True)
class LoadedCheckpoint:
    path: Path
    kind: Kind
    config: ModelConfig
    tensors: dict[str, QuantizedTensor]
    sha256: str  # of the whole file
    size_bytes: int
    tokenizer: TokenizerIdentity | None
    # model.bin: as recorded in its header. ptz: the file, its packing, and the preset/overrides used.
    provenance: dict


def load_checkpoint(
    path: str | os.PathLike,
    *,
    preset: str | None = None,
    overrides: list[str] | dict[str, Any] | None = None,
    tokenizer: str | os.PathLike | None = None,
    log: str | os.PathLike | None = None,
) -> LoadedCheckpoint:
    """Open and fully validate a checkpoint; ``tokenizer`` (a .model file) is checked against it.

    ``log``: a record's training log, for a ``.ptz``: the architecture comes from its Hyperparameters
    block (``preset``, if given, replaces the base for what a log does not print; ``overrides`` win),
    and the artifact's quantization must be what the log's settings produce."""
    path = Path(path)
    data = read_file_bytes(path)
    given = None if tokenizer is None else tokenizer_identity(tokenizer)
    problem = architecture_problem(data.startswith(MAGIC), preset=preset, overrides=overrides, log=log)
    if data.startswith(MAGIC):
        if problem == "extra":
            raise CheckpointError(
                f"{path}: a model.bin carries its own architecture in its header; "
                "a preset, log or overrides are not allowed (drop --preset/--log/--set)"
            )
        mb = parse_model_bin(path, data)
        config, tensors, provenance, recorded = mb.config, mb.tensors, mb.provenance, mb.tokenizer
        kind: Kind = "model.bin"
        sha256 = mb.sha256
    else:
        if problem == "missing":
            raise CheckpointError(
                f"{path}: not a model.bin, so read as a challenge .ptz artifact, which carries no hyperparameters: "
                "give its training log (--log train_seed42.log) or a preset (and overrides), e.g. --preset pr1855"
            )
        training_log = None if log is None else read_training_log(log)
        if training_log is None:
            config = resolve_config(preset, overrides)
        else:
            forced = overrides if isinstance(overrides, dict) else dict(parse_override(o) for o in overrides or [])
            config = training_log.config(preset, forced)
        tensors, packing = parse_ptz(path, data, config)
        if training_log is not None:
            check_quantization(training_log, tensors, str(path))
        sha256 = hashlib.sha256(data).hexdigest()
        provenance = {
            "source": "ptz",
            "artifact": path.name,
            "artifact_sha256": sha256,
            "preset": preset,
            "overrides": _overrides_dict(overrides, config),
            **packing,
        }
        if training_log is not None:
            provenance["training_log"] = _log_provenance(training_log, preset, config)
        kind, recorded = "ptz", None
    if given is not None and recorded is not None and given.sha256 != recorded.sha256:
        raise CheckpointError(
            f"{path}: tokenizer {given.name} (sha256 {given.sha256[:12]}) is not the one this checkpoint "
            f"records ({recorded.name}, sha256 {recorded.sha256[:12]})"
        )
    identity = given or recorded
    if identity is not None and identity.vocab_size > config.vocab_size:
        raise CheckpointError(
            f"{path}: tokenizer {identity.name} has {identity.vocab_size} tokens, more than the model's "
            f"vocab_size={config.vocab_size}"
        )
    return LoadedCheckpoint(path, kind, config, tensors, sha256, len(data), identity, provenance)


def architecture_problem(
    model_bin: bool, *, preset: str | None, overrides: Any, log: Any = None
) -> Literal["extra", "missing"] | None:
    """The rule for where a checkpoint's architecture comes from: a model.bin's header, alone; a .ptz's
    training log or preset (and overrides). "extra" when a model.bin is given one, "missing" when a .ptz has
    none, else None; each edge words it (flags on the command line, fields over HTTP)."""
    if model_bin:
        return "extra" if preset is not None or overrides or log is not None else None
    return "missing" if not preset and log is None else None


def _log_provenance(log: TrainingLog, preset: str | None, config: ModelConfig) -> dict[str, Any]:
    """What the log supplied, and what it could not (taken from the base preset), for the record."""
    base = preset or log.base_preset()
    return {
        "file": log.path.name,
        "sha256": hashlib.sha256(log.path.read_bytes()).hexdigest(),
        "base_preset": base,
        "not_in_log": {key: getattr(config, key) for key in log.unprinted},
        "code_bytes": log.code_bytes,
        "model_params": log.model_params,
        "settings": log.other,
    }


def _overrides_dict(overrides: list[str] | dict[str, Any] | None, config: ModelConfig) -> dict[str, Any]:
    """The overrides as resolved values (so ``--set mlp_mult=3`` is recorded as 3.0)."""
    if not overrides:
        return {}
    keys = overrides.keys() if isinstance(overrides, dict) else (o.partition("=")[0].strip() for o in overrides)
    return {key: getattr(config, key) for key in keys}


def build_model(ckpt: LoadedCheckpoint, *, precision: str, device: torch.device | str) -> GPT:
    """A fresh GPT in eval mode holding the dequantized (float32) weights, in ``precision``'s dtypes.

    Each call builds new parameter tensors, so training one model (TTT) never touches the checkpoint
    or another model built from it.
    """
    with torch.device("meta"):
        model = GPT(ckpt.config)
    model.load_state_dict(dequantize_state(ckpt.tensors), strict=True, assign=True)
    return apply_precision(model, precision).to(device).eval()
