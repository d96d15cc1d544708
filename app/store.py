"""The durable job store: one SQLite file in WAL mode, written by one connection in the server process.

Finished jobs (results included) survive restarts and crashes; queued jobs are handed back on start
to be re-queued; jobs that were running when the process died are marked failed with the reason
"server stopped while the job was running". Checkpoints registered over HTTP are kept here too.
Workers never touch the database: they report to the server process, which writes.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sqlite3
import threading
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pgttt.api.schemas import ACTIVE_STATES, FINAL_STATES, JOB_STATES
from pgttt.api.units import UnitSums
from pgttt.errors import PgtttError

STOPPED_REASON = "server stopped while the job was running"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    state TEXT NOT NULL,
    cached INTEGER NOT NULL DEFAULT 0,
    checkpoint TEXT NOT NULL,
    dataset TEXT NOT NULL,
    request TEXT NOT NULL,
    config TEXT,
    gpus INTEGER NOT NULL,
    cache_key TEXT,
    created_at TEXT NOT NULL,
    started_at TEXT,
    finished_at TEXT,
    progress TEXT,
    result TEXT,
    error TEXT,
    cancel_requested INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state);
CREATE INDEX IF NOT EXISTS jobs_cache ON jobs(cache_key, state);
CREATE TABLE IF NOT EXISTS checkpoints (
    name TEXT PRIMARY KEY,
    path TEXT NOT NULL,
    preset TEXT,
    overrides TEXT,
    tokenizer TEXT,
    created_at TEXT NOT NULL
);
"""
_JSON_COLUMNS = ("request", "config", "progress", "result", "error")


class StoreError(PgtttError):
    """The job database cannot be opened or is not ours."""


class StorageError(StoreError):
    """A write to the job database failed (disk full, read-only, I/O error); nothing was changed."""

    def __init__(self, path: Path, exc: sqlite3.Error) -> None:
        super().__init__(f"job database {path}: cannot write ({exc})")
        self.full = "full" in str(exc).lower()


def lock_state_dir(state_dir: Path) -> Any:
    """Hold ``STATE_DIR/pgttt.lock`` exclusively for the life of the returned file (one server per state
    dir: a second one would mark the first one's running jobs failed). StoreError names the holder."""
    state_dir = Path(state_dir).expanduser().resolve()
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        handle = open(state_dir / "pgttt.lock", "a+")  # noqa: SIM115 - kept open: the lock lives with it
    except OSError as exc:
        raise StoreError(f"state dir {state_dir}: cannot create its lock file ({exc})") from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise StoreError(
            f"state dir {state_dir} is in use by another pgttt serve (pid {holder}); stop it, "
            "or give this one another --state-dir"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def utc_now() -> str:
    """ISO 8601 UTC with milliseconds and a Z, the form every timestamp of the API has."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def new_job_id() -> str:
    return uuid.uuid4().hex


@dataclass
class JobRecord:
    id: str
    state: str
    checkpoint: str
    dataset: str
    request: dict[str, Any]
    gpus: int
    created_at: str
    cached: bool = False
    config: dict[str, Any] | None = None
    cache_key: str | None = None
    started_at: str | None = None
    finished_at: str | None = None
    progress: dict[str, Any] | None = None
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    cancel_requested: bool = False
    stored: bool = True  # False while the database refuses this final job (disk full): held in memory only

    @property
    def final(self) -> bool:
        return self.state in FINAL_STATES


@dataclass(frozen=True)
class CheckpointSpec:
    """How to load a checkpoint: a file under a checkpoint dir (a .ptz with its architecture). Plain values
    only: workers receive it, and the store keeps the ones registered over HTTP."""

    name: str
    path: str
    preset: str | None = None
    overrides: dict[str, Any] | None = None
    tokenizer: str | None = None
    sha256: str | None = None  # of the file when it was registered: a changed file is refused


class JobStore:
    """All reads and writes go through one connection behind a lock: SQLite's one writer is us."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
            self._db.row_factory = sqlite3.Row
            mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA busy_timeout=5000")
            self._db.executescript(_SCHEMA)
            columns = {r[1] for r in self._db.execute("PRAGMA table_info(checkpoints)")}
            if "sha256" not in columns:  # a database from before registrations recorded it
                self._db.execute("ALTER TABLE checkpoints ADD COLUMN sha256 TEXT")
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(f"job database {self.path}: cannot open ({exc})") from exc
        if str(mode).lower() != "wal":
            raise StoreError(f"job database {self.path}: WAL mode refused (journal_mode={mode})")
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ---- start-up -------------------------------------------------------------------------
    def recover(self) -> tuple[list[JobRecord], list[str]]:
        """Fail the jobs a dead process left running; return (queued jobs oldest first, failed ids)."""
        with self._lock, self._writing(), self._transaction():
            running = [r["id"] for r in self._db.execute("SELECT id FROM jobs WHERE state = 'running'")]
            error = json.dumps({"code": "server_stopped", "message": STOPPED_REASON})
            self._db.execute(
                "UPDATE jobs SET state = 'failed', finished_at = ?, error = ? WHERE state = 'running'",
                (utc_now(), error),
            )
            rows = self._db.execute("SELECT * FROM jobs WHERE state = 'queued' ORDER BY seq").fetchall()
        queued = [self._record(r) for r in rows]
        return queued, running

    # ---- jobs -----------------------------------------------------------------------------
    def create(self, job: JobRecord) -> JobRecord:
        if job.state not in JOB_STATES:
            raise ValueError(f"state {job.state!r} is not one of {JOB_STATES}")
        row = asdict(job)
        del row["stored"]
        for key in _JSON_COLUMNS:
            row[key] = None if row[key] is None else json.dumps(row[key])
        row["cached"], row["cancel_requested"] = int(job.cached), int(job.cancel_requested)
        columns = ", ".join(row)
        with self._lock, self._writing():
            self._db.execute(f"INSERT INTO jobs ({columns}) VALUES ({', '.join('?' * len(row))})", tuple(row.values()))
        return job

    def get(self, job_id: str) -> JobRecord | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return None if row is None else self._record(row)

    def list(
        self,
        *,
        state: str | None = None,
        checkpoint: str | None = None,
        dataset: str | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> tuple[list[JobRecord], int]:
        """Jobs newest first, filtered, one page of them, and the total that match the filter."""
        where, args = [], []
        for column, value in (("state", state), ("checkpoint", checkpoint), ("dataset", dataset)):
            if value is not None:
                where.append(f"{column} = ?")
                args.append(value)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        with self._lock:
            total = self._db.execute(f"SELECT COUNT(*) FROM jobs {clause}", args).fetchone()[0]
            rows = self._db.execute(
                f"SELECT * FROM jobs {clause} ORDER BY seq DESC LIMIT ? OFFSET ?", (*args, limit, offset)
            ).fetchall()
        return [self._record(r) for r in rows], total

    def counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall()
        counts = dict.fromkeys(JOB_STATES, 0)
        counts.update({state: n for state, n in rows})
        return counts

    def find_cached(self, cache_key: str) -> JobRecord | None:
        """The newest succeeded job with this cache key."""
        with self._lock:
            row = self._db.execute(
                "SELECT * FROM jobs WHERE cache_key = ? AND state = 'succeeded' ORDER BY seq DESC LIMIT 1", (cache_key,)
            ).fetchone()
        return None if row is None else self._record(row)

    def mark_running(self, job_id: str) -> bool:
        """queued -> running; False if the job was no longer queued (cancelled meanwhile)."""
        return self._update(job_id, ("queued",), state="running", started_at=utc_now())

    def set_progress(self, job_id: str, progress: dict[str, Any]) -> bool:
        return self._update(job_id, ("running",), progress=progress)

    def request_cancel(self, job_id: str) -> bool:
        return self._update(job_id, ("running",), cancel_requested=True)

    def finish(
        self,
        job_id: str,
        state: str,
        *,
        result: dict[str, Any] | None = None,
        error: dict[str, Any] | None = None,
        progress: dict[str, Any] | None = None,
        finished_at: str | None = None,
    ) -> bool:
        """queued/running -> a final state, once; False if the job was already final."""
        if state not in FINAL_STATES:
            raise ValueError(f"finish: {state!r} is not a final state")
        values: dict[str, Any] = {
            "state": state,
            "finished_at": finished_at or utc_now(),
            "result": result,
            "error": error,
        }
        if progress is not None:
            values["progress"] = progress
        return self._update(job_id, ACTIVE_STATES, **values)

    # ---- per-unit sums: a binary file per job beside the database, never inside the JSON ----------------------
    @property
    def units_dir(self) -> Path:
        return self.path.parent / "units"

    def save_units(self, job_id: str, units: UnitSums) -> None:
        """Write ``units/JOB.npz`` (to a temporary name first: a reader never sees half a file)."""
        path = self.units_dir / f"{job_id}.npz"
        tmp = path.with_suffix(".tmp")
        try:
            self.units_dir.mkdir(parents=True, exist_ok=True)
            tmp.write_bytes(units.to_bytes())
            os.replace(tmp, path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise StoreError(f"units of job {job_id}: cannot write {path} ({exc})") from exc

    def load_units(self, job_id: str) -> UnitSums | None:
        """The units the job computed, None when it kept none; UnitsError for a file that is not a units file."""
        path = self.units_dir / f"{job_id}.npz"
        return UnitSums.load(path) if path.is_file() else None

    # ---- registered checkpoints -----------------------------------------------------------
    def register_checkpoint(self, reg: CheckpointSpec) -> None:
        with self._lock, self._writing():
            self._db.execute(
                "INSERT OR REPLACE INTO checkpoints (name, path, preset, overrides, tokenizer, sha256, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (reg.name, reg.path, reg.preset, json.dumps(reg.overrides), reg.tokenizer, reg.sha256, utc_now()),
            )

    def registrations(self) -> list[CheckpointSpec]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM checkpoints ORDER BY created_at, name").fetchall()
        return [
            CheckpointSpec(r["name"], r["path"], r["preset"], json.loads(r["overrides"]), r["tokenizer"], r["sha256"])
            for r in rows
        ]

    # ---- internals ------------------------------------------------------------------------
    def _update(self, job_id: str, from_states: Iterable[str], **values: Any) -> bool:
        sets, args = [], []
        for key, value in values.items():
            sets.append(f"{key} = ?")
            if key in _JSON_COLUMNS:
                value = None if value is None else json.dumps(value)
            elif isinstance(value, bool):
                value = int(value)
            args.append(value)
        states = tuple(from_states)
        sql = f"UPDATE jobs SET {', '.join(sets)} WHERE id = ? AND state IN ({', '.join('?' * len(states))})"
        with self._lock, self._writing():
            cursor = self._db.execute(sql, (*args, job_id, *states))
        return cursor.rowcount == 1

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        try:
            yield
        except sqlite3.OperationalError as exc:  # disk full, read-only, I/O error, locked
            raise StorageError(self.path, exc) from exc

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    @staticmethod
    def _record(row: sqlite3.Row) -> JobRecord:
        data = dict(row)
        data.pop("seq")
        for key in _JSON_COLUMNS:
            data[key] = None if data[key] is None else json.loads(data[key])
        data["cached"], data["cancel_requested"] = bool(data["cached"]), bool(data["cancel_requested"])
        return JobRecord(**data)
