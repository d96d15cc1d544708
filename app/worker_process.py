"""What runs inside a worker process (``worker_main``, the spawn target): load, warm up, then serve the server's
orders (``messages.py``) until told to stop, sending reports back over the pipe."""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import threading
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from .messages import (
    JobCancelled,
    JobDone,
    JobFailed,
    Loaded,
    LoadFailed,
    LoadOrder,
    Order,
    ProgressReport,
    Report,
    RunOrder,
    StartFailed,
    StateReport,
    StopOrder,
    WarmOrder,
)

log = logging.getLogger("pgttt.app.workers")
PROGRESS_INTERVAL_S = 0.2
GANG_TIMEOUT = timedelta(minutes=10)  # a collective waiting longer for a peer fails the job


class _Reporter:
    """Sends reports to the server; progress is thinned to one every PROGRESS_INTERVAL_S."""

    def __init__(self, conn: multiprocessing.connection.Connection) -> None:
        self.conn, self._last, self._job = conn, 0.0, ""

    def send(self, report: Report) -> None:
        self.conn.send(report)

    def progress(self, job_id: str, progress: dict[str, Any], *, final: bool = False) -> None:
        now = time.monotonic()
        if final or job_id != self._job or now - self._last >= PROGRESS_INTERVAL_S:
            self._last, self._job = now, job_id  # a job's first report always goes
            self.send(ProgressReport(job_id, progress))


def _exit_with_parent() -> None:
    """A worker must not outlive the server (e.g. SIGKILLed): exit when its parent's sentinel fires."""
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch() -> None:
        multiprocessing.connection.wait([parent.sentinel])
        os._exit(0)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _memory(device: str) -> dict[str, int] | None:
    import torch

    if not device.startswith("cuda"):
        return None
    return {"allocated": torch.cuda.memory_allocated(device), "reserved": torch.cuda.memory_reserved(device)}


def worker_main(
    device: str,
    conn: multiprocessing.connection.Connection,
    cancel: Any,
    engine_factory: Callable[[str], Any],
    checkpoints: list[Any],
    warmup: bool,
    threads: int | None,
) -> None:
    """The worker process: load, warm up, then serve orders until told to stop."""
    _exit_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the server, which stops us in order
    import torch

    if threads:
        torch.set_num_threads(threads)
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    report = _Reporter(conn)
    try:
        report.send(StateReport("loading"))
        engine = engine_factory(device)
        for spec in checkpoints:
            engine.load(spec)
        if warmup:
            report.send(StateReport("warming"))
            engine.warmup()
    except Exception as exc:  # noqa: BLE001 - reported to the server, which decides to retry
        report.send(StartFailed(f"{type(exc).__name__}: {exc}", traceback.format_exc()))
        return
    report.send(StateReport("idle", _memory(device)))
    while True:
        try:
            order: Order = conn.recv()
        except (EOFError, OSError):
            return
        match order:
            case StopOrder():
                return
            case LoadOrder(spec):
                try:
                    engine.load(spec)
                    report.send(Loaded(spec.name))
                except Exception as exc:  # noqa: BLE001
                    report.send(LoadFailed(spec.name, f"{type(exc).__name__}: {exc}"))
            case RunOrder():
                _run(engine, order, report, cancel, device)
            case WarmOrder():
                _warm_rest(engine, report, device)


def _warm_rest(engine: Any, report: _Reporter, device: str) -> None:
    """The graphs the start left out. Jobs meanwhile run those shapes uncompiled, so a failure here only
    leaves them so: it is logged, and the worker serves on."""
    try:
        engine.warmup_rest()
    except Exception:  # noqa: BLE001
        log.error("worker on %s: compiling the remaining graphs failed:\n%s", device, traceback.format_exc())
    report.send(StateReport("idle", _memory(device)))


def _run(engine: Any, order: RunOrder, report: _Reporter, cancel: Any, device: str) -> None:
    import torch

    from pgttt.errors import PgtttError
    from pgttt.ttt.distributed import process_group
    from pgttt.ttt.errors import EvalCancelled

    def progress(p: dict[str, Any], final: bool = False) -> None:
        if order.rank == 0:
            report.progress(order.job_id, p, final=final)

    try:
        with contextlib.ExitStack() as group:
            group_s = None
            if order.world_size > 1:
                group_s = group.enter_context(
                    process_group(
                        torch.device(device),
                        init_method=order.init_method,
                        rank=order.rank,
                        world_size=order.world_size,
                        timeout=GANG_TIMEOUT,
                    )
                )
            result = engine.evaluate(order, progress, cancel)
            if group_s is not None:
                result["timings"]["group_s"] = group_s
            report.send(JobDone(order.job_id, order.rank, result if order.rank == 0 else None))
    except EvalCancelled:
        report.send(JobCancelled(order.job_id, order.rank))
    except PgtttError as exc:
        report.send(JobFailed(order.job_id, order.rank, "invalid_input", str(exc)))
    except Exception as exc:  # noqa: BLE001 - a job's failure must not take the worker down
        log.error("job %s failed on %s:\n%s", order.job_id, device, traceback.format_exc())
        report.send(JobFailed(order.job_id, order.rank, "engine_error", f"{type(exc).__name__}: {exc}"))
    finally:
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    report.send(StateReport("idle", _memory(device)))
