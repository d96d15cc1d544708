"""The service: what the routes call. It finds checkpoints and datasets (the catalog), takes submissions
(checked against what is served, answered from the result cache when it can), and hands jobs to the
scheduler. No HTTP here: refusals are ``service_errors``, given their status by ``errors.api_error``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from pgttt.api.compare import CompareError, Comparison, Side, compare
from pgttt.api.schemas import EvalRequest
from pgttt.api.units import UnitsError

from . import engine_bridge as bridge
from .catalog import Catalog
from .metrics import Metrics
from .registrar import Registrar
from .scheduler import STORE_RETRY_S, Scheduler, finite
from .service_errors import InvalidField, JobNotSucceeded, NotComparable, NotFound, NotReady, NoUnits, NoWorkers
from .settings import Settings
from .store import JobRecord, JobStore, lock_state_dir, new_job_id, utc_now

log = logging.getLogger("pgttt.app")


def job_to_api(job: JobRecord) -> dict[str, Any]:
    """The API's job object. JSON has no NaN or infinity (a diverged TTT run): they are given as null."""
    data = finite(dataclasses.asdict(job))
    data.pop("cache_key")
    data["url"] = f"/jobs/{job.id}"
    return data


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
        self.catalog: Catalog | None = None
        self.catalog_error: str | None = None
        self.metrics = Metrics(self)
        self.scheduler = Scheduler(
            self.store,
            self.metrics,
            queue_limit=settings.queue_limit,
            served=self._served,
            devices=self.devices,
            engine_factory=engine_factory
            or functools.partial(
                bridge.DeviceEngine,
                world_sizes=bridge.warmed_world_sizes(len(self.devices)),
                cuda_graphs=settings.cuda_graphs,
                compile_cache=settings.compile_cache_dir,
            ),
            checkpoints=lambda: self.catalog.specs() if self.catalog else [],
            warmup=settings.warmup,
        )
        self.pool = self.scheduler.pool
        self._startup: asyncio.Task | None = None

    # ---- life cycle -----------------------------------------------------------------------
    async def start(self) -> None:
        """Recover the store, then find checkpoints and start workers in the background."""
        queued, failed = self.store.recover()
        for job_id in failed:
            log.warning("job %s was running when the server stopped: marked failed", job_id)
        self.scheduler.requeue(queued)
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
        log.info(
            "serving %d checkpoint(s) %s and %d dataset(s) %s on %s",
            len(catalog.checkpoints),
            sorted(catalog.checkpoints),
            len(catalog.datasets),
            sorted(catalog.datasets),
            self.devices,
        )
        self.catalog = catalog
        self.scheduler.start()

    async def stop(self) -> None:
        if self._startup is not None and not self._startup.done():
            self._startup.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._startup
        await self.scheduler.stop()
        self.store.close()
        self._state_lock.close()

    def _served(self, checkpoint: str, dataset: str) -> bridge.DatasetSpec | None:
        catalog = self.catalog
        if catalog is None or checkpoint not in catalog.checkpoints or dataset not in catalog.datasets:
            return None
        return catalog.datasets[dataset].spec

    # ---- readiness ------------------------------------------------------------------------
    def readiness(self) -> dict[str, Any]:
        workers = [{"device": w.device, "state": w.state, "job_id": w.job_id} for w in self.pool.workers]
        ready = self.catalog is not None and all(w.ready for w in self.pool.workers)
        problems = list(self.catalog.problems) if self.catalog else []
        if self.catalog_error:
            problems.append(self.catalog_error)
        if self.scheduler.unsaved:
            problems.append(
                f"the job database cannot be written: {len(self.scheduler.unsaved)} finished job(s) "
                f"are held in memory (stored: false) and written again every {STORE_RETRY_S:g} s"
            )
        return {"ready": ready, "workers": workers, "problems": problems}

    def require_catalog(self) -> Catalog:
        if self.catalog is None:
            message = "still loading checkpoints" if self.catalog_error is None else self.catalog_error
            raise NotReady(f"not ready: {message}", self.readiness())
        return self.catalog

    # ---- jobs -----------------------------------------------------------------------------
    def submit(self, req: EvalRequest) -> tuple[JobRecord, bool]:
        """A new queued job, or (cached=True) a finished one answered from the result cache."""
        catalog = self.require_catalog()
        ckpt = catalog.checkpoints.get(req.checkpoint)
        if ckpt is None:
            raise NotFound("checkpoint", req.checkpoint)
        dataset = catalog.datasets.get(req.dataset)
        if dataset is None:
            raise NotFound("dataset", req.dataset)
        alive = self.scheduler.alive
        if alive == 0:
            raise NoWorkers("no worker is alive: every one failed to start (see the server log)", self.readiness())
        if req.gpus > alive:
            raise InvalidField(
                "gpus", f"gpus: asks for {req.gpus} workers; this server has {alive} ({self.devices})", req.gpus
            )
        fields = {k: v for k in bridge.EVAL_FIELDS if (v := getattr(req, k)) is not None}
        try:
            config = bridge.resolve_eval_config(fields, ckpt.info, dataset.info, self.devices[0])
        except bridge.FieldError as exc:
            raise InvalidField(exc.field or "config", str(exc), exc.value) from None
        key = bridge.cache_key(ckpt.info, dataset.info, config)
        now = utc_now()
        job = JobRecord(
            id=new_job_id(),
            state="queued",
            checkpoint=req.checkpoint,
            dataset=req.dataset,
            request=fields,
            gpus=req.gpus,
            created_at=now,
            config=config,
            cache_key=key,
        )
        if not req.force and (hit := self.store.find_cached(key)) is not None:
            job = dataclasses.replace(
                job,
                state="succeeded",
                cached=True,
                started_at=now,
                finished_at=now,
                progress=hit.progress,
                result=hit.result,
            )
            self.store.create(job)
            self.metrics.cache_hits.inc()
            return job, True
        return self.scheduler.enqueue(job), False

    def get(self, job_id: str) -> JobRecord:
        return self.scheduler.get(job_id)

    def list_jobs(self, **filters: Any) -> tuple[list[JobRecord], int]:
        return self.scheduler.list(**filters)

    def cancel(self, job_id: str) -> JobRecord:
        return self.scheduler.cancel(job_id)

    async def compare(self, job_a: str, job_b: str, **options: Any) -> Comparison:
        """The paired comparison of two succeeded jobs' units (``options``: ``pgttt.api.compare.compare``'s)."""
        a, b = self._side(job_a), self._side(job_b)
        try:  # the bootstrap takes a second on 50k documents: off the event loop
            return await asyncio.to_thread(compare, a, b, **options)
        except CompareError as exc:
            raise NotComparable(str(exc), exc.field, exc.a, exc.b) from None

    def _side(self, job_id: str) -> Side:
        """A succeeded job's result and units, or the refusal saying why it has none to compare."""
        job = self.get(job_id)
        if job.state != "succeeded" or job.result is None:
            raise JobNotSucceeded(job_id, job.state)
        entry = job.result.get("units")
        source = entry.get("job") if isinstance(entry, dict) else None
        try:
            units = self.store.load_units(source) if isinstance(source, str) else None
        except (UnitsError, OSError) as exc:
            raise NoUnits(job_id, unreadable=str(exc)) from None
        if units is None:
            raise NoUnits(job_id)
        return Side.from_result(job_id, job.result, units, checkpoint=job.checkpoint)

    async def wait(self, job_id: str, timeout: float) -> JobRecord:
        return await self.scheduler.wait(job_id, timeout)

    def events(self, job_id: str, timeout: float | None = None) -> AsyncIterator[tuple[str, JobRecord]]:
        return self.scheduler.events(job_id, timeout)

    def close_streams(self) -> None:
        self.scheduler.close_streams()

    # ---- checkpoints ----------------------------------------------------------------------
    def checkpoint_api(self, name: str) -> dict[str, Any]:
        entry = self.require_catalog().checkpoints.get(name)
        if entry is None:
            raise NotFound("checkpoint", name)
        return entry.to_api(self.devices)
