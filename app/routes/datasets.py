"""The ``/datasets`` resource: val sets found in the data folders."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from pgttt.api.schemas import DatasetList, error_responses

from .deps import ServiceDep, require_key

router = APIRouter(tags=["datasets"], dependencies=[Depends(require_key)])


@router.get("/datasets", response_model=DatasetList, responses=error_responses(401, 503), summary="Datasets served")
async def list_datasets(service: ServiceDep) -> dict:
    catalog = service.require_catalog()
    return {"datasets": [entry.to_api() for entry in catalog.datasets.values()]}
