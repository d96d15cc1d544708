"""The service's one error type and its translation to HTTP: ``{"error": {"code", "message", "detail"}}``.

Errors from the other layers (``PgtttError`` and its subclasses) are translated here, once; FastAPI's
own validation and HTTP errors are reshaped to the same body so that clients parse one format.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from pgttt.errors import PgtttError

from .service_errors import (
    InvalidField,
    JobFinished,
    JobNotSucceeded,
    NameTaken,
    NotComparable,
    NotFound,
    NotReady,
    NoUnits,
    NoWorkers,
    QueueFull,
    ServiceError,
)
from .store import StorageError

log = logging.getLogger("pgttt.app")
RETRY_AFTER_S = 5  # what a 429 or a 503 not_ready asks a client to wait


class SafeJSONResponse(JSONResponse):
    """JSON that always encodes: a lone surrogate echoed from a request ("\\ud800") is escaped, not a 500."""

    def render(self, content: Any) -> bytes:
        try:
            return super().render(content)
        except UnicodeEncodeError:
            return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode()


class ApiError(PgtttError):
    """An error with its HTTP status, a stable machine-readable code and optional detail."""

    def __init__(
        self, status: int, code: str, message: str, detail: Any = None, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.detail, self.headers = status, code, message, detail, headers


def invalid_field(field: str, message: str, value: Any = None) -> ApiError:
    """A 422 about one field: ``detail.field`` and ``detail.value`` carry it; the message names it too."""
    return ApiError(422, "invalid_field", message, {"field": field, "value": _jsonable(value)})


def not_found(kind: str, name: str) -> ApiError:
    return ApiError(404, f"{kind}_not_found", f"unknown {kind} {name!r}", {"field": kind, "value": name})


def api_error(exc: ServiceError) -> ApiError:
    """The HTTP answer to each refusal of the service: its status and code are decided here, and only here."""
    retry = {"Retry-After": str(RETRY_AFTER_S)}
    match exc:
        case InvalidField():
            return invalid_field(exc.field, exc.message, exc.value)
        case NotFound():
            return not_found(exc.kind, exc.name)
        case NameTaken():
            return ApiError(409, "checkpoint_exists", exc.message, exc.detail)
        case JobFinished():
            return ApiError(409, "job_finished", exc.message, exc.detail)
        case JobNotSucceeded():
            return ApiError(409, "job_not_succeeded", exc.message, exc.detail)
        case NoUnits(unreadable=None):
            return ApiError(409, "no_units", exc.message, exc.detail)
        case NoUnits():
            return ApiError(422, "invalid_units", exc.message, exc.detail)
        case NotComparable():
            return ApiError(422, "not_comparable", exc.message, exc.detail)
        case QueueFull():
            return ApiError(429, "queue_full", exc.message, exc.detail, headers=retry)
        case NotReady():
            return ApiError(503, "not_ready", exc.message, exc.detail, headers=retry)
        case NoWorkers():
            return ApiError(503, "no_workers", exc.message, exc.detail)
    return ApiError(422, "invalid_input", exc.message, exc.detail)


def error_body(code: str, message: str, detail: Any = None) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "detail": detail}}


def _jsonable(value: Any) -> Any:
    try:
        json.dumps(value, allow_nan=False)
        return value
    except (TypeError, ValueError):
        return repr(value)


def _field_of(loc: tuple | list) -> str:
    """The dotted field name of a pydantic error location, without the 'body'/'query' prefix."""
    parts = [str(p) for p in loc]
    if len(parts) > 1 and parts[0] in ("body", "query", "path", "header", "cookie"):
        parts = parts[1:]
    return ".".join(parts) or "body"


async def _api_error(_request: Request, exc: ApiError) -> JSONResponse:
    return SafeJSONResponse(error_body(exc.code, exc.message, exc.detail), status_code=exc.status, headers=exc.headers)


async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
    return await _api_error(request, api_error(exc))


async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    first = errors[0] if errors else {"loc": ("body",), "msg": "invalid request", "type": "value_error"}
    if first.get("type") == "json_invalid":
        ctx = first.get("ctx") or {}
        message = f"malformed JSON body: {ctx.get('error', first.get('msg'))}"
        return SafeJSONResponse(error_body("malformed_json", message, None), status_code=400)
    field = _field_of(first.get("loc", ()))
    if field == "body" and first.get("type") in ("missing", "model_attributes_type", "model_type", "dict_type"):
        return SafeJSONResponse(
            error_body("malformed_body", "the request body must be a JSON object", {"field": "body"}), status_code=400
        )
    message = f"{field}: {first.get('msg', 'invalid value')}"
    detail = {
        "field": field,
        "value": _jsonable(first.get("input")),
        "errors": [
            {"field": _field_of(e.get("loc", ())), "message": e.get("msg"), "type": e.get("type")} for e in errors
        ],
    }
    return SafeJSONResponse(error_body("invalid_field", message, detail), status_code=422)


_HTTP_CODES = {400: "bad_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed", 413: "too_large"}


async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = _HTTP_CODES.get(exc.status_code, f"http_{exc.status_code}")
    return SafeJSONResponse(
        error_body(code, str(exc.detail), None), status_code=exc.status_code, headers=getattr(exc, "headers", None)
    )


async def _storage_error(_request: Request, exc: StorageError) -> JSONResponse:
    # Nothing was changed: a client may retry; finished jobs are kept in memory meanwhile.
    code = "storage_full" if exc.full else "storage_unavailable"
    log.error("%s", exc)
    return SafeJSONResponse(
        error_body(code, f"the server cannot store jobs now: {exc}", None),
        status_code=503,
        headers={"Retry-After": "30"},
    )


async def _user_error(_request: Request, exc: PgtttError) -> JSONResponse:
    # Another layer's input error that reached HTTP untranslated: still the client's input, so 422.
    detail = None if exc.field is None else {"field": exc.field, "value": _jsonable(exc.value)}
    return SafeJSONResponse(error_body("invalid_input", str(exc), detail), status_code=422)


async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error", exc_info=exc)
    return SafeJSONResponse(error_body("internal", f"internal error: {type(exc).__name__}", None), status_code=500)


def install(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(ServiceError, _service_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(StorageError, _storage_error)
    app.add_exception_handler(PgtttError, _user_error)
    app.add_exception_handler(Exception, _unexpected)
