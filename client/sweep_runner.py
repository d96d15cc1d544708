"""The sweep runner: a spec's points against one or more servers over HTTP, every result saved as it finishes.

The points spread over the servers from one queue, at most ``concurrency`` jobs in flight per server; each
finished point is appended to ``OUT/results.jsonl`` (:class:`pgttt.client.results.ResultsFile`), so a rerun
submits only what is missing. It survives server restarts by retrying and resubmitting, drops a server that
stays unreachable, and cancels its jobs on Ctrl-C. It speaks only HTTP (:mod:`pgttt.client.client`): no torch.
"""

from __future__ import annotations

import queue
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from pgttt.client.client import Client, RemoteJob, RequestError, ServerUnreachable
from pgttt.client.results import ResultsFile, make_record
from pgttt.client.retry import RetryPolicy
from pgttt.client.sweep_spec import Point, SweepError


@dataclass
class _Item:
    point: Point
    attempts: int = 0
    errors: list[str] = field(default_factory=list)


@dataclass
class SweepOutcome:
    """What a run did: points already in the results before, finished now, failed (point, reason), servers lost."""

    already: int = 0
    done: int = 0
    failed: list[tuple[Point, str]] = field(default_factory=list)
    dead: dict[str, str] = field(default_factory=dict)
    interrupted: bool = False
    cancelled: int = 0


class SweepRunner:
    """Runs points against servers: ``concurrency`` jobs in flight per server, one shared queue of points.

    A point whose job fails (or vanishes, e.g. the server restarted without its store) is resubmitted, up to
    ``max_attempts`` jobs; a server that stops answering is dropped (its points go to the others) and named.
    """

    def __init__(
        self,
        servers: list[str],
        out_dir: Path,
        *,
        concurrency: int = 2,
        api_key: str | None = None,
        retry: RetryPolicy | None = None,
        poll_s: float = 0.5,
        ready_timeout_s: float = 600.0,
        max_attempts: int = 3,
        force: bool = False,
        progress: bool = True,
        client_factory: Callable[[str], Client] | None = None,
    ) -> None:
        if not servers:
            raise SweepError("no server given: pass --server URL (one or more)")
        for flag, value in (("--concurrency", concurrency), ("--max-attempts", max_attempts)):
            if value < 1:
                raise SweepError(f"{flag} {value}: must be at least 1")
        for flag, value in (("--poll-s", poll_s), ("--ready-timeout-s", ready_timeout_s)):
            if not value > 0:
                raise SweepError(f"{flag} {value}: must be a positive number of seconds")
        self.servers = list(dict.fromkeys(s.rstrip("/") for s in servers))
        self.results = ResultsFile(out_dir / "results.jsonl")
        self.concurrency, self.poll_s, self.ready_timeout_s = concurrency, poll_s, ready_timeout_s
        self.max_attempts, self.force, self.progress = max_attempts, force, progress
        retry = retry or RetryPolicy()
        self._client = client_factory or (lambda url: Client(url, api_key=api_key, retry=retry))
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._inflight: dict[str, str] = {}  # job id -> server
        self._queue: queue.Queue[_Item] = queue.Queue()
        self._pending = 0
        self._bar: tqdm | None = None
        self._best: float | None = None
        self._outcome = SweepOutcome()

    # -- public ------------------------------------------------------------------------------------------------
    def run(self, points: list[Point]) -> SweepOutcome:
        done = self.results.keys()
        todo = [p for p in points if p.key not in done]
        outcome = self._outcome = SweepOutcome(already=len(points) - len(todo))
        if not todo:
            return outcome
        live = self._preflight(todo)
        for point in todo:
            self._queue.put(_Item(point))
        self._pending = len(todo)
        self._bar = tqdm(total=len(todo), desc="sweep", unit="eval", disable=not self.progress, file=sys.stderr)
        threads = [
            threading.Thread(target=self._slot, args=(server,), name=f"sweep {server} #{i}", daemon=True)
            for server in live
            for i in range(self.concurrency)
        ]
        try:
            for t in threads:
                t.start()
            while any(t.is_alive() for t in threads):
                for t in threads:
                    t.join(0.1)
        except KeyboardInterrupt:
            outcome.interrupted = True
            self._cancel_all()
            for t in threads:
                if t.ident is not None:
                    t.join(5.0)
        finally:
            self._bar.close()
        if not outcome.interrupted and self._pending:
            raise SweepError(
                f"every server is gone with {self._pending} point(s) left ({outcome.done} finished and saved "
                f"in {self.results.path}; rerun to resume): " + "; ".join(outcome.dead.values())
            )
        return outcome

    # -- before the first job ----------------------------------------------------------------------------------
    def _preflight(self, todo: list[Point]) -> list[str]:
        """Servers that answer, know every checkpoint and dataset, agree on what they are, and are ready."""
        checkpoints = sorted({p.checkpoint for p in todo})
        datasets = sorted({p.dataset for p in todo})
        identities: dict[str, tuple[str, str]] = {}  # name -> (first server, what it said the name is)
        live = []
        for server in self.servers:
            with self._client(server) as api:
                try:
                    found = self._identities(api, server, checkpoints, datasets)
                    if not api.ready().get("ready"):
                        self._say(f"waiting for {server} to load and warm up")
                        api.wait_ready(self.ready_timeout_s, poll_s=1.0)
                except ServerUnreachable as exc:
                    self._outcome.dead[server] = str(exc)
                    self._say(f"server {server} is unreachable and will not be used: {exc}")
                    continue
                except RequestError as exc:
                    raise SweepError(f"server {server}: {exc}") from exc
            for name, ident in found.items():
                first = identities.setdefault(name, (server, ident))
                if first[1] != ident:
                    raise SweepError(
                        f"servers disagree about {name}: {first[0]} has {first[1]}, {server} has {ident}; "
                        "a sweep must evaluate the same files everywhere"
                    )
            live.append(server)
        if not live:
            dead = self._outcome.dead
            raise SweepError("no server can be reached: " + "; ".join(dead.values()))
        return live

    @staticmethod
    def _identities(api: Client, server: str, checkpoints: list[str], datasets: list[str]) -> dict[str, str]:
        """What each name is on this server: a checkpoint's sha256, a dataset's fingerprint."""
        found: dict[str, str] = {}
        for name in checkpoints:
            try:
                found[f"checkpoint {name!r}"] = f"sha256 {api.checkpoint(name).get('sha256')}"
            except RequestError as exc:
                if exc.status != 404:
                    raise
                known = ", ".join(c["name"] for c in api.checkpoints()) or "none"
                raise SweepError(f"server {server} has no checkpoint {name!r} (it has: {known})") from exc
        by_name = {d["name"]: d for d in api.datasets()}
        for name in datasets:
            if name not in by_name:
                raise SweepError(f"server {server} has no dataset {name!r} (it has: {', '.join(by_name) or 'none'})")
            found[f"dataset {name!r}"] = f"fingerprint {by_name[name].get('fingerprint')}"
        return found

    # -- the worker slots --------------------------------------------------------------------------------------
    def _slot(self, server: str) -> None:
        with self._client(server) as api:
            while not self._stop.is_set() and server not in self._outcome.dead:
                with self._lock:
                    if self._pending == 0:
                        return
                try:
                    item = self._queue.get(timeout=0.2)
                except queue.Empty:
                    continue
                self._attempt(api, server, item)

    def _attempt(self, api: Client, server: str, item: _Item) -> None:
        """One job for one point: submit, poll until it finishes, then record it, resubmit or give up."""
        point, job = item.point, None
        try:
            job = api.submit(point.checkpoint, point.dataset, force=self.force, **point.fields)
            if not self._track(api, job):
                return
            while not job.finished:
                if self._stop.wait(self.poll_s):
                    return  # Ctrl-C: the main thread cancels what is in flight
                job = api.job(job.id)
        except ServerUnreachable as exc:
            if exc.code == "connection_lost":  # a submit cut off mid-answer: the server may be fine
                self._retry(item, f"{server}: {exc}")
            else:
                self._lose_server(server, str(exc))
                self._queue.put(item)
            return
        except RequestError as exc:
            self._api_failure(api, server, item, exc, submitted=job is not None)
            return
        finally:
            if job is not None:
                with self._lock:
                    self._inflight.pop(job.id, None)
        error = job.error or {}
        reason = f"{server}: job {job.id} {job.state}: {error.get('message') or 'no reason given'}"
        if job.state == "succeeded":
            self.results.append(make_record(point, server, job))
            self._finish(point, None, job.result)
        elif error.get("code") == "invalid_input":
            self._finish(point, reason, None)  # the engine refused the settings: another job would too
        else:
            self._retry(item, reason)  # stopped by a restart, a dead worker, an engine error: try again

    def _api_failure(self, api: Client, server: str, item: _Item, exc: RequestError, *, submitted: bool) -> None:
        if exc.status in (401, 403):
            self._lose_server(server, f"the API key was refused: {exc}")
            self._queue.put(item)
        elif exc.status in (400, 413, 422) or (exc.status == 404 and not submitted):
            self._finish(item.point, f"{server} rejected the request: {exc}", None)
        elif exc.status == 503:
            self._queue.put(item)  # not ready (restarting?): wait for it, or lose it
            try:
                api.wait_ready(self.ready_timeout_s, poll_s=1.0)
            except RequestError as again:
                self._lose_server(server, str(again))
        else:  # the job vanished (404), the queue stayed full (429), a server error: another job may do
            self._retry(item, f"{server}: {exc}")

    def _retry(self, item: _Item, reason: str) -> None:
        item.attempts += 1
        item.errors.append(reason)
        if item.attempts < self.max_attempts:
            self._say(f"{item.point.label()}: {reason}; resubmitting (job {item.attempts + 1} of {self.max_attempts})")
            self._queue.put(item)
        else:
            self._finish(item.point, " | ".join(item.errors), None)

    def _finish(self, point: Point, error: str | None, result: dict[str, Any] | None) -> None:
        with self._lock:
            self._pending -= 1
            if error is not None:
                self._outcome.failed.append((point, error))
                self._say(f"{point.label()}: failed: {error}")
            else:
                self._outcome.done += 1
                bpb = (result or {}).get("val_bpb")
                if isinstance(bpb, (int, float)) and (self._best is None or bpb < self._best):
                    self._best = bpb
            if self._bar is not None:
                best = "-" if self._best is None else f"{self._best:.4f}"
                self._bar.set_postfix_str(f"best bpb {best}, failed {len(self._outcome.failed)}")
                self._bar.update(1)

    def _track(self, api: Client, job: RemoteJob) -> bool:
        """Register a submitted job as in flight; if Ctrl-C came meanwhile, cancel it here instead."""
        with self._lock:
            if not self._stop.is_set():
                if not job.finished:
                    self._inflight[job.id] = api.base_url
                return True
        if not job.finished and self._cancel(api, job.id):
            with self._lock:
                self._outcome.cancelled += 1
        return False

    def _lose_server(self, server: str, reason: str) -> None:
        with self._lock:
            if server in self._outcome.dead:
                return
            self._outcome.dead[server] = reason
        self._say(f"lost server {server}: {reason}; its points go to the other servers, if any")

    # -- Ctrl-C ------------------------------------------------------------------------------------------------
    def _cancel_all(self) -> None:
        with self._lock:
            self._stop.set()
            inflight = dict(self._inflight)
        self._say(f"interrupted: cancelling {len(inflight)} job(s) in flight")
        for job_id, server in inflight.items():
            if server in self._outcome.dead:
                continue
            with self._client(server) as api:
                cancelled = self._cancel(api, job_id)
            with self._lock:
                self._outcome.cancelled += cancelled

    @staticmethod
    def _cancel(api: Client, job_id: str) -> bool:
        try:
            api.cancel(job_id)
        except RequestError:
            return False  # finished meanwhile (409) or the server is gone: nothing left to stop
        return True

    @staticmethod
    def _say(message: str) -> None:
        tqdm.write(message, file=sys.stderr)
