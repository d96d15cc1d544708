"""Evaluations: ``POST /eval`` and the ``/jobs`` resource (get, list, cancel, stream events, compare two)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Response
from fastapi.responses import StreamingResponse

from pgttt.api.compare import CONFIDENCE, MAX_RESAMPLES, RESAMPLES, TOP
from pgttt.api.schemas import EvalRequest, Job, JobList, JobState, error_responses

from ..service import job_to_api
from .deps import ServiceDep, require_key

MAX_OFFSET = 2**63 - 1  # SQLite's integers are 64-bit: a larger OFFSET cannot even be asked
router = APIRouter(tags=["jobs"], dependencies=[Depends(require_key)])


@router.post(
    "/eval",
    response_model=Job,
    status_code=202,
    responses={
        200: {"model": Job, "description": "answered from the result cache, or finished while waiting"},
        202: {"model": Job, "description": "queued (Location: /jobs/{id})"},
        **error_responses(400, 401, 404, 422, 429, 503),
    },
    summary="Evaluate a checkpoint on a dataset (score-first TTT or sliding window)",
)
async def submit(req: EvalRequest, response: Response, service: ServiceDep) -> dict:
    job, cached = service.submit(req)
    if not cached and req.wait:
        job = await service.wait(job.id, req.wait_timeout_s)
    response.status_code = 200 if job.final else 202
    response.headers["Location"] = f"/jobs/{job.id}"
    return job_to_api(job)


@router.get("/jobs", response_model=JobList, responses=error_responses(401, 422), summary="Jobs, newest first")
async def list_jobs(
    service: ServiceDep,
    state: JobState | None = None,
    checkpoint: str | None = None,
    dataset: str | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
) -> dict:
    jobs, total = service.list_jobs(state=state, checkpoint=checkpoint, dataset=dataset, limit=limit, offset=offset)
    return {"jobs": [job_to_api(j) for j in jobs], "total": total, "limit": limit, "offset": offset}


@router.get("/jobs/{job_id}", response_model=Job, responses=error_responses(401, 404), summary="One job")
async def get_job(job_id: str, service: ServiceDep) -> dict:
    return job_to_api(service.get(job_id))


@router.delete(
    "/jobs/{job_id}",
    response_model=Job,
    responses=error_responses(401, 404, 409),
    summary="Cancel a job: at once if queued, within one batch if running; 409 if already finished",
)
async def cancel_job(job_id: str, service: ServiceDep) -> dict:
    return job_to_api(service.cancel(job_id))


@router.get(
    "/jobs/{job_id}/events",
    responses={200: {"content": {"text/event-stream": {}}}, **error_responses(401, 404)},
    summary="Server-sent events: progress and state (data: the job JSON), then end after a final state",
)
async def job_events(job_id: str, service: ServiceDep) -> StreamingResponse:
    service.get(job_id)  # 404 before the stream starts

    async def stream() -> AsyncIterator[str]:
        async for event, job in service.events(job_id):
            if event == "keepalive":
                yield ": keepalive\n\n"
            else:
                yield f"event: {event}\ndata: {json.dumps(job_to_api(job))}\n\n"

    return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


@router.get(
    "/jobs/{job_a}/compare/{job_b}",
    responses={
        200: {
            "description": "Δval_bpb = bpb(B) - bpb(A) with its paired bootstrap interval over the units both "
            "scored, the shares of units B improved and worsened, the largest contributors"
        },
        **error_responses(401, 404, 409, 422),
    },
    summary="Compare two finished jobs unit by unit (same checkpoint, val set and units); 409 if one has not "
    "succeeded, 422 if they cannot be paired",
)
async def compare_jobs(
    job_a: str,
    job_b: str,
    service: ServiceDep,
    resamples: Annotated[int, Query(ge=1, le=MAX_RESAMPLES)] = RESAMPLES,
    confidence: Annotated[float, Query(gt=0, lt=1)] = CONFIDENCE,
    seed: Annotated[int, Query(ge=0, le=2**32 - 1)] = 0,
    top: Annotated[int, Query(ge=0, le=100)] = TOP,
) -> dict:
    comparison = await service.compare(job_a, job_b, resamples=resamples, confidence=confidence, seed=seed, top=top)
    return comparison.to_dict()
