"""The FastAPI application: routers, error translation, the key check, the upload limit, the docs' assets
(served from the installed package: a GPU pod without internet still shows /docs), and the life cycle."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from fastapi_offline import FastAPIOffline
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from pgttt import __version__

from . import errors
from .routes import checkpoints, datasets, estimate, health, jobs
from .routes.deps import key_error
from .service import Service
from .settings import Settings

DESCRIPTION = """Score-first test-time-training evaluations of Parameter Golf checkpoints, loaded once.

Submit with `POST /eval`, follow with `GET /jobs/{id}` or `GET /jobs/{id}/events`. Errors always have the
shape `{"error": {"code", "message", "detail"}}`; a 422's `detail.field` names the offending field. When the
server has an API key, send `Authorization: Bearer KEY` or `X-API-Key: KEY` (not needed for /healthz, /readyz).
"""


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body over the limit of {limit} bytes (max upload bytes)")


DOCS_ASSETS = "/docs-assets"
# Answered without the API key: probes, and the docs (which hold no data; the key is entered in them).
PUBLIC_PATHS = frozenset({"/healthz", "/readyz", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})


class KeyCheck:
    """With an API key set, refuse a request without it before anything else reads it (body included)."""

    def __init__(self, app: ASGIApp, key: str | None) -> None:
        self.app, self.key = app, key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if (
            scope["type"] == "http"
            and self.key is not None
            and path not in PUBLIC_PATHS
            and not path.startswith(DOCS_ASSETS + "/")
        ):
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
            error = key_error(self.key, headers.get("x-api-key"), headers.get("authorization"))
            if error is not None:
                body = errors.error_body(error.code, error.message, error.detail)
                await errors.SafeJSONResponse(body, status_code=401, headers=error.headers)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class BodyLimit:
    """Refuse bodies over ``limit`` bytes: at once from Content-Length, else while they stream in."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            too_large = BodyTooLarge(self.limit)
            body = errors.error_body(
                "too_large", too_large.detail, {"limit": self.limit, "content_length": int(declared)}
            )
            await JSONResponse(body, status_code=413)(scope, receive, send)
            return
        received = 0

        async def limited() -> dict[str, Any]:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise BodyTooLarge(self.limit)  # an HTTPException: the error handlers answer 413
            return message

        await self.app(scope, limited, send)


def create_app(settings: Settings | None = None, *, engine_factory: Callable[[str], Any] | None = None) -> FastAPI:
    """The app; its service (store opened, devices checked) is made now, started by the lifespan."""
    settings = settings or Settings()
    service = Service(settings, engine_factory)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await service.start()
        try:
            yield
        finally:
            await service.stop()

    app = FastAPIOffline(
        title="pgttt",
        version=__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
        static_url=DOCS_ASSETS,
        default_response_class=errors.SafeJSONResponse,
    )
    app.state.service = service
    errors.install(app)
    app.add_middleware(BodyLimit, limit=settings.max_upload_bytes)
    key = settings.api_key
    app.add_middleware(KeyCheck, key=None if key is None else key.get_secret_value())  # outermost: first
    for module in (health, jobs, checkpoints, datasets, estimate):
        app.include_router(module.router)
    return app
