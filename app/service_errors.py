"""What the service refuses, as data (the field, the value, the state): no HTTP here. ``errors.api_error``
gives each its status and code, once."""

from __future__ import annotations

from typing import Any

from pgttt.errors import PgtttError


class ServiceError(PgtttError):
    """A request the service refuses; ``detail`` is what a client may read besides the message."""

    def __init__(self, message: str, detail: Any = None) -> None:
        super().__init__(message)
        self.message, self.detail = message, detail


class InvalidField(ServiceError):
    """A request field whose value cannot be served."""

    def __init__(self, field: str, message: str, value: Any = None) -> None:
        super().__init__(message)
        self.field: str = field  # always set for this error
        self.value = value


class NotFound(ServiceError):
    """No ``kind`` (job, checkpoint, dataset) called ``name``."""

    def __init__(self, kind: str, name: str) -> None:
        super().__init__(f"unknown {kind} {name!r}")
        self.kind, self.name = kind, name


class NameTaken(ServiceError):
    """A checkpoint of that name is already served, from ``path``."""

    def __init__(self, name: str, path: str) -> None:
        super().__init__(
            f"name: {name!r} is taken by {path}, a checkpoint already served", {"field": "name", "value": name}
        )


class JobFinished(ServiceError):
    """The job is already final: nothing to cancel."""

    def __init__(self, job_id: str, state: str) -> None:
        super().__init__(f"job {job_id} has already {state}; nothing to cancel", {"state": state})


class NotReady(ServiceError):
    """Checkpoints are still loading (or discovery failed); ``detail`` is the readiness."""


class NoWorkers(ServiceError):
    """Every worker failed to start; ``detail`` is the readiness."""


class QueueFull(ServiceError):
    """The queue holds ``queue_limit`` jobs already."""

    def __init__(self, queued: int) -> None:
        super().__init__(f"the queue is full ({queued} jobs waiting); retry later", {"queued": queued})


class JobNotSucceeded(ServiceError):
    """Only a succeeded job has a result to compare."""

    def __init__(self, job_id: str, state: str) -> None:
        super().__init__(
            f"job {job_id} is {state}: only succeeded jobs can be compared",
            {"field": "job", "value": job_id, "state": state},
        )


class NoUnits(ServiceError):
    """A succeeded job that kept no per-unit sums (``unreadable``: its file is not a units file)."""

    def __init__(self, job_id: str, unreadable: str | None = None) -> None:
        if unreadable is None:
            message = (
                f"job {job_id} kept no per-unit sums (it ran before pgttt kept them, or they could not be "
                "written): run it again with force to compare it"
            )
        else:
            message = f"job {job_id}: its units file is unreadable: {unreadable}"
        super().__init__(message, {"field": "units", "value": job_id})
        self.unreadable = unreadable


class NotComparable(ServiceError):
    """Two jobs whose units cannot be paired; ``field`` says what differs."""

    def __init__(self, message: str, field: str | None, a: Any, b: Any) -> None:
        super().__init__(message, {"field": field, "a": a, "b": b})
