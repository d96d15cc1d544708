"""Pydantic models of every request and response body, with the examples ``/docs`` shows; the server
answers with them and the client reads them (no torch, no FastAPI here)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, create_model

from pgttt.api.settings import EvalSettings, Knob, request_knobs

from .challenge import ARTIFACT_LIMIT_BYTES

# A job's states, the store's and the API's and the client's: queued -> running -> one final state.
JobState = Literal["queued", "running", "succeeded", "failed", "cancelled"]
JOB_STATES: tuple[str, ...] = get_args(JobState)
ACTIVE_STATES = ("queued", "running")
FINAL_STATES = frozenset(JOB_STATES) - frozenset(ACTIVE_STATES)

EVAL_EXAMPLE: dict[str, Any] = {
    "checkpoint": "demo",
    "dataset": "demo",
    "ttt_epochs": 1,
    "chunk_tokens": 4096,
    "ttt_lr": 0.005,
    "max_tokens": 16384,
}


class EvalRequestBase(BaseModel):
    """``POST /eval``: what to evaluate; engine settings omitted (or null) take the engine's defaults."""

    model_config = ConfigDict(
        strict=True,
        extra="forbid",
        json_schema_extra={"examples": [EVAL_EXAMPLE, {"checkpoint": "demo", "dataset": "demo", "ttt_epochs": 0}]},
    )

    checkpoint: str = Field(min_length=1, description="a name from GET /checkpoints")
    dataset: str = Field(min_length=1, description="a name from GET /datasets")
    gpus: int = Field(1, ge=1, description="workers ganged for one data-parallel evaluation")
    force: bool = Field(False, description="run even when the result cache has the answer")
    wait: bool = Field(False, description="answer when the job has finished (or wait_timeout_s passed)")
    wait_timeout_s: float = Field(60.0, gt=0, le=600)


# A report the engine sent for the demo checkpoint (ttt_epochs=1, chunk_tokens=4096, max_tokens=16384), rounded.
PROGRESS_EXAMPLE: dict[str, Any] = {
    "phase": "training",
    "chunks_done": 1,
    "chunks_total": 4,
    "tokens_scored": 8192,
    "tokens_total": 16384,
    "tokens_per_s": 444.4,
    "eta_s": 18.4,
    "running_bpb": 2.129,
}


def knob_field(knob: Knob) -> tuple[Any, Any]:
    """A request field for a declared knob: its type (choices as an enum), bounds and help; null, or left out,
    takes the engine's default."""
    kind: Any = {int: int, float: float, bool: bool, str: str, tuple: list[Annotated[str, Field(min_length=1)]]}[
        knob.kind
    ]
    if knob.choices is not None:
        kind = Literal[knob.choices]
    bounds = {k: v for k in ("ge", "gt", "le", "lt") if (v := getattr(knob, k)) is not None}
    if knob.kind is float:
        bounds["allow_inf_nan"] = False
    description = "; ".join(t for t in (knob.help, knob.default_text()) if t)
    return kind | None, Field(None, description=description, **bounds)


def eval_request_model(settings: type = EvalSettings) -> type[EvalRequestBase]:
    """The ``POST /eval`` body: what to evaluate, and a field per declared knob that a request may set."""
    fields: dict[str, Any] = {k.name: knob_field(k) for k in request_knobs(settings)}
    return create_model("EvalRequest", __base__=EvalRequestBase, __doc__=EvalRequestBase.__doc__, **fields)


if TYPE_CHECKING:  # the knobs are fields made from the declaration, which a type checker does not run
    EvalRequest = EvalRequestBase
else:
    EvalRequest = eval_request_model()


class Progress(BaseModel):
    """A running job's progress, as the engine reports it (at most every 0.2 s); the server sends only the
    phased protocol's fields for a phased job."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [PROGRESS_EXAMPLE]})

    phase: str = Field(description="scoring, training (chunked), global_sgd (phased), done")
    chunks_done: int = Field(description="finished chunks (phased: documents)")
    chunks_total: int
    tokens_scored: int
    tokens_total: int
    tokens_per_s: float | None = None
    eta_s: float | None = None
    running_bpb: float | None = Field(None, description="val_bpb over the chunks finished so far")
    docs_done: int | None = None  # the phased protocol's documents and phases
    docs_total: int | None = None
    phases_done: int | None = None
    num_phases: int | None = None


class JobError(BaseModel):
    code: str
    message: str


class Job(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "id": "3f2c0d6a9b1e4c7f8a5d2e1b0c9f8e7d",
                    "url": "/jobs/3f2c0d6a9b1e4c7f8a5d2e1b0c9f8e7d",
                    "state": "running",
                    "cached": False,
                    "cancel_requested": False,
                    "checkpoint": "demo",
                    "dataset": "demo",
                    "request": {"ttt_epochs": 1, "chunk_tokens": 4096, "max_tokens": 16384},
                    "config": {"ttt_epochs": 1, "seq_len": 128, "precision": "fp32"},
                    "gpus": 1,
                    "created_at": "2026-05-01T12:00:00.000Z",
                    "started_at": "2026-05-01T12:00:00.100Z",
                    "finished_at": None,
                    "progress": PROGRESS_EXAMPLE,
                    "result": None,
                    "error": None,
                }
            ]
        }
    )

    id: str
    url: str
    state: JobState
    cached: bool
    cancel_requested: bool = False
    checkpoint: str
    dataset: str
    request: dict[str, Any]
    config: dict[str, Any] | None
    gpus: int
    created_at: str
    started_at: str | None
    finished_at: str | None
    progress: Progress | None
    result: dict[str, Any] | None = Field(None, description="the engine's EvalResult.to_dict()")
    error: JobError | None
    stored: bool = Field(
        True,
        description="false while the job database cannot be written (disk full): the "
        "finished job is held in memory and written again until it is stored",
    )


class JobList(BaseModel):
    jobs: list[Job]
    total: int
    limit: int
    offset: int


class WorkerStatus(BaseModel):
    device: str
    state: str
    job_id: str | None


class Readiness(BaseModel):
    ready: bool
    workers: list[WorkerStatus]
    problems: list[str] = Field(default_factory=list, description="checkpoints or datasets that were skipped")


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Checkpoint(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "name": "demo",
                    "kind": "model.bin",
                    "path": "/srv/pgttt/checkpoints/demo/model.bin",
                    "sha256": "9b1c...",
                    "size_bytes": 301234,
                    "parameters": 331000,
                    "config": {"vocab_size": 1024},
                    "tokenizer": {"sha256": "4e5f...", "vocab_size": 1024, "name": "tokenizer.model"},
                    "fits_16mb": True,
                    "devices": ["cpu"],
                }
            ]
        }
    )

    name: str
    kind: Literal["model.bin", "ptz"]
    path: str
    sha256: str
    size_bytes: int
    parameters: int
    config: dict[str, Any]
    tokenizer: dict[str, Any] | None
    fits_16mb: bool = Field(
        description=f"artifact bytes alone <= {ARTIFACT_LIMIT_BYTES:,} (the challenge also counts code)"
    )
    devices: list[str]


class CheckpointList(BaseModel):
    checkpoints: list[Checkpoint]


class RegisterCheckpoint(BaseModel):
    """``POST /checkpoints`` as JSON: serve a file already under a checkpoint folder."""

    model_config = ConfigDict(
        strict=True,
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"name": "run7", "path": "runs/run7/model.bin"},
                {"name": "record", "path": "final_model.int6.ptz", "preset": "pg-2026-04-09", "overrides": {}},
            ]
        },
    )

    name: str = Field(min_length=1)
    path: str = Field(min_length=1, description="relative to a checkpoint folder, or absolute inside one")
    preset: str | None = Field(None, description=".ptz only: the architecture preset")
    overrides: dict[str, Any] | None = Field(None, description=".ptz only: architecture keys from its training log")
    tokenizer: str | None = Field(None, description=".ptz only: its tokenizer, a path inside a data folder")


class Dataset(BaseModel):
    name: str
    path: str
    tokenizer: str
    tokenizer_sha256: str
    val_files: list[str]
    val_tokens: int
    val_byte_files: list[str] = Field(
        default_factory=list, description="CaseOps byte sidecars (fineweb_val_bytes_*.bin), the bytes for bpb"
    )
    fingerprint: str


class DatasetList(BaseModel):
    datasets: list[Dataset]


class ErrorDetail(BaseModel):
    code: str
    message: str
    detail: Any = None


class ErrorBody(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "error": {
                        "code": "invalid_field",
                        "message": "ttt_lr=-1.0: must be within 0.0..10.0",
                        "detail": {"field": "ttt_lr", "value": -1.0},
                    }
                }
            ]
        }
    )

    error: ErrorDetail


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for a route's error answers, all in the one error shape."""
    return {status: {"model": ErrorBody} for status in statuses}
