"""Two CPU workers: a job with gpus=2 gangs them into a gloo group for one data-parallel evaluation that
matches the single-worker number, and FIFO order holds (a job behind a waiting gang job does not jump it)."""

from __future__ import annotations

import time

import pytest
from fastapi.testclient import TestClient

from pgttt.app.engine_bridge import warmed_world_sizes
from pgttt.app.main import create_app
from pgttt.app.service import Service
from pgttt.app.settings import Settings
from pgttt.app.store import CheckpointSpec
from tests.helpers.app import DEMO, LONG, QUICK, wait_for, wait_job, wait_ready

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    root = tmp_path_factory.mktemp("gang")
    settings = Settings(checkpoint_dirs=[DEMO], data_dirs=[DEMO], state_dir=root, devices=["cpu", "cpu"])
    with TestClient(create_app(settings)) as c:
        wait_ready(c)
        yield c


def test_two_gloo_ranks_match_one_worker(client):
    fields = {**QUICK, "ttt_epochs": 2, "max_tokens": 1024, "seed": 5}
    single = wait_job(client, client.post("/eval", json=fields).json()["id"])
    ganged = client.post("/eval", json={**fields, "gpus": 2, "force": True}).json()
    assert ganged["gpus"] == 2
    ganged = wait_job(client, ganged["id"])
    assert single["state"] == ganged["state"] == "succeeded", (single["error"], ganged["error"])
    assert single["result"]["world_size"] == 1 and ganged["result"]["world_size"] == 2
    assert ganged["result"]["tokens_scored"] == single["result"]["tokens_scored"]
    assert ganged["result"]["val_bpb"] == pytest.approx(single["result"]["val_bpb"], rel=1e-5)
    # Forming the group is timed apart from the evaluation loop, and only where there is a group.
    assert ganged["result"]["timings"]["group_s"] > 0 and "group_s" not in single["result"]["timings"]


def test_fifo_a_gang_job_is_not_overtaken(client):
    def state(job):
        return client.get(f"/jobs/{job['id']}").json()["state"]

    first = client.post("/eval", json={**LONG, "seed": 6}).json()
    wait_for(lambda: state(first) == "running", 60, "the first job to run")
    gang = client.post("/eval", json={**QUICK, "seed": 7, "gpus": 2}).json()
    small = client.post("/eval", json={**QUICK, "seed": 8}).json()
    time.sleep(1.0)
    # One worker is idle, but the oldest job needs two: the small job behind it must wait too.
    assert state(gang) == "queued" and state(small) == "queued"
    assert client.delete(f"/jobs/{first['id']}").status_code == 200
    gang, small = wait_job(client, gang["id"]), wait_job(client, small["id"])
    assert gang["state"] == small["state"] == "succeeded"
    assert gang["started_at"] <= small["started_at"]


def test_workers_warm_one_gpu_jobs_and_gangs_of_powers_of_two_and_all():
    assert [warmed_world_sizes(n) for n in (1, 2, 3, 8)] == [(1,), (1, 2), (1, 2, 3), (1, 2, 4, 8)]


def test_the_cuda_graphs_setting_reaches_every_workers_engine(tmp_path):
    for wanted in (False, True):
        settings = Settings(
            checkpoint_dirs=[DEMO],
            data_dirs=[DEMO],
            state_dir=tmp_path / str(wanted),
            devices=["cpu"],
            cuda_graphs=wanted,
        )
        engine = Service(settings).pool._engine_factory("cpu")
        engine.load(CheckpointSpec("demo", str(DEMO / "model.bin")))
        assert (engine.world_sizes, engine.sessions["demo"].cuda_graphs) == ((1,), wanted)
