"""The job service: submissions, the result cache, fair FIFO scheduling onto workers, progress and events.

Everything here runs on the server's event loop (worker reports are handed to it by the pool), so the
in-memory view of live jobs needs no locks; the store is the durable record. Scheduling is strict FIFO:
the oldest queued job runs as soon as enough workers are idle for its ``gpus``, and no later job jumps
ahead of it, so a big (ganged) job is never starved by a stream of small ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import logging
import math
import socket
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any

from pgttt.api.units import UnitsError, UnitSums

from . import engine_bridge as bridge
from .catalog import Catalog
from .errors import ApiError, invalid_field, not_found
from .metrics import Metrics
from .registrar import Registrar
from .schemas import EvalRequest
from .settings import Settings
from .store import JobRecord, JobStore, StorageError, StoreError, lock_state_dir, new_job_id, utc_now
from .workers import GANG_GRACE_S, RunOrder, Worker, WorkerPool

log = logging.getLogger("pgttt.app")

PROGRESS_PERSIST_S = 1.0
STORE_RETRY_S = 2.0  # how often a finished job the database refused is written again
RETRY_AFTER_S = 5
KEEPALIVE_S = 15.0


def job_to_api(job: JobRecord) -> dict[str, Any]:
    """The API's job object. JSON has no NaN or infinity (a diverged TTT run): they are given as null."""
    data = finite(dataclasses.asdict(job))
    data.pop("cache_key")
    data["url"] = f"/jobs/{job.id}"
    return data


def finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value


class Service:
    def __init__(self, settings: Settings, engine_factory: Callable[[str], Any] | None = None) -> None:
        self.settings = settings
        self.devices = settings.resolved_devices()
        # One server per state dir: a second one would fail this one's running jobs at its start.
        self._state_lock = lock_state_dir(settings.state_dir)
        try:
            self.store = JobStore(settings.database_path)
        except BaseException:
            self._state_lock.close()
            raise
        self.registrar = Registrar(self)
        self.unsaved: dict[str, None] = {}  # final jobs the database refused (disk full), oldest first
        self._retry: asyncio.TimerHandle | None = None
        self.catalog: Catalog | None = None
        self.catalog_error: str | None = None
        self.live: dict[str, JobRecord] = {}  # queued and running jobs, progress current
        self.pending: deque[str] = deque()
        self._subscribers: dict[str, set[asyncio.Queue]] = {}
        self._persisted_at: dict[str, float] = {}
        self.metrics = Metrics(self)
        self.pool = WorkerPool(
            self.devices,
            engine_factory or functools.partial(bridge.DeviceEngine,
                                                world_sizes=bridge.warmed_world_sizes(len(self.devices)),
                                                cuda_graphs=settings.cuda_graphs),
            checkpoints=lambda: self.catalog.specs() if self.catalog else [],
            on_report=self._on_report,
            on_exit=self._on_exit,
            warmup=settings.warmup,
        )
        self._startup: asyncio.Task | None = None
        self._closing = False

    # ---- life cycle -----------------------------------------------------------------------
    async def start(self) -> None:
        """Recover the store, then find checkpoints and start workers in the background."""
        queued, failed = self.store.recover()
        for job_id in failed:
            log.warning("job %s was running when the server stopped: marked failed", job_id)
        for job in queued:
            self.live[job.id] = job
            self.pending.append(job.id)
        if queued:
            log.info("re-queued %d job(s) from the last run", len(queued))
        self._startup = asyncio.create_task(self._load())

    async def _load(self) -> None:
        self.registrar.clear_incoming()
        catalog = Catalog([*self.settings.checkpoint_dirs, self.settings.upload_dir], [*self.settings.data_dirs])
        registered = self.store.registrations()
        try:
            await asyncio.to_thread(catalog.discover, registered)
        except Exception as exc:  # noqa: BLE001 - reported on /readyz, the server stays up
            self.catalog_error = f"{type(exc).__name__}: {exc}"
            log.exception("discovery failed")
            return
        log.info("serving %d checkpoint(s) %s and %d dataset(s) %s on %s", len(catalog.checkpoints),
                 sorted(catalog.checkpoints), len(catalog.datasets), sorted(catalog.datasets), self.devices)
        self.catalog = catalog
        self.pool.start()
        self._dispatch()

    async def stop(self) -> None:
        if self._startup is not None and not self._startup.done():
            self._startup.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._startup
        await asyncio.to_thread(self.pool.stop)
        if self._retry is not None:
            self._retry.cancel()
        for job_id in list(self.unsaved):
            self._save(job_id, last=True)
        self.store.close()
        self._state_lock.close()

    # ---- readiness ------------------------------------------------------------------------
    def readiness(self) -> dict[str, Any]:
        workers = [{"device": w.device, "state": w.state, "job_id": w.job_id} for w in self.pool.workers]
        ready = self.catalog is not None and all(w.ready for w in self.pool.workers)
        problems = list(self.catalog.problems) if self.catalog else []
        if self.catalog_error:
            problems.append(self.catalog_error)
        if self.unsaved:
            problems.append(f"the job database cannot be written: {len(self.unsaved)} finished job(s) are held in "
                            f"memory (stored: false) and written again every {STORE_RETRY_S:g} s")
        return {"ready": ready, "workers": workers, "problems": problems}

    def require_catalog(self) -> Catalog:
        if self.catalog is None:
            message = "still loading checkpoints" if self.catalog_error is None else self.catalog_error
            raise ApiError(503, "not_ready", f"not ready: {message}", self.readiness(),
                           headers={"Retry-After": str(RETRY_AFTER_S)})
        return self.catalog

    # ---- jobs -----------------------------------------------------------------------------
    def get(self, job_id: str) -> JobRecord:
        job = self.live.get(job_id) or self.store.get(job_id)
        if job is None:
            raise not_found("job", job_id)
        return job

    def list_jobs(self, **filters: Any) -> tuple[list[JobRecord], int]:
        jobs, total = self.store.list(**filters)
        return [self.live.get(j.id, j) for j in jobs], total

    def submit(self, req: EvalRequest) -> tuple[JobRecord, bool]:
        """A new queued job, or (cached=True) a finished one answered from the result cache."""
        catalog = self.require_catalog()
        ckpt = catalog.checkpoints.get(req.checkpoint)
        if ckpt is None:
            raise not_found("checkpoint", req.checkpoint)
        dataset = catalog.datasets.get(req.dataset)
        if dataset is None:
            raise not_found("dataset", req.dataset)
        alive = sum(w.state != "failed" for w in self.pool.workers)
        if alive == 0:
            raise ApiError(503, "no_workers", "no worker is alive: every one failed to start (see the server log)",
                           self.readiness())
        if req.gpus > alive:
            raise invalid_field("gpus", f"asks for {req.gpus} workers; this server has {alive} ({self.devices})",
                                req.gpus)
        fields = {k: v for k in bridge.EVAL_FIELDS if (v := getattr(req, k)) is not None}
        try:
            config = bridge.resolve_eval_config(fields, ckpt.info, dataset.info, self.devices[0])
        except bridge.FieldError as exc:
            raise invalid_field(exc.field, str(exc), fields.get(exc.field)) from None
        key = bridge.cache_key(ckpt.info, dataset.info, config)
        now = utc_now()
        job = JobRecord(id=new_job_id(), state="queued", checkpoint=req.checkpoint, dataset=req.dataset,
                        request=fields, gpus=req.gpus, created_at=now, config=config, cache_key=key)
        if not req.force and (hit := self.store.find_cached(key)) is not None:
            job = dataclasses.replace(job, state="succeeded", cached=True, started_at=now, finished_at=now,
                                      progress=hit.progress, result=hit.result)
            self.store.create(job)
            self.metrics.cache_hits.inc()
            return job, True
        if len(self.pending) >= self.settings.queue_limit:
            raise ApiError(429, "queue_full", f"the queue is full ({len(self.pending)} jobs waiting); retry later",
                           {"queued": len(self.pending)}, headers={"Retry-After": str(RETRY_AFTER_S)})
        self.store.create(job)
        self.live[job.id] = job
        self.pending.append(job.id)
        self._dispatch()
        return self.live.get(job.id, job), False

    def cancel(self, job_id: str) -> JobRecord:
        job = self.get(job_id)
        if job.final:
            raise ApiError(409, "job_finished", f"job {job_id} has already {job.state}; nothing to cancel",
                           {"state": job.state})
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
            if self._closing:
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
        self._closing = True
        for queues in self._subscribers.values():
            for queue in queues:
                queue.put_nowait("closing")

    def _publish(self, job_id: str, event: str) -> None:
        for queue in self._subscribers.get(job_id, ()):
            queue.put_nowait(event)

    # ---- checkpoints ----------------------------------------------------------------------
    def checkpoint_api(self, name: str) -> dict[str, Any]:
        entry = self.require_catalog().checkpoints.get(name)
        if entry is None:
            raise not_found("checkpoint", name)
        return entry.to_api(self.devices)

    # ---- scheduling -----------------------------------------------------------------------
    def _dispatch(self) -> None:
        if self.catalog is None:
            return
        while self.pending:
            job = self.live[self.pending[0]]
            alive = sum(w.state != "failed" for w in self.pool.workers)
            if job.gpus > alive:
                self.pending.popleft()
                self._finish(job.id, "failed", error={
                    "code": "no_workers", "message": f"needs {job.gpus} workers; {alive} are alive"})
                continue
            if job.checkpoint not in self.catalog.checkpoints or job.dataset not in self.catalog.datasets:
                self.pending.popleft()
                self._finish(job.id, "failed", error={
                    "code": "not_served",
                    "message": f"checkpoint {job.checkpoint!r} or dataset {job.dataset!r} is no longer served"})
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
            dataset = self.catalog.datasets[job.dataset].spec
            for rank, worker in enumerate(workers):
                order = RunOrder(job.id, job.checkpoint, dataset, job.config, rank, job.gpus, init_method)
                self.pool.run(worker, order)
            self._publish(job.id, "state")

    def _on_report(self, worker: Worker, report: dict[str, Any]) -> None:
        op = report["op"]
        job_id = report.get("job_id")
        if op == "state" and report["state"] == "idle":
            self._dispatch()
        elif op == "progress" and job_id in self.live:
            self._progress(job_id, report["progress"])
        elif op == "done" and report.get("rank", 0) == 0:
            self._finish(job_id, "succeeded", result=self._keep_units(job_id, report["result"]))
        elif op == "failed":
            self._finish(job_id, "failed", error={"code": report["code"], "message": report["message"]})
        elif op == "cancelled":
            self._finish(job_id, "cancelled", error={"code": "cancelled", "message": "cancelled while running"})
        elif op == "load_failed":
            log.error("worker %d (%s) could not load %s: %s", worker.index, worker.device, report["name"],
                      report["message"])

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
        return {**result, "units": {"kind": units.kind, "count": len(units), "identity": units.identity(),
                                    "job": job_id}}

    def _on_exit(self, worker: Worker, job_id: str | None, reason: str) -> None:
        if job_id is not None:
            self._finish(job_id, "failed", error={"code": "worker_died", "message": reason})
        self._dispatch()

    def _progress(self, job_id: str, progress: dict[str, Any]) -> None:
        job = self.live[job_id]
        job.progress = progress
        now = time.monotonic()
        if now - self._persisted_at.get(job_id, 0.0) >= PROGRESS_PERSIST_S:
            self._persisted_at[job_id] = now
            with contextlib.suppress(StorageError):  # progress is a convenience; the API has the live value
                self.store.set_progress(job_id, progress)
        self._publish(job_id, "progress")

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
            self.store.finish(job_id, job.state, result=job.result, error=job.error, progress=job.progress,
                              finished_at=job.finished_at)
        except StorageError as exc:
            if last:
                log.error("job %s %s but could not be stored (%s); it is lost with this process. Its result: %s",
                          job_id, job.state, exc, json.dumps(finite(job.result)))
                return
            if job_id not in self.unsaved:
                log.error("job %s %s but could not be stored: %s; kept in memory, retried every %g s", job_id,
                          job.state, exc, STORE_RETRY_S)
            job.stored = False
            self.unsaved[job_id] = None
            self._retry_later()
            return
        self.unsaved.pop(job_id, None)
        self.live.pop(job_id, None)

    def _retry_later(self) -> None:
        if self._retry is None and not self._closing:
            self._retry = asyncio.get_running_loop().call_later(STORE_RETRY_S, self._retry_store)

    def _retry_store(self) -> None:
        self._retry = None
        for job_id in list(self.unsaved):
            self._save(job_id)
            if job_id in self.unsaved:
                return  # still refused: _save has scheduled the next try
        self._dispatch()  # a job that could not be marked running waits at the head of the queue


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

