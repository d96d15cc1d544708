"""A small typed HTTP client for a ``pgttt serve`` instance: submit, watch, cancel and list evaluations.

It speaks only HTTP (httpx), so it runs from a laptop or a notebook against a GPU pod; it never imports the
engine or torch. Connection errors and 503/429 answers are retried with exponential backoff and jitter
(``Retry-After`` honoured), a bounded number of times (:mod:`pgttt.client.retry`); every other error is raised as
:class:`RequestError`. Progress streams as server-sent events (:mod:`pgttt.client.sse`).

>>> from pgttt.client.client import Client
>>> with Client("http://127.0.0.1:8000") as api:                      # doctest: +SKIP
...     job = api.submit("demo", "demo", ttt_epochs=1, max_tokens=65536)
...     job = api.wait(job.id)
...     print(job.state, job.result["val_bpb"])
succeeded 1.87...
"""

from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx

from pgttt.api.compare import Comparison
from pgttt.api.schemas import FINAL_STATES, EvalRequest
from pgttt.client.retry import RETRY_STATUSES, RetryPolicy, parse_retry_after
from pgttt.client.sse import Event, iter_sse
from pgttt.errors import PgtttError

# Transport errors after which the request may have reached the server: only idempotent methods retry them.
_IDEMPOTENT = frozenset({"GET", "HEAD", "DELETE"})


class RequestError(PgtttError):
    """An error answer from the server (or no answer at all), as fields a notebook can branch on.

    ``status`` is the HTTP status (None when the server could not be reached), ``code``/``message`` come from
    the server's ``{"error": {...}}`` body, ``field`` names the offending request field of a 422.

    >>> try:                                                            # doctest: +SKIP
    ...     api.submit("demo", "demo", ttt_lr=-1)
    ... except RequestError as exc:
    ...     print(exc.status, exc.field)
    422 ttt_lr
    """

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str = "error",
        field: str | None = None,
        detail: Any = None,
        url: str = "",
    ) -> None:
        self.status = status
        self.code = code
        self.message = message
        self.detail = detail
        self.url = url
        where = f" (field {field!r})" if field else ""
        answer = code if status is None else f"{status} {code}"
        super().__init__(f"{url}: {answer}: {message}{where}", field=field)


class ServerUnreachable(RequestError):
    """The server did not answer (refused, timed out, dropped the connection) after every retry."""


@dataclass(frozen=True)
class RemoteJob:
    """One evaluation job as the server describes it (see the API's job object); ``raw`` is the whole JSON."""

    id: str
    state: str
    cached: bool
    checkpoint: str
    dataset: str
    request: dict[str, Any]
    config: dict[str, Any] | None
    progress: dict[str, Any] | None
    result: dict[str, Any] | None
    error: dict[str, Any] | None
    raw: dict[str, Any] = dataclasses.field(repr=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RemoteJob:
        return cls(
            id=str(data["id"]),
            state=str(data["state"]),
            cached=bool(data.get("cached", False)),
            checkpoint=data.get("checkpoint", ""),
            dataset=data.get("dataset", ""),
            request=data.get("request") or {},
            config=data.get("config"),
            progress=data.get("progress"),
            result=data.get("result"),
            error=data.get("error"),
            raw=data,
        )

    @property
    def finished(self) -> bool:
        return self.state in FINAL_STATES


class Client:
    """A client of one server (one connection pool: give each thread its own).

    ``api_key`` is sent as ``Authorization: Bearer KEY``. ``transport`` (e.g. ``httpx.MockTransport``) and
    ``sleep`` exist for tests.

    >>> api = Client("http://pod:8000", api_key="secret", retry=RetryPolicy(attempts=3))   # doctest: +SKIP
    >>> [c["name"] for c in api.checkpoints()]                                              # doctest: +SKIP
    ['demo']
    """

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        timeout_s: float = 30.0,
        retry: RetryPolicy | None = None,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.retry = retry or RetryPolicy()
        self._sleep = sleep
        self._rng = rng or random.Random()
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout_s, transport=transport)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- the API ----------------------------------------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        """``GET /healthz``: ``{"status": "ok"}`` once the server listens."""
        return self._json("GET", "/healthz")

    def ready(self) -> dict[str, Any]:
        """``GET /readyz`` without raising on 503: ``{"ready": bool, "workers": [...]}``."""
        response = self._request("GET", "/readyz", ok=(200, 503), retry_statuses=frozenset({429}))
        return response.json()

    def wait_ready(self, timeout_s: float = 600.0, poll_s: float = 1.0) -> dict[str, Any]:
        """Poll ``/readyz`` until the server says ready; RequestError (code ``not_ready``) after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while True:
            body = self.ready()
            if body.get("ready"):
                return body
            if time.monotonic() >= deadline:
                raise RequestError(
                    f"not ready after {timeout_s:g} s; workers: {body.get('workers')}",
                    status=503,
                    code="not_ready",
                    url=self.base_url,
                )
            self._sleep(poll_s)

    def submit(
        self,
        checkpoint: str,
        dataset: str,
        *,
        gpus: int = 1,
        force: bool = False,
        wait: bool = False,
        wait_timeout_s: float | None = None,
        **config: Any,
    ) -> RemoteJob:
        """``POST /eval``: a new job (queued), a cached one (succeeded, ``cached=True``) or, with ``wait``, the
        finished job when it finished within ``wait_timeout_s``. ``config`` holds engine fields by name.

        >>> api.submit("demo", "demo", ttt_epochs=0, max_tokens=65536).state          # doctest: +SKIP
        'queued'
        """
        body: dict[str, Any] = {"checkpoint": checkpoint, "dataset": dataset, **config, "gpus": gpus, "force": force}
        timeout = self._http.timeout
        if wait:
            body["wait"] = True
            if wait_timeout_s is not None:
                body["wait_timeout_s"] = wait_timeout_s
            # The server answers only after up to wait_timeout_s: read for that long, plus the usual timeout.
            waited = EvalRequest.model_fields["wait_timeout_s"].default if wait_timeout_s is None else wait_timeout_s
            timeout = httpx.Timeout(
                timeout.connect, read=waited + (timeout.read or 0.0), write=timeout.write, pool=timeout.pool
            )
        return RemoteJob.from_dict(self._json("POST", "/eval", json=body, ok=(200, 201, 202), timeout=timeout))

    def job(self, job_id: str) -> RemoteJob:
        """``GET /jobs/{id}``."""
        return RemoteJob.from_dict(self._json("GET", f"/jobs/{job_id}"))

    def jobs(
        self,
        *,
        state: str | None = None,
        checkpoint: str | None = None,
        dataset: str | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> tuple[list[RemoteJob], int]:
        """``GET /jobs``: one page of jobs, newest first, and the total count matching the filters."""
        params = {"state": state, "checkpoint": checkpoint, "dataset": dataset, "limit": limit, "offset": offset}
        body = self._json("GET", "/jobs", params={k: v for k, v in params.items() if v is not None})
        return [RemoteJob.from_dict(j) for j in body["jobs"]], int(body["total"])

    def cancel(self, job_id: str) -> RemoteJob:
        """``DELETE /jobs/{id}``; RequestError with status 409 if the job had already finished."""
        return RemoteJob.from_dict(self._json("DELETE", f"/jobs/{job_id}"))

    def events(self, job_id: str) -> Iterator[Event]:
        """``GET /jobs/{id}/events``: progress and state events until (and including) ``end``.

        >>> for ev in api.events(job.id):                                           # doctest: +SKIP
        ...     print(ev.event, ev.data["state"])
        """
        # No read timeout: a job may run for minutes between two events.
        timeout = httpx.Timeout(self._http.timeout.connect, read=None)
        response = self._request("GET", f"/jobs/{job_id}/events", stream=True, timeout=timeout)
        try:
            for event in iter_sse(response.iter_lines()):
                yield event
                if event.event == "end":
                    return
        finally:
            response.close()

    def wait(
        self,
        job_id: str,
        *,
        timeout_s: float | None = None,
        poll_s: float = 1.0,
        on_update: Callable[[RemoteJob], None] | None = None,
    ) -> RemoteJob:
        """Poll a job until it is finished and return it (in any final state). ``on_update`` sees every poll.
        RequestError (code ``timeout``) when ``timeout_s`` passes first; the job keeps running."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            job = self.job(job_id)
            if on_update is not None:
                on_update(job)
            if job.finished:
                return job
            if deadline is not None and time.monotonic() >= deadline:
                raise RequestError(
                    f"job {job_id} still {job.state} after {timeout_s:g} s", code="timeout", url=self.base_url
                )
            self._sleep(poll_s)

    def compare(self, job_a: str, job_b: str, **params: Any) -> Comparison:
        """``GET /jobs/{a}/compare/{b}``: job B against job A unit by unit; ``params``: resamples, confidence,
        seed, top (pgttt.api.compare). RequestError 409 if one has not succeeded, 422 if they cannot be paired."""
        return Comparison.from_dict(self._json("GET", f"/jobs/{job_a}/compare/{job_b}", params=params))

    def checkpoints(self) -> list[dict[str, Any]]:
        """``GET /checkpoints``: name, kind, sha256, parameters, config, fits_16mb, ... of each."""
        return self._json("GET", "/checkpoints")["checkpoints"]

    def checkpoint(self, name: str) -> dict[str, Any]:
        """``GET /checkpoints/{name}``."""
        return self._json("GET", f"/checkpoints/{name}")

    def datasets(self) -> list[dict[str, Any]]:
        """``GET /datasets``: name, tokenizer, val_tokens, fingerprint, ... of each."""
        return self._json("GET", "/datasets")["datasets"]

    # ---- transport --------------------------------------------------------------------------------------------
    def _json(self, method: str, path: str, *, ok: tuple[int, ...] = (200,), **kwargs: Any) -> Any:
        response = self._request(method, path, ok=ok, **kwargs)
        try:
            return response.json()
        except ValueError as exc:
            raise RequestError(
                f"answer is not JSON: {response.text[:200]!r}",
                status=response.status_code,
                code="bad_response",
                url=str(response.url),
            ) from exc

    def _request(
        self,
        method: str,
        path: str,
        *,
        ok: tuple[int, ...] = (200,),
        retry_statuses: frozenset[int] = RETRY_STATUSES,
        stream: bool = False,
        **kwargs: Any,
    ) -> httpx.Response:
        url = self.base_url + path
        attempt = 0
        while True:
            last = attempt == self.retry.attempts - 1
            try:
                request = self._http.build_request(method, path, **kwargs)
                response = self._http.send(request, stream=stream)
            except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
                retry_after, failure = None, exc  # nothing reached the server: safe to retry any method
            except httpx.TransportError as exc:
                if method not in _IDEMPOTENT:
                    raise ServerUnreachable(_describe(exc), code="connection_lost", url=url) from exc
                retry_after, failure = None, exc
            else:
                if response.status_code in ok:
                    return response
                if stream:
                    response.read()
                if response.status_code not in retry_statuses or last:
                    raise _api_error(response)
                retry_after, failure = parse_retry_after(response.headers.get("Retry-After")), None
                response.close()
            if last:
                raise ServerUnreachable(
                    f"{_describe(failure)} (gave up after {self.retry.attempts} attempts)",
                    code="unreachable",
                    url=url,
                ) from failure
            self._sleep(self.retry.delay(attempt, self._rng, retry_after))
            attempt += 1


def _describe(exc: BaseException | None) -> str:
    text = str(exc) or type(exc).__name__
    return f"cannot connect: {text}" if isinstance(exc, httpx.ConnectError) else text


def _api_error(response: httpx.Response) -> RequestError:
    """The error the server sent, from the contract's ``{"error": {"code", "message", "detail"}}`` body."""
    status = response.status_code
    try:
        error = response.json()["error"]
        code, message, detail = str(error["code"]), str(error["message"]), error.get("detail")
    except (ValueError, KeyError, TypeError):
        code, message, detail = f"http_{status}", response.text[:200] or response.reason_phrase, None
    field_name = detail.get("field") if isinstance(detail, dict) else None
    return RequestError(
        message, status=status, code=code, field=field_name, detail=detail, url=str(response.request.url)
    )
