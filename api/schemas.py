"""Pydantic models of every request and response body, with the examples ``/docs`` shows; the server
answers with them and the client reads them (no torch, no FastAPI here)."""

from __future__ import annotations

from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field

from .challenge import ARTIFACT_LIMIT_BYTES

# A job's states, the store's and the API's and the client's: queued -> running -> one final state.
JobState = Literal["queued", "running", "succeeded", "failed", "cancelled"]
JOB_STATES: tuple[str, ...] = get_args(JobState)
ACTIVE_STATES = ("queued", "running")
FINAL_STATES = frozenset(JOB_STATES) - frozenset(ACTIVE_STATES)

EVAL_EXAMPLE = {
    "checkpoint": "demo",
    "dataset": "demo",
    "ttt_epochs": 1,
    "chunk_tokens": 4096,
    "ttt_lr": 0.005,
    "max_tokens": 16384,
}


class EvalRequest(BaseModel):
    """``POST /eval``: what to evaluate; engine settings omitted (or null) take the engine's defaults."""

    model_config = ConfigDict(
        strict=True,
        extra="forbid",
        json_schema_extra={"examples": [EVAL_EXAMPLE, {"checkpoint": "demo", "dataset": "demo", "ttt_epochs": 0}]},
    )

    checkpoint: str = Field(min_length=1, description="a name from GET /checkpoints")
    dataset: str = Field(min_length=1, description="a name from GET /datasets")
    ttt_epochs: int | None = Field(None, description="TTT passes over each chunk; 0: sliding-window score only")
    chunk_tokens: int | None = Field(None, description="tokens per score-then-train chunk")
    ttt_lr: float | None = Field(None, description="peak learning rate of the TTT optimizer")
    ttt_momentum: float | None = None
    seq_len: int | None = Field(None, description="window length; default the checkpoint's train_seq_len")
    stride: int | None = Field(None, description="sliding-window stride")
    batch_seqs: int | None = None
    max_tokens: int | None = Field(None, description="score only the first max_tokens targets")
    grad_clip: float | None = None
    lr_schedule: str | None = Field(None, description="cosine or constant")
    optimizer: str | None = Field(None, description="sgd or adamw")
    adapt_include: list[str] | None = Field(None, description="fnmatch patterns of parameters TTT updates")
    adapt_exclude: list[str] | None = None
    precision: str | None = Field(None, description="bf16 or fp32; default bf16 on CUDA, fp32 on CPU")
    seed: int | None = None
    # The phased protocol (per-document LoRA TTT with global-SGD phases; frontier spec 2). Knobs are the
    # records' environment variables in lower case; unset ones take the checkpoint's record's as-run values.
    protocol: str | None = Field(None, description="chunked (default), doc_masked or phased")
    record_defaults: str | None = Field(None, description="phased: the record (e.g. pr1855) whose values fill "
                                                          "unset knobs; default the checkpoint's preset's")
    ttt_lora_rank: int | None = None
    ttt_lora_lr: float | None = None
    ttt_lora_alpha: float | None = Field(None, description="adapters scale by alpha / rank")
    ttt_warm_start_a: bool | None = None
    ttt_chunk_size: int | None = Field(None, description="target tokens per LoRA chunk")
    ttt_eval_seq_len: int | None = None
    ttt_batch_size: int | None = Field(None, description="documents per LoRA batch")
    ttt_grad_steps: int | None = None
    ttt_optimizer: str | None = Field(None, description="adam (AdamW) or sgd")
    ttt_beta1: float | None = None
    ttt_beta2: float | None = None
    ttt_eps: float | None = None
    ttt_weight_decay: float | None = None
    ttt_k_lora: bool | None = None
    ttt_mlp_lora: bool | None = None
    ttt_o_lora: bool | None = None
    phased_ttt_prefix_docs: int | None = Field(None, description="documents the global phases train on (0: none)")
    phased_ttt_num_phases: int | None = None
    global_ttt_lr: float | None = None
    global_ttt_momentum: float | None = None
    global_ttt_epochs: int | None = None
    global_ttt_chunk_tokens: int | None = None
    global_ttt_batch_seqs: int | None = None
    global_ttt_grad_clip: float | None = None
    global_ttt_warmup_start_lr: float | None = None
    global_ttt_warmup_chunks: int | None = None
    global_ttt_respect_doc_boundaries: bool | None = None
    val_doc_fraction: float | None = Field(None, description="the record's seeded random share of the documents")
    max_docs: int | None = Field(None, description="phased: only the stream's first max_docs documents")
    emulate_ranks: int | None = Field(None, description="phased: the schedule of this many reference ranks "
                                                        "(default 8, as the records ran; 1: one GPU's)")
    gpus: int = Field(1, ge=1, description="workers ganged for one data-parallel evaluation")
    force: bool = Field(False, description="run even when the result cache has the answer")
    wait: bool = Field(False, description="answer when the job has finished (or wait_timeout_s passed)")
    wait_timeout_s: float = Field(60.0, gt=0, le=600)


# A report the engine sent for the demo checkpoint (ttt_epochs=1, chunk_tokens=4096, max_tokens=16384), rounded.
PROGRESS_EXAMPLE = {
    "phase": "training", "chunks_done": 1, "chunks_total": 4, "tokens_scored": 8192, "tokens_total": 16384,
    "tokens_per_s": 444.4, "eta_s": 18.4, "running_bpb": 2.129,
}


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
    stored: bool = Field(True, description="false while the job database cannot be written (disk full): the "
                         "finished job is held in memory and written again until it is stored")


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
                    "name": "demo", "kind": "model.bin", "path": "/srv/pgttt/checkpoints/demo/model.bin",
                    "sha256": "9b1c...", "size_bytes": 301234, "parameters": 331000, "config": {"vocab_size": 1024},
                    "tokenizer": {"sha256": "4e5f...", "vocab_size": 1024, "name": "tokenizer.model"},
                    "fits_16mb": True, "devices": ["cpu"],
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
        description=f"artifact bytes alone <= {ARTIFACT_LIMIT_BYTES:,} (the challenge also counts code)")
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
        default_factory=list, description="CaseOps byte sidecars (fineweb_val_bytes_*.bin), the bytes for bpb")
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
