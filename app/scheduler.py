"""Scheduling: the queue of live jobs, fair FIFO dispatch onto the workers, their reports, progress, events,
and writing final jobs to the store. No HTTP here: refusals are ``service_errors``.

Everything here runs on the server's event loop (worker reports are handed to it by the pool), so the
in-memory view of live jobs needs no locks; the store is the durable record. Scheduling is strict FIFO:
the oldest queued job runs as soon as enough workers are idle for its ``gpus``, and no later job jumps
ahead of it, so a big (ganged) job is never starved by a stream of small ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import socket
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any

from pgttt.api.units import UnitsError, UnitSums

from .messages import (
    JobCancelled,
    JobDone,
    JobFailed,
    Loaded,
    LoadFailed,
    ProgressReport,
    Report,
    RunOrder,
    StateReport,
)
from .metrics import Metrics
from .service_errors import JobFinished, NotFound, QueueFull
from .store import JobRecord, JobStore, StorageError, StoreError, utc_now
from .workers import GANG_GRACE_S, Worker, WorkerPool

log = logging.getLogger("pgttt.app")

PROGRESS_PERSIST_S = 1.0
STORE_RETRY_S = 2.0  # how often a finished job the database refused is written again
KEEPALIVE_S = 15.0


def finite(value: Any) -> Any:
    """JSON has no NaN or infinity (a diverged TTT run): they are given as null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value


class Scheduler:
    """Live jobs (queued and running) and the workers that run them. ``served(checkpoint, dataset)`` says
    whether a job's inputs are still served: the dataset's spec for its workers, or None."""

    def __init__(
        self,
        store: JobStore,
        metrics: Metrics,
        *,
        queue_limit: int,
        served: Callable[[str, str], Any | None],
        **pool: Any,
    ) -> None:
        self.store, self.metrics, self.queue_limit, self._served = store, metrics, queue_limit, served
        self.pool = WorkerPool(**pool, on_report=self._on_report, on_exit=self._on_exit)
        self.live: dict[str, JobRecord] = {}  # queued and running jobs, progress current
        self.pending: deque[str] = deque()
        self.unsaved: dict[str, None] = {}  # final jobs the database refused (disk full), oldest first
        self._retry: asyncio.TimerHandle | None = None
        self._subscribers: dict[str, set[asyncio.Queue]] = {}
        self._persisted_at: dict[str, float] = {}
        self._started = False
        self.closing = False

    # ---- life cycle -----------------------------------------------------------------------
    def requeue(self, queued: list[JobRecord]) -> None:
        """Jobs left queued by the last run, oldest first: they run once the workers have started."""
        for job in queued:
            self.live[job.id] = job
            self.pending.append(job.id)

    def start(self) -> None:
        self._started = True
        self.pool.start()
        self.dispatch()

    async def stop(self) -> None:
        await asyncio.to_thread(self.pool.stop)
        if self._retry is not None:
            self._retry.cancel()
        for job_id in list(self.unsaved):
            self._save(job_id, last=True)

    @property
    def alive(self) -> int:
        return sum(w.state != "failed" for w in self.pool.workers)

    # ---- jobs -----------------------------------------------------------------------------
    def get(self, job_id: str) -> JobRecord:
        job = self.live.get(job_id) or self.store.get(job_id)
        if job is None:
            raise NotFound("job", job_id)
        return job

    def list(self, **filters: Any) -> tuple[list[JobRecord], int]:
        jobs, total = self.store.list(**filters)
        return [self.live.get(j.id, j) for j in jobs], total

    def enqueue(self, job: JobRecord) -> JobRecord:
        if len(self.pending) >= self.queue_limit:
            raise QueueFull(len(self.pending))
        self.store.create(job)
        self.live[job.id] = job
        self.pending.append(job.id)
        self.dispatch()
        return self.live.get(job.id, job)

    def cancel(self, job_id: str) -> JobRecord:
        job = self.get(job_id)
        if job.final:
            raise JobFinished(job_id, job.state)
        if job.state == "queued":
            with contextlib.suppress(ValueError):
                self.pending.remove(job_id)
            self._finish(job_id, "cancelled", error={"code": "cancelled", "message": "cancelled while queued"})
            return self.get(job_id)
        if not job.cancel_requested:
            job.cancel_requested = True
            self.pool.cancel(job_id)
            with contextlib.suppress(StorageError):  # the flag is in memory; the final state is what must last
                self.store.request_cancel(job_id)
            self._publish(job_id, "state")
        return job

    async def wait(self, job_id: str, timeout: float) -> JobRecord:
        """The job once final, or as it is when ``timeout`` seconds have passed."""
        async with contextlib.aclosing(self.events(job_id, timeout=timeout)) as events:
            async for _event, job in events:
                if job.final:
                    return job
        return self.get(job_id)

    async def events(self, job_id: str, timeout: float | None = None) -> AsyncIterator[tuple[str, JobRecord]]:
        """("state", job) now, then ("progress"/"state", job) as they happen, ("end", job) after a final
        state; ("keepalive", job) every KEEPALIVE_S of silence. Stops at ``timeout`` if given."""
        queue: asyncio.Queue = asyncio.Queue()
        self._subscribers.setdefault(job_id, set()).add(queue)
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            job = self.get(job_id)
            yield "state", job
            if job.final:
                yield "end", job
                return
            if self.closing:
                return
            while True:
                wait = KEEPALIVE_S if deadline is None else min(KEEPALIVE_S, deadline - time.monotonic())
                if wait <= 0:
                    return
                try:
                    event = await asyncio.wait_for(queue.get(), wait)
                except TimeoutError:
                    if deadline is None or time.monotonic() < deadline:
                        yield "keepalive", self.get(job_id)
                    continue
                if event == "closing":
                    return
                job = self.get(job_id)
                # Events queued before the final state are read after it: the last one is a state event.
                yield ("state" if job.final else event), job
                if job.final:
                    yield "end", job
                    return
        finally:
            subs = self._subscribers.get(job_id)
            if subs is not None:
                subs.discard(queue)
                if not subs:
                    del self._subscribers[job_id]

    def close_streams(self) -> None:
        """The server is stopping: end every event stream and wait now (open requests hold up its exit)."""
        self.closing = True
        for queues in self._subscribers.values():
            for queue in queues:
                queue.put_nowait("closing")

    def _publish(self, job_id: str, event: str) -> None:
        for queue in self._subscribers.get(job_id, ()):
            queue.put_nowait(event)

    # ---- dispatch -------------------------------------------------------------------------
    def dispatch(self) -> None:
        if not self._started:
            return
        self._dispatch_jobs()
        if not self.pending:  # jobs first: the graphs a start left out compile when nothing waits
            self.pool.warm_rest()

    def _dispatch_jobs(self) -> None:
        while self.pending:
            job = self.live[self.pending[0]]
            alive = self.alive
            if job.gpus > alive:
                self.pending.popleft()
                self._finish(
                    job.id,
                    "failed",
                    error={"code": "no_workers", "message": f"needs {job.gpus} workers; {alive} are alive"},
                )
                continue
            dataset = self._served(job.checkpoint, job.dataset)
            if dataset is None:
                self.pending.popleft()
                self._finish(
                    job.id,
                    "failed",
                    error={
                        "code": "not_served",
                        "message": f"checkpoint {job.checkpoint!r} or dataset {job.dataset!r} is no longer served",
                    },
                )
                continue
            idle = self.pool.idle()
            if len(idle) < job.gpus:
                return  # strict FIFO: the head job waits; nothing behind it jumps ahead
            try:
                started = self.store.mark_running(job.id)
            except StorageError as exc:
                log.error("job %s cannot start: %s (retried in %g s)", job.id, exc, STORE_RETRY_S)
                self._retry_later()
                return  # it stays at the head of the queue
            self.pending.popleft()
            if not started:
                self.live.pop(job.id, None)
                continue
            job.state, job.started_at = "running", utc_now()
            workers = idle[: job.gpus]
            init_method = f"tcp://127.0.0.1:{_free_port()}" if job.gpus > 1 else None
            for rank, worker in enumerate(workers):
                order = RunOrder(job.id, job.checkpoint, dataset, job.config, rank, job.gpus, init_method)
                self.pool.run(worker, order)
            self._publish(job.id, "state")

    def _on_report(self, worker: Worker, report: Report) -> None:
        match report:
            case StateReport(state="idle"):
                self.dispatch()
            case ProgressReport(job_id, progress) if job_id in self.live:
                self._progress(job_id, progress)
            case JobDone(job_id, rank=0, result=result):
                self._finish(job_id, "succeeded", result=self._keep_units(job_id, result))
            case JobFailed(job_id, code=code, message=message):
                self._finish(job_id, "failed", error={"code": code, "message": message})
            case JobCancelled(job_id):
                self._finish(job_id, "cancelled", error={"code": "cancelled", "message": "cancelled while running"})
            case Loaded(name):
                log.info("worker %d (%s) loaded %s", worker.index, worker.device, name)
            case LoadFailed(name, message):
                log.error("worker %d (%s) could not load %s: %s", worker.index, worker.device, name, message)

    def _keep_units(self, job_id: str, result: dict[str, Any]) -> dict[str, Any]:
        """The result's per-unit sums (a units file's bytes, from the worker) go to their own file; the JSON keeps
        what they are and which job's file holds them (a cached job's are its source job's)."""
        data = result.pop("units", None)
        if data is None:
            return result
        try:
            units = UnitSums.from_bytes(data, name=f"units of job {job_id}")
            self.store.save_units(job_id, units)
        except (UnitsError, StoreError) as exc:
            log.error("job %s: its per-unit sums are not kept: %s", job_id, exc)
            return result
        return {
            **result,
            "units": {"kind": units.kind, "count": len(units), "identity": units.identity(), "job": job_id},
        }

    def _on_exit(self, worker: Worker, job_id: str | None, reason: str) -> None:
        if job_id is not None:
            self._finish(job_id, "failed", error={"code": "worker_died", "message": reason})
        self.dispatch()

    def _progress(self, job_id: str, progress: dict[str, Any]) -> None:
        job = self.live[job_id]
        job.progress = progress
        now = time.monotonic()
        if now - self._persisted_at.get(job_id, 0.0) >= PROGRESS_PERSIST_S:
            self._persisted_at[job_id] = now
            with contextlib.suppress(StorageError):  # progress is a convenience; the API has the live value
                self.store.set_progress(job_id, progress)
        self._publish(job_id, "progress")

    # ---- final jobs -----------------------------------------------------------------------
    def _finish(self, job_id: str, state: str, *, result: dict | None = None, error: dict | None = None) -> None:
        job = self.live.get(job_id)
        if job is None or job.final:
            return  # already final (a late report from a gang member)
        self._persisted_at.pop(job_id, None)
        job.state, job.finished_at, job.result, job.error = state, utc_now(), result, error
        self._save(job_id)
        self.metrics.job_finished(job)
        self._publish(job_id, "state")
        # A worker still on a finished job (a gang peer stuck in a collective with a dead or failed rank)
        # gets a grace, then is killed and restarted.
        asyncio.get_running_loop().call_later(GANG_GRACE_S, self.pool.kill, job_id)

    def _save(self, job_id: str, last: bool = False) -> None:
        """Write a final job to the store, then let go of it. While the database refuses (disk full) it is
        kept in memory, shown with ``stored: false``, and written again every STORE_RETRY_S."""
        job = self.live[job_id]
        try:
            self.store.finish(
                job_id,
                job.state,
                result=job.result,
                error=job.error,
                progress=job.progress,
                finished_at=job.finished_at,
            )
        except StorageError as exc:
            if last:
                log.error(
                    "job %s %s but could not be stored (%s); it is lost with this process. Its result: %s",
                    job_id,
                    job.state,
                    exc,
                    json.dumps(finite(job.result)),
                )
                return
            if job_id not in self.unsaved:
                log.error(
                    "job %s %s but could not be stored: %s; kept in memory, retried every %g s",
                    job_id,
                    job.state,
                    exc,
                    STORE_RETRY_S,
                )
            job.stored = False
            self.unsaved[job_id] = None
            self._retry_later()
            return
        self.unsaved.pop(job_id, None)
        self.live.pop(job_id, None)

    def _retry_later(self) -> None:
        if self._retry is None and not self.closing:
            self._retry = asyncio.get_running_loop().call_later(STORE_RETRY_S, self._retry_store)

    def _retry_store(self) -> None:
        self._retry = None
        for job_id in list(self.unsaved):
            self._save(job_id)
            if job_id in self.unsaved:
                return  # still refused: _save has scheduled the next try
        self.dispatch()  # a job that could not be marked running waits at the head of the queue


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
