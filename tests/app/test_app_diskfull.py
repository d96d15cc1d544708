"""A full disk under the job database: a job that finishes meanwhile keeps its result (shown with
``stored: false``), new submissions get 503 storage_full, and the job is stored once writes work again."""

from __future__ import annotations

import sqlite3

from fastapi.testclient import TestClient

from pgttt.app.main import create_app
from pgttt.app.settings import Settings
from pgttt.app.store import JobStore
from tests.helpers.app import DEMO, QUICK, wait_for, wait_ready

WRITES = ("INSERT", "UPDATE", "DELETE", "REPLACE", "BEGIN")


class FullDisk:
    """The store's connection, except that while ``full`` every write fails as SQLite's do on a full disk."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db, self.full = db, False

    def execute(self, sql: str, *args):
        if self.full and sql.lstrip().upper().startswith(WRITES):
            raise sqlite3.OperationalError("database or disk is full")
        return self.db.execute(sql, *args)

    def __getattr__(self, name: str):
        return getattr(self.db, name)


def test_a_result_is_never_dropped_when_the_disk_is_full(tmp_path, monkeypatch):
    import pgttt.app.scheduler as scheduler_module

    monkeypatch.setattr(scheduler_module, "STORE_RETRY_S", 0.2)
    settings = Settings(checkpoint_dirs=[DEMO], data_dirs=[DEMO], state_dir=tmp_path, devices=["cpu"], warmup=False)
    app = create_app(settings)
    service = app.state.service
    disk = service.store._db = FullDisk(service.store._db)
    with TestClient(app) as c:
        wait_ready(c)
        r = c.post("/eval", json={**QUICK, "seed": 41})
        assert r.status_code == 202 and r.json()["state"] == "running"  # marked running in the store already
        job_id = r.json()["id"]
        disk.full = True  # before it can finish
        job = wait_for(
            lambda: (j := c.get(f"/jobs/{job_id}").json())["state"] != "running" and j, 120, "the job to finish"
        )
        # Honest: finished, with its result, and said not to be stored (it was dropped: "running" forever).
        assert job["state"] == "succeeded" and job["result"]["tokens_scored"] == 512 and job["stored"] is False
        assert service.store.get(job_id).state == "running"
        assert any("cannot be written" in p for p in c.get("/readyz").json()["problems"])
        listed = {j["id"]: j for j in c.get("/jobs").json()["jobs"]}
        assert listed[job_id]["state"] == "succeeded" and listed[job_id]["stored"] is False
        for body in ({**QUICK, "seed": 42}, {**QUICK, "seed": 41}):  # a new job, a cache hit: both need a write
            r = c.post("/eval", json=body)
            assert r.status_code == 503 and r.json()["error"]["code"] == "storage_full", r.text
            assert int(r.headers["retry-after"]) > 0
        disk.full = False
        wait_for(lambda: c.get(f"/jobs/{job_id}").json()["stored"], 30, "the job to be stored")
        assert c.get(f"/jobs/{job_id}").json()["result"] == job["result"]
        assert c.post("/eval", json={**QUICK, "seed": 41}).json()["cached"] is True  # the cache has it
    store = JobStore(settings.database_path)
    try:
        _, failed = store.recover()
        stored = store.get(job_id)
        assert failed == [] and stored.state == "succeeded" and stored.result == job["result"]
    finally:
        store.close()
