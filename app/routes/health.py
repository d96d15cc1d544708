"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Response
from fastapi.responses import JSONResponse

from pgttt.api.schemas import Health, Readiness, error_responses

from ..metrics import CONTENT_TYPE
from .deps import ServiceDep, require_key

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health, summary="The server is up (answers from the first second)")
async def healthz() -> Health:
    return Health()


@router.get(
    "/readyz",
    response_model=Readiness,
    responses={503: {"model": Readiness, "description": "checkpoints still loading or warming up"}},
    summary="200 once every worker has loaded and warmed up its checkpoints, else 503",
)
async def readyz(service: ServiceDep) -> JSONResponse:
    body = Readiness(**service.readiness())
    return JSONResponse(body.model_dump(), status_code=200 if body.ready else 503)


@router.get(
    "/metrics",
    dependencies=[Depends(require_key)],
    responses={200: {"content": {CONTENT_TYPE: {}}}, **error_responses(401)},
    summary="Prometheus metrics",
)
async def metrics(service: ServiceDep) -> Response:
    return Response(service.metrics.render(), media_type=CONTENT_TYPE)
