"""The SQLite job store: state transitions, listing, the result cache, recovery after a crash, WAL."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import textwrap

import pytest

from pgttt.app.store import STOPPED_REASON, CheckpointSpec, JobRecord, JobStore, StoreError, new_job_id, utc_now


def make_job(store: JobStore, **kw) -> JobRecord:
    fields = dict(
        id=new_job_id(),
        state="queued",
        checkpoint="demo",
        dataset="demo",
        request={"ttt_epochs": 1},
        gpus=1,
        created_at=utc_now(),
        cache_key="k1",
    )
    fields.update(kw)
    return store.create(JobRecord(**fields))


@pytest.fixture
def store(tmp_path):
    s = JobStore(tmp_path / "jobs.sqlite")
    yield s
    s.close()


def test_wal_mode_and_round_trip(store, tmp_path):
    job = make_job(store, config={"seq_len": 128}, request={"ttt_lr": 0.01, "adapt_include": ["blocks.0"]})
    got = store.get(job.id)
    assert got == job
    with sqlite3.connect(tmp_path / "jobs.sqlite") as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store.get("nope") is None


def test_transitions_happen_once(store):
    job = make_job(store)
    assert store.mark_running(job.id)
    assert not store.mark_running(job.id)  # no longer queued
    assert store.set_progress(job.id, {"phase": "score", "chunks_done": 1})
    assert store.request_cancel(job.id)
    assert store.finish(job.id, "succeeded", result={"val_bpb": 1.5})
    assert not store.finish(job.id, "failed", error={"code": "x", "message": "late"})  # already final
    assert not store.set_progress(job.id, {"phase": "late"})
    got = store.get(job.id)
    assert got.state == "succeeded" and got.result == {"val_bpb": 1.5} and got.error is None
    assert got.progress == {"phase": "score", "chunks_done": 1} and got.cancel_requested
    assert got.started_at and got.finished_at and got.started_at <= got.finished_at
    with pytest.raises(ValueError):
        store.finish(job.id, "running")


def test_queued_job_cancels_at_once(store):
    job = make_job(store)
    assert store.finish(job.id, "cancelled")
    assert not store.mark_running(job.id)
    assert store.get(job.id).state == "cancelled"


def test_list_newest_first_filtered_and_paged(store):
    ids = [make_job(store, checkpoint="a" if i % 2 else "b").id for i in range(7)]
    store.finish(ids[0], "failed", error={"code": "x", "message": "y"})
    jobs, total = store.list()
    assert total == 7 and [j.id for j in jobs] == ids[::-1]
    jobs, total = store.list(checkpoint="a", limit=2, offset=1)
    assert total == 3 and [j.id for j in jobs] == [ids[3], ids[1]]
    jobs, total = store.list(state="failed")
    assert total == 1 and jobs[0].id == ids[0]
    assert store.list(dataset="other") == ([], 0)
    assert store.counts() == {"queued": 6, "running": 0, "succeeded": 0, "failed": 1, "cancelled": 0}


def test_cache_finds_newest_success_only(store):
    failed = make_job(store, cache_key="k")
    store.finish(failed.id, "failed", error={"code": "x", "message": "y"})
    assert store.find_cached("k") is None
    first, second = make_job(store, cache_key="k"), make_job(store, cache_key="k")
    for job in (first, second):
        store.mark_running(job.id)
        store.finish(job.id, "succeeded", result={"id": job.id})
    assert store.find_cached("k").id == second.id
    assert store.find_cached("other") is None


def test_recover_fails_running_and_returns_queued_in_order(tmp_path):
    path = tmp_path / "jobs.sqlite"
    store = JobStore(path)
    done = make_job(store)
    store.mark_running(done.id)
    store.finish(done.id, "succeeded", result={"val_bpb": 2.0})
    running = make_job(store)
    store.mark_running(running.id)
    queued = [make_job(store).id for _ in range(3)]
    store.close()

    again = JobStore(path)
    requeue, failed = again.recover()
    assert [j.id for j in requeue] == queued and failed == [running.id]
    got = again.get(running.id)
    assert got.state == "failed" and got.error == {"code": "server_stopped", "message": STOPPED_REASON}
    assert got.finished_at is not None
    assert again.get(done.id).result == {"val_bpb": 2.0}
    again.close()


def test_survives_a_killed_writer(tmp_path):
    """A process that wrote and died without closing (SIGKILL-like os._exit) leaves every commit readable."""
    path = tmp_path / "jobs.sqlite"
    script = textwrap.dedent(
        f"""
        import os
        from pgttt.app.store import JobRecord, JobStore, utc_now
        s = JobStore({str(path)!r})
        s.create(JobRecord(id="j1", state="queued", checkpoint="c", dataset="d", request={{}}, gpus=1,
                           created_at=utc_now()))
        s.mark_running("j1")
        s.finish("j1", "succeeded", result={{"val_bpb": 1.25}})
        s.create(JobRecord(id="j2", state="queued", checkpoint="c", dataset="d", request={{}}, gpus=1,
                           created_at=utc_now()))
        s.mark_running("j2")
        os._exit(9)
        """
    )
    assert subprocess.run([sys.executable, "-c", script]).returncode == 9
    store = JobStore(path)
    _, failed = store.recover()
    assert failed == ["j2"]
    assert store.get("j1").result == {"val_bpb": 1.25}
    store.close()


def test_registrations_persist(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite")
    store.register_checkpoint(CheckpointSpec("mine", "/ckpt/mine.ptz", "tiny", {"num_layers": 3}))
    store.register_checkpoint(CheckpointSpec("other", "/ckpt/other.bin"))
    store.register_checkpoint(CheckpointSpec("tok", "/ckpt/tok.ptz", "tiny", {}, "/data/tok.model"))
    store.close()
    again = JobStore(tmp_path / "jobs.sqlite")
    assert again.registrations() == [
        CheckpointSpec("mine", "/ckpt/mine.ptz", "tiny", {"num_layers": 3}),
        CheckpointSpec("other", "/ckpt/other.bin", None, None),
        CheckpointSpec("tok", "/ckpt/tok.ptz", "tiny", {}, "/data/tok.model"),
    ]
    again.close()


def test_unopenable_database_is_a_clear_error(tmp_path):
    not_a_db = tmp_path / "jobs.sqlite"
    not_a_db.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError, match="jobs.sqlite"):
        JobStore(not_a_db)
