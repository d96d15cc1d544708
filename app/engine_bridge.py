"""The service's one door to the engine and the checkpoint loader: everything ``app/`` needs from them.

Server side: inspect a checkpoint or a dataset (fully validated), resolve a request's evaluation
settings into the engine's config. Worker side: ``DeviceEngine`` holds the loaded checkpoints of one
device (pristine weights; each job adapts its own copy) and runs evaluations.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pgttt import __version__
from pgttt.api.schemas import Progress as ApiProgress
from pgttt.api.settings import request_knobs
from pgttt.app.store import CheckpointSpec
from pgttt.checkpoints.config import ConfigError, ModelConfig
from pgttt.checkpoints.format import MAGIC, tokenizer_identity
from pgttt.checkpoints.loading import LoadedCheckpoint, load_checkpoint
from pgttt.errors import PgtttError
from pgttt.ttt.bytes import load_byte_tables
from pgttt.ttt.compile_cache import use_compile_cache
from pgttt.ttt.config import EvalConfig
from pgttt.ttt.data import (
    VAL_PATTERN,
    ValSet,
    fingerprint,
    is_sidecar,
    load_val,
    read_header,
    resolve_sidecar_files,
    resolve_val_files,
)
from pgttt.ttt.errors import EvalError
from pgttt.ttt.protocol import Progress
from pgttt.ttt.session import EvalSession

__all__ = ["MAGIC", "VAL_PATTERN", "is_sidecar"]

# The request fields that are the engine's settings, under the engine's own names.
EVAL_FIELDS: tuple[str, ...] = tuple(k.name for k in request_knobs())


class FieldError(PgtttError):
    """A request's evaluation setting the engine refuses; ``field`` names it, ``value`` gives it."""


def load_spec(spec: CheckpointSpec) -> LoadedCheckpoint:
    return load_checkpoint(spec.path, preset=spec.preset, overrides=spec.overrides or None, tokenizer=spec.tokenizer)


@dataclass(frozen=True)
class CheckpointInfo:
    kind: str
    sha256: str
    size_bytes: int
    parameters: int
    config: ModelConfig
    tokenizer: dict[str, Any] | None
    parameter_names: tuple[str, ...]
    preset: str | None = None  # the architecture preset it was made as, when known: its record's TTT defaults


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    path: str
    tokenizer: str


@dataclass(frozen=True)
class DatasetInfo:
    val_files: list[str]
    val_tokens: int
    fingerprint: str
    tokenizer_sha256: str
    tokenizer_vocab_size: int
    val_byte_files: list[str] = field(default_factory=list)  # CaseOps byte sidecars, one per val file


def is_model_bin(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(len(MAGIC)) == MAGIC
    except OSError:
        return False


def inspect_checkpoint(spec: CheckpointSpec) -> CheckpointInfo:
    """Read and validate the whole file (CheckpointError naming the file otherwise)."""
    ckpt = load_spec(spec)
    return CheckpointInfo(
        kind=ckpt.kind,
        sha256=ckpt.sha256,
        size_bytes=ckpt.size_bytes,
        parameters=ckpt.config.num_parameters(),
        config=ckpt.config,
        tokenizer=None if ckpt.tokenizer is None else ckpt.tokenizer.to_dict(),
        parameter_names=tuple(ckpt.tensors),
        preset=ckpt.provenance.get("preset"),
    )


def inspect_dataset(spec: DatasetSpec) -> DatasetInfo:
    """Check every shard's header and the tokenizer; fingerprint the shards and their byte sidecars (read
    once, cached); a sidecar's count and alignment are checked when the dataset is loaded."""
    files = resolve_val_files(spec.path)
    sidecars = resolve_sidecar_files(spec.path, files)
    identity = tokenizer_identity(spec.tokenizer)
    return DatasetInfo(
        val_files=[f.name for f in files],
        val_tokens=sum(read_header(f) for f in files),
        fingerprint=fingerprint(files + sidecars),
        tokenizer_sha256=identity.sha256,
        tokenizer_vocab_size=identity.vocab_size,
        val_byte_files=[f.name for f in sidecars],
    )


def resolve_eval_config(
    fields: dict[str, Any], checkpoint: CheckpointInfo, dataset: DatasetInfo, device: str
) -> dict[str, Any]:
    """The engine's resolved config for these request fields on this checkpoint, dataset and device."""
    recorded = checkpoint.tokenizer
    if recorded is not None and recorded["sha256"] != dataset.tokenizer_sha256:
        raise FieldError(
            f"dataset: its tokenizer (sha256 {dataset.tokenizer_sha256[:12]}) is not the one the checkpoint was "
            f"trained with ({recorded['name']}, sha256 {recorded['sha256'][:12]})",
            field="dataset",
        )
    if dataset.tokenizer_vocab_size != checkpoint.config.vocab_size:
        # A model scored on another vocabulary's tokens gives a number, and a meaningless one.
        raise FieldError(
            f"dataset: its tokenizer has {dataset.tokenizer_vocab_size} tokens; the checkpoint's vocab_size is "
            f"{checkpoint.config.vocab_size}: they are not the same vocabulary",
            field="dataset",
        )
    try:
        config = EvalConfig.from_dict(dict(fields), where="request").resolved(
            checkpoint.config, device, preset=checkpoint.preset
        )
        config.adapted(list(checkpoint.parameter_names))
    except EvalError as exc:
        raise FieldError(str(exc), field=exc.field or "config", value=exc.value) from None
    _check_stream(config.seq_len, config.stride, config.max_tokens, dataset.val_tokens)
    return config.to_dict()


def _check_stream(seq_len: int, stride: int, max_tokens: int | None, val_tokens: int) -> None:
    """What the engine would refuse once running, refused at submission: a stream that leaves no window
    (``ttt.data.trim_stream`` keeps ``((N-1) // seq_len) * seq_len`` targets; the first window needs more
    than ``seq_len - stride``)."""
    usable = ((val_tokens - 1) // seq_len) * seq_len if val_tokens else 0
    if usable <= 0:
        raise FieldError(
            f"seq_len={seq_len}: the dataset's {val_tokens} tokens are too few (at least {seq_len + 1} needed)",
            field="seq_len",
            value=seq_len,
        )
    targets = usable if max_tokens is None else min(usable, max_tokens)
    if targets <= seq_len - stride:
        field, value = (
            ("max_tokens", max_tokens) if max_tokens is not None and max_tokens < usable else ("seq_len", seq_len)
        )
        raise FieldError(
            f"{field}={value}: {targets} targets leave no window; more than seq_len - stride = "
            f"{seq_len - stride} are needed",
            field=field,
            value=value,
        )


def cache_key(checkpoint: CheckpointInfo, dataset: DatasetInfo, config: dict[str, Any]) -> str:
    """Same checkpoint bytes, same val data and tokenizer, same resolved settings: the same answer."""
    identity = {
        "checkpoint_sha256": checkpoint.sha256,
        "dataset_fingerprint": dataset.fingerprint,
        "tokenizer_sha256": dataset.tokenizer_sha256,
        "config": config,
        "pgttt": __version__,
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def progress_to_api(p: Progress) -> dict[str, Any]:
    """The engine's progress as the API's: rate and ETA from scored tokens over elapsed seconds."""
    rate = p.tokens_scored / p.elapsed_s if p.elapsed_s > 0 and p.tokens_scored else None
    eta = (p.tokens_total - p.tokens_scored) / rate if rate else None
    phased = {}
    if p.docs_total is not None:  # the phased protocol: documents, phases, and its own estimate
        phased = dict(
            docs_done=p.docs_done,
            docs_total=p.docs_total,
            phases_done=p.phases_done,
            num_phases=p.num_phases,
            eta_s=p.eta_s,
        )
    return _api_progress(
        phase=p.phase,
        chunks_done=p.chunks_done,
        chunks_total=p.num_chunks,
        tokens_scored=p.tokens_scored,
        tokens_total=p.tokens_total,
        tokens_per_s=rate,
        eta_s=eta,
        running_bpb=p.bpb,
        **phased,
    )


def _api_progress(**fields: Any) -> dict[str, Any]:
    """The API's ``Progress`` object as sent: the fields given (a chunked job's carry no phased ones)."""
    return ApiProgress(**fields).model_dump(exclude_unset=True)


def warmed_world_sizes(devices: int) -> tuple[int, ...]:
    """The job sizes whose training shapes a worker compiles at start: 1, the powers of two up to
    ``devices``, and ``devices`` (a gang of another size still runs, on the dynamic-batch graph)."""
    return tuple(sorted({1, devices} | {2**k for k in range(1, devices.bit_length())}))


class DeviceEngine:
    """In a worker process: every checkpoint's ``EvalSession`` with its working model on this device,
    val sets and byte tables loaded once per dataset."""

    def __init__(
        self,
        device: str,
        world_sizes: tuple[int, ...] = (1,),
        cuda_graphs: bool = True,
        compile_cache: Path | None = None,
    ) -> None:
        if compile_cache is not None:  # in the worker process, before it compiles anything
            use_compile_cache(compile_cache)
        self.device = torch.device(device)
        self.world_sizes = world_sizes  # jobs of 1 GPU and the gangs this device may join (warmup_rest)
        self.cuda_graphs = cuda_graphs
        self.sessions: dict[str, EvalSession] = {}
        self._val: dict[tuple[str, int], ValSet] = {}

    def load(self, spec: CheckpointSpec) -> None:
        t0 = time.perf_counter()
        session = EvalSession.from_checkpoint(load_spec(spec), cuda_graphs=self.cuda_graphs)
        session.load_s = time.perf_counter() - t0
        # Put the working model on the device now, not in the first job.
        session.worker(self.device, EvalConfig().resolved(session.config, self.device).precision)
        self.sessions[spec.name] = session

    def warmup(self) -> None:
        """What a job of one GPU with the default config runs: the worker is ready after this. The graph for
        batch sizes no warm-up saw and the gangs' training shares wait for ``warmup_rest``."""
        for session in self.sessions.values():
            session.warmup(device=self.device, fallback=False)

    def warmup_rest(self) -> None:
        """The rest, once the worker is ready and nothing is queued (``WarmOrder``); jobs before it run those
        shapes uncompiled, never waiting for a compile."""
        for session in self.sessions.values():
            session.warmup(device=self.device, world_sizes=self.world_sizes)

    def evaluate(self, order: Any, progress: Callable[..., None], cancel: Any) -> dict[str, Any]:
        session = self.sessions.get(order.checkpoint)
        if session is None:
            raise EvalError(f"checkpoint {order.checkpoint!r} is not loaded on {self.device}")
        dataset = order.dataset
        vocab = session.config.vocab_size
        key = (dataset.path, vocab)
        if key not in self._val:
            self._val[key] = load_val(dataset.path, vocab)
        tables = load_byte_tables(dataset.tokenizer, vocab)
        result = session.evaluate(
            self._val[key],
            tables,
            EvalConfig.from_dict(order.config),
            device=self.device,
            progress=lambda p: progress(progress_to_api(p)),
            cancel=cancel,
        )
        done = _api_progress(
            phase="done",
            chunks_done=len(result.chunks),
            chunks_total=len(result.chunks),
            tokens_scored=result.tokens_scored,
            tokens_total=result.tokens_scored,
            tokens_per_s=result.tokens_per_second,
            eta_s=0.0,
            running_bpb=result.val_bpb,
        )
        progress(done, final=True)
        # The units travel to the server as a units file's bytes; it keeps them in a file of their own.
        return {**result.to_dict(), "units": result.units.to_bytes()}


def error_field(exc: Exception, default: str) -> str:
    """The request field a checkpoint's load error is about: its preset, another architecture key (the
    overrides), or the file itself."""
    if isinstance(exc, ConfigError):
        return "preset" if exc.field == "preset" else "overrides"
    return default
