"""The ``/checkpoints`` resource: list, describe, and add one (register a file, or upload one)."""

from __future__ import annotations

import json

from fastapi import APIRouter, Depends, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.datastructures import UploadFile

from pgttt.api.schemas import Checkpoint, CheckpointList, RegisterCheckpoint, error_responses

from ..errors import ApiError, invalid_field
from .deps import ServiceDep, require_key

router = APIRouter(tags=["checkpoints"], dependencies=[Depends(require_key)])

_UPLOAD_SCHEMA = {
    "type": "object",
    "required": ["file", "name"],
    "properties": {
        "file": {"type": "string", "format": "binary", "description": "a model.bin or a challenge .ptz"},
        "name": {"type": "string", "example": "run7"},
        "preset": {"type": "string", "description": ".ptz only", "example": "pg-2026-04-09"},
        "overrides": {"type": "string", "description": ".ptz only: a JSON object", "example": '{"num_layers": 9}'},
    },
}


@router.get(
    "/checkpoints", response_model=CheckpointList, responses=error_responses(401, 503), summary="Checkpoints served"
)
async def list_checkpoints(service: ServiceDep) -> dict:
    catalog = service.require_catalog()
    return {"checkpoints": [entry.to_api(service.devices) for entry in catalog.checkpoints.values()]}


@router.get(
    "/checkpoints/{name}", response_model=Checkpoint, responses=error_responses(401, 404, 503), summary="One checkpoint"
)
async def get_checkpoint(name: str, service: ServiceDep) -> dict:
    return service.checkpoint_api(name)


@router.post(
    "/checkpoints",
    response_model=Checkpoint,
    status_code=201,
    responses=error_responses(400, 401, 409, 413, 415, 422, 503),
    summary="Serve another checkpoint: a file under a checkpoint folder (JSON) or an upload (multipart)",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {
                    "schema": RegisterCheckpoint.model_json_schema(),
                    "examples": {
                        "model.bin": {"value": {"name": "run7", "path": "runs/run7/model.bin"}},
                        "ptz": {
                            "value": {
                                "name": "record",
                                "path": "final_model.int6.ptz",
                                "preset": "pg-2026-04-09",
                                "overrides": {},
                            }
                        },
                    },
                },
                "multipart/form-data": {"schema": _UPLOAD_SCHEMA},
            },
        }
    },
)
async def add_checkpoint(request: Request, service: ServiceDep) -> dict:
    media = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    if media == "multipart/form-data":
        async with request.form(max_files=1, max_fields=8) as form:
            file = form.get("file")
            if not isinstance(file, UploadFile):
                raise invalid_field("file", "file: a model.bin or .ptz file part is required")
            fields = {key: form.get(key) for key in ("name", "preset", "overrides")}
            for key, value in fields.items():
                if value is not None and not isinstance(value, str):
                    raise invalid_field(key, f"{key}: must be a text field, not a file")
            overrides = None
            if fields["overrides"]:
                try:
                    overrides = json.loads(fields["overrides"])
                except ValueError:
                    raise invalid_field("overrides", "overrides: must be a JSON object", fields["overrides"]) from None
            if fields["name"] is None:
                raise invalid_field("name", "name: a name for the checkpoint is required")
            return await service.registrar.upload(fields["name"], file, fields["preset"], overrides)
    if media != "application/json":
        raise ApiError(415, "unsupported_media_type", f"send application/json or multipart/form-data, not {media}")
    try:
        data = json.loads(await request.body())
    except ValueError as exc:
        raise ApiError(400, "malformed_json", f"malformed JSON body: {exc}") from None
    except RecursionError:
        raise ApiError(400, "malformed_json", "malformed JSON body: nested too deeply") from None
    try:
        req = RegisterCheckpoint.model_validate(data)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors()) from None
    return await service.registrar.register(req)
