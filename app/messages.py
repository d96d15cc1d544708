"""The messages between the server and its worker processes: orders in, reports out (plain dataclasses, pickled
over a pipe). Each side handles them with one ``match``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# ---- orders: server -> worker ---------------------------------------------------------------------


@dataclass(frozen=True)
class RunOrder:
    """One worker's share of a job: ``rank`` of ``world_size``; ``init_method`` set when ganged."""

    job_id: str
    checkpoint: str
    dataset: Any  # the engine bridge's DatasetSpec
    config: dict[str, Any]
    rank: int = 0
    world_size: int = 1
    init_method: str | None = None


@dataclass(frozen=True)
class LoadOrder:
    """Load a checkpoint registered while the worker runs (after its current job)."""

    spec: Any  # the store's CheckpointSpec


@dataclass(frozen=True)
class StopOrder:
    """Exit after the current job."""


@dataclass(frozen=True)
class WarmOrder:
    """Compile what the start's warm-up left out (the engine's ``warmup_rest``): sent once, when nothing is queued."""


Order = RunOrder | LoadOrder | StopOrder | WarmOrder

# ---- reports: worker -> server --------------------------------------------------------------------


@dataclass(frozen=True)
class StateReport:
    """The worker's state changed (``WORKER_STATES``); ``memory`` (CUDA bytes) once idle."""

    state: str
    memory: dict[str, int] | None = None


@dataclass(frozen=True)
class StartFailed:
    """Loading or warming up failed: the worker exits, and the pool decides whether to start it again."""

    message: str
    trace: str


@dataclass(frozen=True)
class Loaded:
    name: str


@dataclass(frozen=True)
class LoadFailed:
    name: str
    message: str


@dataclass(frozen=True)
class ProgressReport:
    job_id: str
    progress: dict[str, Any]  # the engine's progress, the API's Progress shape


@dataclass(frozen=True)
class JobDone:
    job_id: str
    rank: int
    result: dict[str, Any] | None  # rank 0's EvalResult.to_dict(); None from the other ranks


@dataclass(frozen=True)
class JobCancelled:
    job_id: str
    rank: int


@dataclass(frozen=True)
class JobFailed:
    job_id: str
    rank: int
    code: str  # "invalid_input" (the job's input was refused) or "engine_error"
    message: str


Report = StateReport | StartFailed | Loaded | LoadFailed | ProgressReport | JobDone | JobCancelled | JobFailed
