"""Worker processes: one per device (spawn context), each loading every checkpoint once and running jobs.

The server process talks to each worker over a pipe (the dataclasses of ``messages.py``): orders in (load a
checkpoint, run a job, compile what the start left out, stop), reports out (state, progress, result,
failure); ``worker_process.py`` is the worker's side. Cancelling is a shared event the engine checks between
batches. A pump thread per worker turns its reports into calls on the server's event loop; a worker that dies
(crash, out of memory, killed) is seen as the pipe closing: its job fails with the reason and the worker is
started again. Several workers can be ganged on one job: they then form a torch.distributed group (gloo on
CPUs, NCCL on GPUs) for one data-parallel evaluation.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .messages import LoadOrder, Report, RunOrder, StartFailed, StateReport, StopOrder, WarmOrder
from .worker_process import worker_main

log = logging.getLogger("pgttt.app.workers")
SPAWN = multiprocessing.get_context("spawn")

# Worker states, as /readyz and /metrics show them. "compiling": ready, compiling what the start left out.
WORKER_STATES = ("starting", "loading", "warming", "idle", "busy", "compiling", "restarting", "failed")
# Seconds before starting a worker again, by how many starts in a row have failed (0: it died in a job).
RESTART_DELAYS_S = (0.0, 1.0, 3.0, 7.0, 15.0)
GANG_GRACE_S = 10.0


@dataclass
class Worker:
    """The server's view of one worker process."""

    index: int
    device: str
    state: str = "starting"
    job_id: str | None = None
    memory: dict[str, int] | None = None
    start_failures: int = 0
    generation: int = 0
    process: Any = field(default=None, repr=False)
    conn: Any = field(default=None, repr=False)
    cancel: Any = field(default=None, repr=False)
    last_error: str | None = None
    warm_pending: bool = False  # the start's warm-up left graphs to a WarmOrder

    @property
    def ready(self) -> bool:
        return self.state in ("idle", "busy", "compiling")


class WorkerPool:
    """Starts, feeds, watches and restarts the workers; reports go to ``on_report(worker, report)``
    and ``on_exit(worker, job_id, reason)`` on the event loop."""

    def __init__(
        self,
        devices: list[str],
        engine_factory: Callable[[str], Any],
        *,
        checkpoints: Callable[[], list[Any]],
        on_report: Callable[[Worker, Report], None],
        on_exit: Callable[[Worker, str | None, str], None],
        warmup: bool = True,
    ) -> None:
        self.workers = [Worker(index=i, device=d) for i, d in enumerate(devices)]
        self._engine_factory, self._checkpoints, self._warmup = engine_factory, checkpoints, warmup
        self._on_report, self._on_exit = on_report, on_exit
        cpu_workers = sum(d == "cpu" for d in devices)
        self._threads = max(1, (os.cpu_count() or 1) // cpu_workers) if cpu_workers else None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = False
        self.restart_delays = RESTART_DELAYS_S

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        for worker in self.workers:
            self._spawn(worker)

    def _spawn(self, worker: Worker) -> None:
        worker.generation += 1
        parent_conn, child_conn = SPAWN.Pipe()
        worker.cancel = SPAWN.Event()
        worker.conn, worker.state, worker.job_id = parent_conn, "starting", None
        worker.warm_pending = self._warmup
        worker.process = SPAWN.Process(
            target=worker_main,
            args=(
                worker.device,
                child_conn,
                worker.cancel,
                self._engine_factory,
                self._checkpoints(),
                self._warmup,
                self._threads if worker.device == "cpu" else None,
            ),
            name=f"pgttt-worker-{worker.index}-{worker.device}",
            daemon=True,
        )
        worker.process.start()
        child_conn.close()
        threading.Thread(
            target=self._pump, args=(worker, parent_conn, worker.generation), name=worker.process.name, daemon=True
        ).start()

    def _pump(self, worker: Worker, conn: Any, generation: int) -> None:
        assert self._loop is not None
        while True:
            try:
                report = conn.recv()
            except (EOFError, OSError):
                break
            if not self._call(self._handle, worker, generation, report):
                return
        self._call(self._exited, worker, generation)

    def _call(self, *args: Any) -> bool:
        """Run on the event loop; False once the loop is closed (the server has stopped)."""
        try:
            self._loop.call_soon_threadsafe(*args)
            return True
        except RuntimeError:
            return False

    def _handle(self, worker: Worker, generation: int, report: Report) -> None:
        # While stopping, reports are dropped: a job cut short by the stop is marked failed at the next start.
        if generation != worker.generation or self._stopping:
            return
        match report:
            case StateReport(state, memory):
                worker.state = state
                if state == "idle":  # started, or done with its job
                    worker.start_failures, worker.job_id = 0, None
                if memory is not None:
                    worker.memory = memory
            case StartFailed(message, trace):
                worker.last_error = message
                log.error("worker %d (%s) failed to start: %s\n%s", worker.index, worker.device, message, trace)
        self._on_report(worker, report)

    def _exited(self, worker: Worker, generation: int) -> None:
        if generation != worker.generation or self._stopping:
            return
        worker.process.join(timeout=5)
        reason = _describe_exit(worker, worker.process.exitcode)
        job_id = worker.job_id
        worker.job_id = None
        # Dying while compiling what the start left out counts too, so that a compile that always kills it ends.
        if worker.state in ("starting", "loading", "warming", "compiling") or worker.last_error:
            worker.start_failures += 1
        log.warning("worker %d (%s) exited: %s", worker.index, worker.device, reason)
        self._on_exit(worker, job_id, reason)
        if worker.start_failures >= len(self.restart_delays):
            worker.state = "failed"
            log.error(
                "worker %d (%s) gave up after %d failed starts", worker.index, worker.device, worker.start_failures
            )
            return
        worker.state = "restarting"
        assert self._loop is not None
        self._loop.call_later(self.restart_delays[worker.start_failures], self._restart, worker, worker.generation)

    def _restart(self, worker: Worker, generation: int) -> None:
        if not self._stopping and worker.generation == generation:
            worker.last_error = None
            self._spawn(worker)

    # ---- orders ---------------------------------------------------------------------------
    def idle(self) -> list[Worker]:
        return [w for w in self.workers if w.state == "idle"]

    def run(self, worker: Worker, order: RunOrder) -> None:
        worker.cancel.clear()  # the worker is idle: nothing can race with this
        worker.state, worker.job_id = "busy", order.job_id
        try:
            worker.conn.send(order)
        except OSError:
            pass  # it just died: its exit report fails the job

    def warm_rest(self) -> None:
        """Send the idle workers whose start left graphs out their ``WarmOrder`` (the scheduler calls this when
        nothing is queued): each is "compiling", ready but not idle, until it reports idle again."""
        for worker in self.idle():
            if worker.warm_pending:
                worker.state, worker.warm_pending = "compiling", False
                try:
                    worker.conn.send(WarmOrder())
                except OSError:
                    pass  # it just died: it starts again

    def load(self, spec: Any) -> None:
        """Tell every live worker to load a newly registered checkpoint (after its current job)."""
        for worker in self.workers:
            if worker.state not in ("failed", "restarting") and worker.process is not None:
                try:
                    worker.conn.send(LoadOrder(spec))
                except OSError:
                    pass  # it is dying; it loads everything when it starts again

    def cancel(self, job_id: str) -> None:
        for worker in self.workers:
            if worker.job_id == job_id:
                worker.cancel.set()

    def kill(self, job_id: str) -> None:
        """Kill the workers still busy with a job (a gang member stuck waiting for a dead peer)."""
        for worker in self.workers:
            if worker.job_id == job_id and worker.process is not None and worker.process.is_alive():
                worker.process.kill()

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping = True
        for worker in self.workers:
            if worker.process is not None and worker.process.is_alive():
                worker.cancel.set()
                try:
                    worker.conn.send(StopOrder())
                except OSError:
                    pass
        deadline = time.monotonic() + timeout
        for worker in self.workers:
            if worker.process is not None:
                worker.process.join(max(0.0, deadline - time.monotonic()))
                if worker.process.is_alive():
                    worker.process.kill()
                    worker.process.join(5)
        # Drop the cancel events now: their semaphores are released here, not left to the resource tracker
        # (uvicorn ends the process by the signal it caught, so exit handlers would not run).
        for worker in self.workers:
            worker.cancel = worker.process = None


def _describe_exit(worker: Worker, code: int | None) -> str:
    where = f"worker on {worker.device} (pid {worker.process.pid})"
    if worker.last_error:
        return f"{where} failed: {worker.last_error}"
    if code is None:
        return f"{where} stopped answering"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        hint = " (killed: out of memory?)" if name == "SIGKILL" else ""
        return f"{where} died from {name}{hint}"
    return f"{where} exited with status {code}"
