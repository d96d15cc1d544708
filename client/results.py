"""The files of a sweep's output folder: ``results.jsonl``, read back and appended to resumably, and the names
of the files the sweep writes beside it.

A line of ``results.jsonl`` is one finished point (:func:`make_record`): its key, checkpoint, dataset, request
and the engine's result as its job returned it. Appends are flushed and fsynced one by one, so a kill loses at
most the line being written, and opening the file again mends that.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pgttt.errors import PgtttError

if TYPE_CHECKING:  # annotations only: reading results needs neither HTTP nor the spec
    from pgttt.client.client import RemoteJob
    from pgttt.client.sweep_spec import Point

INTERVALS_FILE = "intervals.json"  # per key: delta, low, high against the best of its group (pgttt.client.halving)
HALVING_FILE = "halving.json"


class ResultsError(PgtttError):
    """A results file that cannot be read: missing, or a line that is not a result record."""


def read_results(path: str | Path) -> list[dict[str, Any]]:
    """The records of a ``results.jsonl``; a later record with the same key replaces an earlier one.

    A last line that is not JSON and has no newline (a write cut short by a kill) is ignored; any other bad line
    is an error naming its line number.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ResultsError(f"{path}: cannot read the results: {exc.strerror or exc}") from exc
    lines = text.split("\n")
    records: dict[str, dict[str, Any]] = {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as exc:
            if number == len(lines):
                break  # a partial last line: the write was cut short
            raise ResultsError(f"{path}:{number}: not JSON ({exc})") from exc
        if not isinstance(record, dict):
            raise ResultsError(f"{path}:{number}: not a sweep result (a JSON {type(record).__name__})")
        missing = [k for k in ("key", "checkpoint", "dataset", "request", "result") if k not in record]
        if missing or not isinstance(record["result"], dict):
            raise ResultsError(f"{path}:{number}: not a sweep result (missing {', '.join(missing) or 'result'})")
        records[record["key"]] = record
    return list(records.values())


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
