"""Dependencies shared by the routers: the service, and the API-key check."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from ..errors import ApiError
from ..service import Service

_bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer KEY")
_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="or X-API-Key: KEY")


def get_service(request: Request) -> Service:
    return request.app.state.service


ServiceDep = Annotated[Service, Depends(get_service)]


def key_error(expected: str | None, header_key: str | None, authorization: str | None) -> ApiError | None:
    """The 401 for a request that lacks the configured key (given as X-API-Key or Authorization: Bearer)."""
    if expected is None:
        return None
    scheme, _, credentials = (authorization or "").partition(" ")
    given = header_key or (credentials.strip() if scheme.lower() == "bearer" else None)
    if given and secrets.compare_digest(given.encode(errors="surrogateescape"), expected.encode()):
        return None
    return ApiError(
        401,
        "unauthorized",
        "missing or wrong API key: send Authorization: Bearer KEY or X-API-Key: KEY",
        headers={"WWW-Authenticate": "Bearer"},
    )


def require_key(
    service: ServiceDep,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    header_key: Annotated[str | None, Depends(_header)],
) -> None:
    """Declares the key in OpenAPI (the docs' Authorize button); ``main.KeyCheck`` enforces it first, before
    the body is read, so an unauthenticated client learns nothing from a 400 or 422."""
    expected = service.settings.api_key
    error = key_error(
        None if expected is None else expected.get_secret_value(),
        header_key,
        None if bearer is None else f"Bearer {bearer.credentials}",
    )
    if error is not None:
        raise error
