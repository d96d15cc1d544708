"""Sweeps of evaluation settings over HTTP: the spec file, its expansion into points, and the runner.

A spec names checkpoint(s) and dataset(s) and the values to try for any evaluation field: a grid (cartesian
product), explicit points and random samples, each repeated per seed. The runner spreads the points over one or
more servers with bounded concurrency each, appends every finished result to ``OUT/results.jsonl`` keyed by a
hash of its request (so a rerun submits only what is missing), survives server restarts by retrying and
resubmitting, and cancels its jobs on Ctrl-C. It speaks only HTTP (:mod:`pgttt.client.client`): no torch here.
"""

from __future__ import annotations

import difflib
import hashlib
import itertools
import json
import math
import os
import queue
import random
import sys
import threading
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel
from tqdm import tqdm

from pgttt.api.schemas import EvalRequest
from pgttt.client.client import Client, RemoteJob, RequestError, RetryPolicy, ServerUnreachable
from pgttt.client.report import read_results
from pgttt.errors import PgtttError

# The evaluation fields a point may set and the JSON type each takes, read off the HTTP request model (so a knob
# the server accepts is sweepable without an edit here); the server checks ranges and answers 422 naming the
# field, so only types are checked here, before anything is submitted.
_NOT_SETTINGS = ("checkpoint", "dataset", "force", "wait", "wait_timeout_s")


def field_kinds(model: type[BaseModel] = EvalRequest) -> dict[str, type]:
    """Each evaluation field of a request model and its JSON type: int, float, str (choices too), bool or list."""
    def base(annotation: Any) -> Any:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        kind = typing.get_origin(args[0]) or args[0] if args else annotation
        return str if kind is typing.Literal else kind

    return {n: base(f.annotation) for n, f in model.model_fields.items() if n not in _NOT_SETTINGS}


KINDS: dict[str, type] = field_kinds()
SPEC_KEYS = ("checkpoint", "dataset", "fixed", "grid", "points", "random", "seeds", "force")
DISTRIBUTIONS = ("uniform", "loguniform", "choice")


class SweepError(PgtttError):
    """A sweep that cannot run: a bad spec, a server that refuses, servers that disagree or are all gone."""


# ---- the spec --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Point:
    """One evaluation to run: checkpoint, dataset and the request fields, with the key that identifies it."""

    checkpoint: str
    dataset: str
    fields: dict[str, Any]
    key: str

    @classmethod
    def make(cls, checkpoint: str, dataset: str, fields: dict[str, Any]) -> Point:
        return cls(checkpoint, dataset, dict(sorted(fields.items())), request_key(checkpoint, dataset, fields))

    def label(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.fields.items()) or "(engine defaults)"


def request_key(checkpoint: str, dataset: str, fields: dict[str, Any]) -> str:
    """A stable hash of a request: SHA-256 of its canonical JSON (sorted keys, no spaces), 16 hex digits."""
    canonical = json.dumps(
        {"checkpoint": checkpoint, "dataset": dataset, "config": fields},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
        allow_nan=False,
    )
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class SweepSpec:
    """A validated spec. ``expand()`` gives its points in a fixed order, duplicates removed."""

    checkpoints: tuple[str, ...]
    datasets: tuple[str, ...]
    fixed: dict[str, Any]
    grid: dict[str, list[Any]]
    points: tuple[dict[str, Any], ...]
    samples: tuple[dict[str, Any], ...]
    seeds: tuple[int, ...]
    force: bool = False

    def expand(self) -> list[Point]:
        varied: list[dict[str, Any]] = []
        if self.grid:
            names = list(self.grid)
            varied += [dict(zip(names, combo, strict=True)) for combo in itertools.product(*self.grid.values())]
        varied += [dict(p) for p in self.points] + [dict(s) for s in self.samples]
        varied = varied or [{}]
        seeds: list[dict[str, Any]] = [{"seed": s} for s in self.seeds] or [{}]
        out: dict[str, Point] = {}
        for checkpoint, dataset, fields_, seed in itertools.product(self.checkpoints, self.datasets, varied, seeds):
            point = Point.make(checkpoint, dataset, {**self.fixed, **fields_, **seed})
            out.setdefault(point.key, point)
        return list(out.values())


def load_sweep(path: str | Path) -> SweepSpec:
    """Read and validate a sweep spec (YAML); every error names the file and the key."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise SweepError(f"{path}: cannot read the sweep spec: {exc.strerror or exc}") from exc
    except yaml.YAMLError as exc:
        raise SweepError(f"{path}: not valid YAML: {exc}") from exc
    return parse_spec(data, where=str(path))


def parse_spec(data: Any, *, where: str = "spec") -> SweepSpec:
    """Validate a spec already parsed from YAML/JSON (see :func:`load_sweep`)."""

    def fail(key: str, problem: str) -> SweepError:
        return SweepError(f"{where}: {key}: {problem}")

    if not isinstance(data, dict):
        raise SweepError(f"{where}: expected a mapping with keys {', '.join(SPEC_KEYS)}, got {_kind(data)}")
    for key in data:
        if key not in SPEC_KEYS:
            raise fail(str(key), f"unknown key{_suggest(key, SPEC_KEYS)}; known: {', '.join(SPEC_KEYS)}")
    for key in ("checkpoint", "dataset"):
        if key not in data:
            raise SweepError(f"{where}: {key}: missing (name a {key} the server knows, or a list of them)")

    def names(key: str) -> tuple[str, ...]:
        value = data[key]
        items = value if isinstance(value, list) else [value]
        if not items or not all(isinstance(v, str) and v for v in items):
            raise fail(key, f"expected a name or a non-empty list of names, got {value!r}")
        return tuple(dict.fromkeys(items))

    def mapping(key: str) -> dict[str, Any]:
        value = data.get(key) or {}
        if not isinstance(value, dict):
            raise fail(key, f"expected a mapping of field: value, got {_kind(value)}")
        return value

    fixed = {name: _check_value(f"fixed.{name}", name, v, fail) for name, v in mapping("fixed").items()}

    grid: dict[str, list[Any]] = {}
    for name, values in mapping("grid").items():
        _check_name(f"grid.{name}", name, fail)
        if not isinstance(values, list) or not values:
            raise fail(f"grid.{name}", f"expected a non-empty list of values, got {values!r}")
        grid[name] = [_check_value(f"grid.{name}[{i}]", name, v, fail) for i, v in enumerate(values)]

    points_raw = data.get("points") or []
    if not isinstance(points_raw, list):
        raise fail("points", f"expected a list of mappings (field: value), got {_kind(points_raw)}")
    points = []
    for i, point in enumerate(points_raw):
        if not isinstance(point, dict) or not point:
            raise fail(f"points[{i}]", f"expected a non-empty mapping of field: value, got {point!r}")
        points.append({name: _check_value(f"points[{i}].{name}", name, v, fail) for name, v in point.items()})

    samples = _parse_random(data.get("random"), fail)

    seeds_raw = data.get("seeds") or []
    if not isinstance(seeds_raw, list) or not all(_is_int(s) and s >= 0 for s in seeds_raw):
        raise fail("seeds", f"expected a list of non-negative integers, got {seeds_raw!r}")
    force = data.get("force", False)
    if not isinstance(force, bool):
        raise fail("force", f"expected true or false, got {force!r}")

    # A field set in two places would be ambiguous: say where.
    varied_sources = [("grid", set(grid))] + [(f"points[{i}]", set(p)) for i, p in enumerate(points)]
    varied_sources += [("random.fields", set(samples[0]) if samples else set())]
    for source, keys in varied_sources:
        for name in sorted(keys & set(fixed)):
            raise fail(f"{source}.{name}", "also set in fixed: set it in one place")
        if seeds_raw and "seed" in keys:
            raise fail(f"{source}.seed", "also given by seeds: set it in one place")
    if seeds_raw and "seed" in fixed:
        raise fail("fixed.seed", "also given by seeds: set it in one place")
    return SweepSpec(
        checkpoints=names("checkpoint"),
        datasets=names("dataset"),
        fixed=fixed,
        grid=grid,
        points=tuple(points),
        samples=tuple(samples),
        seeds=tuple(dict.fromkeys(seeds_raw)),
        force=force,
    )


def _parse_random(spec: Any, fail: Callable[[str, str], SweepError]) -> list[dict[str, Any]]:
    """Random points: ``{samples: N, seed: S, fields: {name: {uniform|loguniform: [lo, hi]} | {choice: [...]}}}``.
    Fields are drawn in name order from one ``random.Random(seed)``; floats keep 6 significant digits."""
    if spec is None:
        return []
    if not isinstance(spec, dict):
        raise fail("random", f"expected a mapping with samples, seed and fields, got {_kind(spec)}")
    for key in spec:
        if key not in ("samples", "seed", "fields"):
            raise fail(f"random.{key}", f"unknown key{_suggest(key, ('samples', 'seed', 'fields'))}")
    samples, seed, fields_ = spec.get("samples"), spec.get("seed"), spec.get("fields")
    if not _is_int(samples) or samples < 1:
        raise fail("random.samples", f"expected a positive integer, got {samples!r}")
    if not _is_int(seed):
        raise fail("random.seed", f"expected an integer (the samples are drawn from it), got {seed!r}")
    if not isinstance(fields_, dict) or not fields_:
        raise fail("random.fields", f"expected a mapping of field: distribution, got {fields_!r}")
    draws: dict[str, Callable[[random.Random], Any]] = {}
    for name in sorted(fields_):
        draws[name] = _distribution(f"random.fields.{name}", name, fields_[name], fail)
    rng = random.Random(seed)
    return [{name: draw(rng) for name, draw in draws.items()} for _ in range(samples)]


def _distribution(
    key: str, name: str, spec: Any, fail: Callable[[str, str], SweepError]
) -> Callable[[random.Random], Any]:
    _check_name(key, name, fail)
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
        raise fail(key, f"expected one of {{uniform: [lo, hi]}}, {{loguniform: [lo, hi]}}, {{choice: [...]}}; "
                        f"got {spec!r}")
    (kind, args), = spec.items()
    if kind == "choice":
        if not isinstance(args, list) or not args:
            raise fail(f"{key}.choice", f"expected a non-empty list of values, got {args!r}")
        values = [_check_value(f"{key}.choice[{i}]", name, v, fail) for i, v in enumerate(args)]
        return lambda rng: rng.choice(values)
    if KINDS[name] not in (int, float):
        raise fail(f"{key}.{kind}", f"{name} is not numeric: use choice")
    if not (isinstance(args, list) and len(args) == 2 and all(a is not None for a in args)):
        raise fail(f"{key}.{kind}", f"expected [low, high], got {args!r}")
    low, high = (_check_value(f"{key}.{kind}[{i}]", name, a, fail) for i, a in enumerate(args))
    if low > high:
        raise fail(f"{key}.{kind}", f"expected [low, high] with low <= high, got {args!r}")
    if kind == "loguniform" and low <= 0:
        raise fail(f"{key}.loguniform", f"low={low!r}: must be positive")
    integer = KINDS[name] is int

    def draw(rng: random.Random) -> Any:
        if kind == "uniform":
            x = rng.uniform(low, high)
        else:
            x = math.exp(rng.uniform(math.log(low), math.log(high)))
        return min(max(round(x), low), high) if integer else float(f"{x:.6g}")

    return draw


def _check_name(key: str, name: Any, fail: Callable[[str, str], SweepError]) -> None:
    if name not in KINDS:
        raise fail(key, f"unknown evaluation field{_suggest(name, KINDS)}; known: {', '.join(KINDS)}")


def _check_value(key: str, name: str, value: Any, fail: Callable[[str, str], SweepError]) -> Any:
    """The value in canonical JSON type for the field (ints stay ints, numbers become floats), or an error."""
    _check_name(key, name, fail)
    if value is None:
        return None  # sent as null: the engine's own default ("what the checkpoint or device implies")
    kind = KINDS[name]
    if kind is int:
        if not _is_int(value):
            raise fail(key, f"{name} must be an integer, got {value!r}")
        return value
    if kind is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as text
            try:
                value = float(value)
            except ValueError:
                pass
        if not _is_number(value) or not math.isfinite(value):
            raise fail(key, f"{name} must be a finite number, got {value!r}")
        return float(value)
    if kind is str:
        if not isinstance(value, str):
            raise fail(key, f"{name} must be a string, got {value!r}")
        return value
    if kind is bool:
        if not isinstance(value, bool):
            raise fail(key, f"{name} must be true or false, got {value!r}")
        return value
    if isinstance(value, str):  # a list field: one pattern, or a list of them
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise fail(key, f"{name} must be a list of parameter-name patterns, got {value!r}")
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _kind(value: Any) -> str:
    return "nothing" if value is None else type(value).__name__


def _suggest(word: Any, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(str(word), list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


# ---- the results file ------------------------------------------------------------------------------------------
class ResultsFile:
    """``results.jsonl``: one finished point per line, appended and flushed to disk as each finishes.

    Opening it mends a last line without its newline: a partial one (the trace of a kill in the middle of a
    write) is dropped, a whole one gets its newline, so that appending keeps the file valid JSON Lines.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            data = path.read_bytes()
            if data and not data.endswith(b"\n"):
                start = data.rfind(b"\n") + 1
                try:
                    json.loads(data[start:])
                except ValueError:
                    with path.open("r+b") as f:
                        f.truncate(start)
                else:
                    with path.open("ab") as f:
                        f.write(b"\n")

    def keys(self) -> set[str]:
        return {r["key"] for r in read_results(self.path)} if self.path.exists() else set()

    def append(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, sort_keys=True, allow_nan=False) + "\n"
        with self._lock, self.path.open("a") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())


def make_record(point: Point, server: str, job: RemoteJob) -> dict[str, Any]:
    return {
        "key": point.key,
        "checkpoint": point.checkpoint,
        "dataset": point.dataset,
        "request": point.fields,
        "server": server,
        "job_id": job.id,
        "cached": job.cached,
        "created_at": job.raw.get("created_at"),
        "started_at": job.raw.get("started_at"),
        "finished_at": job.raw.get("finished_at"),
        "result": job.result,
    }


# ---- the runner ------------------------------------------------------------------------------------------------
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
