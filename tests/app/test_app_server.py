"""A real ``pgttt serve`` process on localhost, on the demo checkpoint: submit, poll, stream, cancel, the
cache, 20 clients at once, and durability: SIGKILL mid-job, restart, results and re-queued jobs found."""

from __future__ import annotations

import json
import signal
import threading
import time

import httpx
import pytest

from tests.helpers.app import LONG, QUICK, Server, alive, children_of, wait_for, wait_job, wait_ready

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    state = tmp_path_factory.mktemp("served")
    srv = Server(state).start()
    with httpx.Client(base_url=srv.url, timeout=30) as client:
        wait_ready(client)
        srv.client = client
        yield srv
    srv.stop()


def test_submit_poll_stream_cancel_and_cache(server):
    c = server.client
    r = c.post("/eval", json={**QUICK, "seed": 1})
    assert r.status_code == 202
    done = wait_job(c, r.json()["id"])
    assert done["state"] == "succeeded" and done["result"]["val_bpb"] > 0

    job = c.post("/eval", json={**QUICK, "seed": 2, "ttt_epochs": 2}).json()
    events, name = [], None
    with c.stream("GET", f"/jobs/{job['id']}/events") as stream:
        for line in stream.iter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                events.append((name, json.loads(line[6:])))
                if name == "end":
                    break
    assert events[0][0] == "state" and events[-1][0] == "end" and events[-1][1]["state"] == "succeeded"

    running = c.post("/eval", json={**LONG, "seed": 3}).json()
    wait_for(lambda: c.get(f"/jobs/{running['id']}").json()["progress"], 60, "progress of the long job")
    assert c.delete(f"/jobs/{running['id']}").status_code == 200
    assert wait_job(c, running["id"], timeout=30)["state"] == "cancelled"

    hit = c.post("/eval", json={**QUICK, "seed": 1})
    assert hit.status_code == 200 and hit.json()["cached"] and hit.json()["result"] == done["result"]


def test_twenty_clients_at_once(server):
    results: dict[int, dict] = {}
    errors: list[str] = []

    def client(i: int) -> None:
        try:
            with httpx.Client(base_url=server.url, timeout=30) as c:
                r = c.post("/eval", json={**QUICK, "ttt_epochs": 0, "max_tokens": 256, "seed": 1000 + i})
                assert r.status_code == 202, r.text
                job_id = r.json()["id"]
                deadline = time.monotonic() + 150
                while time.monotonic() < deadline:
                    job = c.get(f"/jobs/{job_id}").json()
                    if job["state"] in ("succeeded", "failed", "cancelled"):
                        results[i] = job
                        return
                    time.sleep(0.2)
                errors.append(f"client {i}: job {job_id} not finished in time")
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(f"client {i}: {exc!r}")

    threads = [threading.Thread(target=client, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert not errors, errors
    assert sorted(results) == list(range(20))
    assert all(job["state"] == "succeeded" for job in results.values()), [j["error"] for j in results.values()]
    ids = {job["id"] for job in results.values()}
    listed = {j["id"] for j in server.client.get("/jobs", params={"limit": 1000}).json()["jobs"]}
    assert len(ids) == 20 and ids <= listed


def test_sigkill_mid_job_then_restart(server, tmp_path):
    c = server.client
    finished = wait_job(c, c.post("/eval", json={**QUICK, "seed": 4}).json()["id"])
    killed = c.post("/eval", json={**LONG, "seed": 5}).json()
    wait_for(lambda: c.get(f"/jobs/{killed['id']}").json()["progress"], 60, "the long job to run")
    behind = c.post("/eval", json={**QUICK, "seed": 6}).json()
    assert c.get(f"/jobs/{behind['id']}").json()["state"] == "queued"
    total = c.get("/jobs").json()["total"]
    workers = children_of(server.process.pid)
    assert workers
    server.stop(signal.SIGKILL)
    # The workers notice their server is gone and exit: no orphans left computing.
    wait_for(lambda: not any(alive(pid) for pid in workers), 20, "the dead server's workers to exit")

    again = Server(server.state_dir).start()
    try:
        with httpx.Client(base_url=again.url, timeout=30) as c2:
            # The store answers at once, before the checkpoints are loaded.
            assert c2.get(f"/jobs/{finished['id']}").json()["result"] == finished["result"]
            lost = c2.get(f"/jobs/{killed['id']}").json()
            assert lost["state"] == "failed" and lost["error"]["code"] == "server_stopped"
            assert lost["error"]["message"] == "server stopped while the job was running"
            assert c2.get("/jobs").json()["total"] == total
            assert wait_job(c2, behind["id"])["state"] == "succeeded"  # re-queued on start
            hit = c2.post("/eval", json={**QUICK, "seed": 4})
            assert hit.status_code == 200 and hit.json()["cached"] and hit.json()["result"] == finished["result"]
            # A client following a long job's events must not keep the server from stopping.
            follow = c2.post("/eval", json={**LONG, "seed": 7}).json()
            streaming = threading.Event()

            def watch() -> None:
                with httpx.stream("GET", f"{again.url}/jobs/{follow['id']}/events", timeout=60) as stream:
                    streaming.set()
                    for _ in stream.iter_lines():
                        pass

            watcher = threading.Thread(target=watch, daemon=True)
            watcher.start()
            assert streaming.wait(30)
    finally:
        again.stop()
    watcher.join(30)
    assert not watcher.is_alive()
    # SIGTERM: uvicorn shuts down in order, then exits by the signal it caught.
    assert again.process.returncode in (0, -signal.SIGTERM)
    assert "Traceback" not in again.log.read_text()
