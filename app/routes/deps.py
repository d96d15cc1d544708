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


def require_key(
    service: ServiceDep,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    header_key: Annotated[str | None, Depends(_header)],
) -> None:
    """When an API key is configured, every request must carry it (Bearer or X-API-Key)."""
    expected = service.settings.api_key
    if expected is None:
        return
    given = header_key or (bearer.credentials if bearer is not None else None)
    if not given or not secrets.compare_digest(given.encode(), expected.get_secret_value().encode()):
        raise ApiError(
            401,
            "unauthorized",
            "missing or wrong API key: send Authorization: Bearer KEY or X-API-Key: KEY",
            headers={"WWW-Authenticate": "Bearer"},
        )
