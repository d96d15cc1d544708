"""The HTTP API in-process (TestClient) on the real engine and the demo checkpoint: the contract's
statuses and shapes, bad requests, the cache, waiting, events, cancelling, uploads, a dying worker."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient

from pgttt.app.main import create_app
from pgttt.app.settings import Settings
from tests.helpers.app import DEMO, LONG, QUICK, wait_for, wait_job, wait_ready, write_model_bin, write_ptz

OUTSIDE = "outside.bin"


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    ckpts = root / "ckpts"
    write_model_bin(ckpts / "extra" / "model.bin")
    write_ptz(ckpts / "record.ptz")  # no sidecar: skipped at start, registered over HTTP below
    write_model_bin(root / OUTSIDE)
    (ckpts / "escape.bin").symlink_to(root / OUTSIDE)
    upload_limit = (DEMO / "model.bin").stat().st_size + 64 * 1024
    settings = Settings(
        checkpoint_dirs=[DEMO, ckpts],
        data_dirs=[DEMO],
        state_dir=root / "state",
        devices=["cpu"],
        queue_limit=3,
        max_upload_bytes=upload_limit,
    )
    app = create_app(settings)
    with TestClient(app) as client:
        wait_ready(client)
        yield SimpleNamespace(
            client=client, service=app.state.service, root=root, ckpts=ckpts, upload_limit=upload_limit
        )


def submit(api, **fields) -> dict:
    r = api.client.post("/eval", json={**QUICK, **fields})
    assert r.status_code in (200, 202), r.text
    return r.json()


def test_health_ready_and_listing(api):
    c = api.client
    assert c.get("/healthz").json() == {"status": "ok"}
    ready = c.get("/readyz").json()
    assert ready["ready"] is True and [w["device"] for w in ready["workers"]] == ["cpu"]
    assert any("record.ptz" in p and "sidecar" not in p and "ptz.json" in p for p in ready["problems"])
    names = {ck["name"]: ck for ck in c.get("/checkpoints").json()["checkpoints"]}
    assert set(names) == {"demo", "extra"}  # escape.bin (a symlink out of the folder) is not served
    demo = c.get("/checkpoints/demo").json()
    assert demo == names["demo"]
    assert demo["kind"] == "model.bin" and demo["devices"] == ["cpu"] and demo["fits_16mb"] is True
    assert demo["size_bytes"] == (DEMO / "model.bin").stat().st_size and len(demo["sha256"]) == 64
    assert demo["parameters"] > 0 and demo["config"]["vocab_size"] > 0
    (dataset,) = c.get("/datasets").json()["datasets"]
    assert dataset["name"] == "demo" and dataset["val_tokens"] > 0 and len(dataset["fingerprint"]) == 64
    assert dataset["val_files"] == sorted(p.name for p in DEMO.glob("fineweb_val_*.bin"))


def test_submit_poll_cache_and_force(api):
    c = api.client
    r = c.post("/eval", json={**QUICK, "seed": 11})
    assert r.status_code == 202 and r.headers["location"] == f"/jobs/{r.json()['id']}"
    job = r.json()
    assert job["state"] in ("queued", "running") and job["cached"] is False and job["url"] == r.headers["location"]
    assert job["request"] == {k: v for k, v in {**QUICK, "seed": 11}.items() if k not in ("checkpoint", "dataset")}
    assert job["config"]["ttt_epochs"] == 1 and job["config"]["precision"] == "fp32"
    done = wait_job(c, job["id"])
    assert done["state"] == "succeeded", done["error"]
    result = done["result"]
    assert result["val_bpb"] > 0 and result["tokens_scored"] == 512
    assert done["progress"]["phase"] == "done" and done["progress"]["tokens_scored"] == 512
    assert done["started_at"] <= done["finished_at"] and done["finished_at"].endswith("Z")

    again = c.post("/eval", json={**QUICK, "seed": 11})
    assert again.status_code == 200
    hit = again.json()
    assert hit["cached"] is True and hit["state"] == "succeeded" and hit["id"] != job["id"]
    assert hit["result"] == result
    forced = c.post("/eval", json={**QUICK, "seed": 11, "force": True})
    assert forced.status_code == 202 and forced.json()["cached"] is False
    assert wait_job(c, forced.json()["id"])["result"]["val_bpb"] == pytest.approx(result["val_bpb"], abs=1e-9)


def test_wait_answers_with_the_finished_job(api):
    r = api.client.post("/eval", json={**QUICK, "seed": 12, "wait": True, "wait_timeout_s": 120})
    assert r.status_code == 200 and r.json()["state"] == "succeeded"
    slow = api.client.post("/eval", json={**LONG, "wait": True, "wait_timeout_s": 0.5})
    assert slow.status_code == 202 and slow.json()["state"] in ("queued", "running")
    assert api.client.delete(f"/jobs/{slow.json()['id']}").status_code == 200
    assert wait_job(api.client, slow.json()["id"])["state"] == "cancelled"


def read_events(client, job_id, on_first=None) -> list[tuple[str, dict]]:
    events, name = [], None
    with client.stream("GET", f"/jobs/{job_id}/events") as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                events.append((name, json.loads(line[6:])))
                if len(events) == 1 and on_first is not None:
                    on_first()
                if name == "end":
                    break
    return events


def test_events_stream_progress_then_end(api):
    c = api.client
    blocker = submit(api, **LONG, seed=22)
    wait_for(lambda: c.get(f"/jobs/{blocker['id']}").json()["state"] == "running", 60, "the blocker to run")
    job = submit(api, seed=13, ttt_epochs=2)  # queued behind the blocker: the stream sees it from the start
    events = read_events(c, job["id"], on_first=lambda: c.delete(f"/jobs/{blocker['id']}"))
    assert events[0][1]["state"] == "queued"
    names = [n for n, _ in events]
    assert names[0] == "state" and names[-1] == "end" and "progress" in names
    assert events[-1][1]["state"] == "succeeded" and events[-2][0] == "state"
    assert all(data["id"] == job["id"] for _, data in events)
    # A finished job's stream is its state, then end.
    assert [n for n, _ in read_events(api.client, job["id"])] == ["state", "end"]


def test_cancel_running_and_queued_jobs(api):
    c = api.client
    running = submit(api, **LONG, seed=14)
    queued = submit(api, seed=15, force=True)
    wait_for(
        lambda: (j := c.get(f"/jobs/{running['id']}").json())["state"] == "running" and j["progress"],
        60,
        "the long job to report progress",
    )
    assert c.get(f"/jobs/{queued['id']}").json()["state"] == "queued"
    r = c.delete(f"/jobs/{queued['id']}")
    assert r.status_code == 200 and r.json()["state"] == "cancelled"  # at once
    r = c.delete(f"/jobs/{running['id']}")
    assert r.status_code == 200 and r.json()["cancel_requested"] is True
    done = wait_job(c, running["id"], timeout=30)
    assert done["state"] == "cancelled" and done["error"]["code"] == "cancelled" and done["result"] is None
    for job_id in (running["id"], queued["id"]):
        r = c.delete(f"/jobs/{job_id}")
        assert r.status_code == 409 and r.json()["error"]["code"] == "job_finished"
    # The worker is free again.
    assert wait_job(c, submit(api, seed=16)["id"])["state"] == "succeeded"


def test_queue_full_answers_429_with_retry_after(api):
    c = api.client
    blocker = submit(api, **LONG, seed=17)
    wait_for(lambda: c.get(f"/jobs/{blocker['id']}").json()["state"] == "running", 60, "the blocker to run")
    queued = [submit(api, seed=100 + i) for i in range(3)]
    r = c.post("/eval", json={**QUICK, "seed": 200})
    assert r.status_code == 429 and int(r.headers["retry-after"]) > 0
    assert r.json()["error"]["code"] == "queue_full"
    for job in [*queued, blocker]:
        assert c.delete(f"/jobs/{job['id']}").status_code == 200
    wait_job(c, blocker["id"], timeout=30)


def test_list_jobs_newest_first_with_filters(api):
    c = api.client
    ids = [submit(api, seed=300 + i, ttt_epochs=0)["id"] for i in range(3)]
    for job_id in ids:
        wait_job(c, job_id)
    page = c.get("/jobs", params={"limit": 2}).json()
    assert page["limit"] == 2 and page["offset"] == 0 and page["total"] >= 3
    assert [j["id"] for j in page["jobs"]] == ids[::-1][:2]
    assert [j["id"] for j in c.get("/jobs", params={"limit": 1, "offset": 2}).json()["jobs"]] == [ids[0]]
    succeeded = c.get("/jobs", params={"state": "succeeded", "checkpoint": "demo", "limit": 1000}).json()
    assert succeeded["total"] == len(succeeded["jobs"]) and all(j["state"] == "succeeded" for j in succeeded["jobs"])
    assert c.get("/jobs", params={"dataset": "nope"}).json() == {"jobs": [], "total": 0, "limit": 50, "offset": 0}


def test_register_upload_and_evaluate_new_checkpoints(api):
    c = api.client
    tokenizer = next(DEMO.glob("*.model")).name  # relative to a data folder
    r = c.post(
        "/checkpoints",
        json={"name": "record", "path": "record.ptz", "preset": "tiny", "overrides": {}, "tokenizer": tokenizer},
    )
    assert r.status_code == 201, r.text
    assert r.json()["kind"] == "ptz" and r.json()["config"]["num_layers"] == 4
    assert r.json()["tokenizer"]["name"] == tokenizer
    assert [reg.name for reg in api.service.store.registrations()] == ["record"]  # kept across restarts

    data = (DEMO / "model.bin").read_bytes()
    r = c.post("/checkpoints", data={"name": "uploaded"}, files={"file": ("any-name.bin", data)})
    assert r.status_code == 201, r.text
    assert r.json()["sha256"] == c.get("/checkpoints/demo").json()["sha256"]
    stored = Path(r.json()["path"])
    assert stored.parent == api.service.settings.upload_dir and stored.read_bytes() == data
    job = submit(api, checkpoint="uploaded", seed=18)
    assert wait_job(c, job["id"])["state"] == "succeeded"

    junk = {"file": ("junk.bin", b"not a checkpoint" * 100)}
    r = c.post("/checkpoints", data={"name": "junk"}, files=junk)  # not a model.bin, so a .ptz: needs a preset
    assert r.status_code == 422 and r.json()["error"]["detail"]["field"] == "preset"
    r = c.post("/checkpoints", data={"name": "junk", "preset": "tiny"}, files=junk)
    assert r.status_code == 422 and r.json()["error"]["detail"]["field"] == "file"
    assert not list(api.service.settings.upload_dir.glob("junk*"))
    too_big = b"\0" * (api.upload_limit + 128 * 1024)
    r = c.post("/checkpoints", data={"name": "big"}, files={"file": ("big.bin", too_big)})
    assert r.status_code == 413 and r.json()["error"]["code"] == "too_large"


def test_metrics_and_docs(api):
    c = api.client
    wait_job(c, submit(api, seed=19)["id"])
    text = c.get("/metrics").text
    for needle in (
        'pgttt_jobs{state="succeeded"}',
        "pgttt_queue_depth",
        'pgttt_worker_state{device="cpu",state="idle"',
        "pgttt_eval_seconds_bucket",
        "pgttt_tokens_scored_total",
        "pgttt_cache_hits_total",
    ):
        assert needle in text, needle
    scored = next(line for line in text.splitlines() if line.startswith("pgttt_tokens_scored_total"))
    assert float(scored.split()[-1]) >= 512
    spec = c.get("/openapi.json").json()
    body = spec["paths"]["/eval"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert "examples" in spec["components"]["schemas"][body["$ref"].rsplit("/", 1)[1]]
    assert c.get("/docs").status_code == 200


def bad_requests():
    e = "/eval"
    rows = [
        ("POST", e, {"content": b'{"checkpoint": "demo",', "headers": {"content-type": "application/json"}}, 400, None),
        ("POST", e, {"json": [QUICK]}, 400, None),
        ("POST", e, {"json": {"dataset": "demo"}}, 422, "checkpoint"),
        ("POST", e, {"json": {"checkpoint": "demo"}}, 422, "dataset"),
        ("POST", e, {"json": {**QUICK, "checkpoint": "nope"}}, 404, "checkpoint"),
        ("POST", e, {"json": {**QUICK, "dataset": "nope"}}, 404, "dataset"),
        ("POST", e, {"json": {**QUICK, "ttt_lr": -1}}, 422, "ttt_lr"),
        ("POST", e, {"json": {**QUICK, "ttt_lr": "fast"}}, 422, "ttt_lr"),
        (
            "POST",
            e,
            {"content": json.dumps({**QUICK, "ttt_lr": float("nan")}), "headers": {"content-type": "application/json"}},
            422,
            "ttt_lr",
        ),
        ("POST", e, {"json": {**QUICK, "ttt_epochs": -1}}, 422, "ttt_epochs"),
        ("POST", e, {"json": {**QUICK, "ttt_epochs": 1.5}}, 422, "ttt_epochs"),
        ("POST", e, {"json": {**QUICK, "chunk_tokens": 0}}, 422, "chunk_tokens"),
        ("POST", e, {"json": {**QUICK, "ttt_momentum": 1.0}}, 422, "ttt_momentum"),
        ("POST", e, {"json": {**QUICK, "seq_len": 0}}, 422, "seq_len"),
        ("POST", e, {"json": {**QUICK, "stride": 0}}, 422, "stride"),
        ("POST", e, {"json": {**QUICK, "seq_len": 64, "stride": 128}}, 422, "stride"),
        ("POST", e, {"json": {**QUICK, "batch_seqs": 0}}, 422, "batch_seqs"),
        ("POST", e, {"json": {**QUICK, "max_tokens": 0}}, 422, "max_tokens"),
        ("POST", e, {"json": {**QUICK, "grad_clip": 0}}, 422, "grad_clip"),
        ("POST", e, {"json": {**QUICK, "lr_schedule": "linear"}}, 422, "lr_schedule"),
        ("POST", e, {"json": {**QUICK, "optimizer": "lion"}}, 422, "optimizer"),
        ("POST", e, {"json": {**QUICK, "adapt_include": ["no.such.param*"]}}, 422, "adapt_include"),
        ("POST", e, {"json": {**QUICK, "adapt_exclude": "blocks.*"}}, 422, "adapt_exclude"),
        ("POST", e, {"json": {**QUICK, "precision": "fp8"}}, 422, "precision"),
        ("POST", e, {"json": {**QUICK, "seed": -1}}, 422, "seed"),
        ("POST", e, {"json": {**QUICK, "gpus": 0}}, 422, "gpus"),
        ("POST", e, {"json": {**QUICK, "gpus": 2}}, 422, "gpus"),
        ("POST", e, {"json": {**QUICK, "force": "yes"}}, 422, "force"),
        ("POST", e, {"json": {**QUICK, "wait_timeout_s": 601}}, 422, "wait_timeout_s"),
        ("POST", e, {"json": {**QUICK, "ttt_lr_typo": 0.1}}, 422, "ttt_lr_typo"),
        ("GET", "/jobs/nope", {}, 404, "job"),
        ("DELETE", "/jobs/nope", {}, 404, "job"),
        ("GET", "/jobs/nope/events", {}, 404, "job"),
        ("GET", "/jobs?state=bogus", {}, 422, "state"),
        ("GET", "/jobs?limit=0", {}, 422, "limit"),
        ("GET", "/jobs?offset=-1", {}, 422, "offset"),
        ("GET", "/checkpoints/nope", {}, 404, "checkpoint"),
        ("POST", "/checkpoints", {"json": {"name": "x", "path": "../outside.bin"}}, 422, "path"),
        ("POST", "/checkpoints", {"json": {"name": "x", "path": "OUTSIDE_ABS"}}, 422, "path"),
        ("POST", "/checkpoints", {"json": {"name": "x", "path": "escape.bin"}}, 422, "path"),
        ("POST", "/checkpoints", {"json": {"name": "x", "path": "no-such.bin"}}, 422, "path"),
        ("POST", "/checkpoints", {"json": {"name": "bad name!", "path": "extra/model.bin"}}, 422, "name"),
        ("POST", "/checkpoints", {"json": {"name": "demo", "path": "extra/model.bin"}}, 409, "name"),
        ("POST", "/checkpoints", {"json": {"name": "x", "path": "extra/model.bin", "preset": "tiny"}}, 422, "preset"),
        ("POST", "/checkpoints", {"json": {"name": "x", "path": "record.ptz"}}, 422, "preset"),
        ("POST", "/checkpoints", {"json": {"name": "x", "path": "record.ptz", "preset": "huge"}}, 422, "preset"),
        (
            "POST",
            "/checkpoints",
            {"json": {"name": "x", "path": "record.ptz", "preset": "tiny", "overrides": {"mlp_mult": 3.0}}},
            422,
            "path",
        ),
        (
            "POST",
            "/checkpoints",
            {"json": {"name": "x", "path": "record.ptz", "preset": "tiny", "overrides": {"bogus": 1}}},
            422,
            "overrides",
        ),
        ("POST", "/checkpoints", {"json": {"name": "x"}}, 422, "path"),
        (
            "POST",
            "/checkpoints",
            {"json": {"name": "x", "path": "record.ptz", "preset": "tiny", "tokenizer": "../tok.model"}},
            422,
            "tokenizer",
        ),
        (
            "POST",
            "/checkpoints",
            {"json": {"name": "x", "path": "extra/model.bin", "tokenizer": "tokenizer.model"}},
            422,
            "tokenizer",
        ),
        ("POST", "/checkpoints", {"content": b"{", "headers": {"content-type": "application/json"}}, 400, None),
        ("POST", "/checkpoints", {"content": b"x", "headers": {"content-type": "text/plain"}}, 415, None),
        ("POST", "/checkpoints", {"data": {"name": "x"}, "files": {"other": ("a", b"b")}}, 422, "file"),
        (
            "POST",
            "/checkpoints",
            {"data": {"name": "x", "preset": "tiny"}, "files": {"file": ("m.bin", b"PGTTTBIN...")}},
            422,
            "preset",
        ),
        (
            "POST",
            "/checkpoints",
            {"data": {"name": "x", "preset": "tiny", "overrides": "{not json"}, "files": {"file": ("a.ptz", b"zz")}},
            422,
            "overrides",
        ),
    ]
    return rows


@pytest.mark.parametrize(
    "method,url,kwargs,status,field",
    bad_requests(),
    ids=[f"{i:02d}-{r[0]}-{r[4] or r[3]}" for i, r in enumerate(bad_requests())],
)
def test_bad_requests_get_the_right_status_and_name_the_field(api, method, url, kwargs, status, field):
    if kwargs.get("json", {}) and isinstance(kwargs["json"], dict) and kwargs["json"].get("path") == "OUTSIDE_ABS":
        kwargs = {"json": {**kwargs["json"], "path": str(api.root / OUTSIDE)}}
    r = api.client.request(method, url, **kwargs)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"code", "message", "detail"} and error["code"] and error["message"]
    if field is not None:
        assert field in error["message"], error
        assert error["detail"]["field"] == field, error


def test_a_worker_that_dies_fails_its_job_and_comes_back(api):
    c = api.client
    job = submit(api, **LONG, seed=20)
    wait_for(lambda: c.get(f"/jobs/{job['id']}").json()["state"] == "running", 60, "the job to run")
    worker = api.service.pool.workers[0]
    os.kill(worker.process.pid, signal.SIGKILL)
    failed = wait_job(c, job["id"], timeout=30)
    assert failed["state"] == "failed" and failed["error"]["code"] == "worker_died"
    assert "SIGKILL" in failed["error"]["message"] and "cpu" in failed["error"]["message"]
    wait_ready(c)
    assert wait_job(c, submit(api, seed=21)["id"])["state"] == "succeeded"


def test_api_key_and_not_ready(tmp_path):
    app = create_app(
        Settings(checkpoint_dirs=[DEMO], data_dirs=[DEMO], state_dir=tmp_path, devices=["cpu"], api_key="s3cret")
    )
    c = TestClient(app)  # no lifespan: nothing loaded, so never ready; the store answers
    assert c.get("/healthz").json() == {"status": "ok"}
    r = c.get("/readyz")
    assert r.status_code == 503 and r.json()["ready"] is False
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"X-API-Key": "wrong"}, {"Authorization": "s3cret"}):
        for method, url in (("GET", "/jobs"), ("POST", "/eval"), ("GET", "/metrics"), ("GET", "/checkpoints")):
            r = c.request(method, url, headers=headers, json=QUICK)
            assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized", (method, url, headers)
    assert c.get("/jobs", headers={"Authorization": "Bearer s3cret"}).json()["total"] == 0
    assert c.get("/jobs", headers={"X-API-Key": "s3cret"}).status_code == 200
    r = c.post("/eval", headers={"X-API-Key": "s3cret"}, json=QUICK)
    assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready" and int(r.headers["retry-after"]) > 0


def test_non_finite_numbers_are_null_in_json():
    from pgttt.app.service import job_to_api
    from pgttt.app.store import JobRecord

    job = JobRecord(
        id="j",
        state="succeeded",
        checkpoint="c",
        dataset="d",
        request={},
        gpus=1,
        created_at="t",
        result={"val_bpb": float("nan"), "chunks": [{"loss": float("inf")}, {"loss": 1.5}]},
    )
    out = job_to_api(job)
    assert out["result"] == {"val_bpb": None, "chunks": [{"loss": None}, {"loss": 1.5}]}
    json.dumps(out, allow_nan=False)


def test_a_worker_compiles_what_its_start_left_out_once_ready_and_jobs_then_wait_in_the_queue(tmp_path, monkeypatch):
    from tests.helpers.app import EngineSlowToWarmTheRest

    rest_log = tmp_path / "rest.log"
    monkeypatch.setenv("PGTTT_TEST_REST_LOG", str(rest_log))  # the spawned worker inherits it
    settings = Settings(checkpoint_dirs=[DEMO], data_dirs=[DEMO], state_dir=tmp_path, devices=["cpu"])
    app = create_app(settings, engine_factory=EngineSlowToWarmTheRest)
    worker = app.state.service.pool.workers[0]
    with TestClient(app) as c:
        wait_for(lambda: worker.state == "compiling", 90, "the worker to compile the rest")
        r = c.get("/readyz")
        assert r.status_code == 200 and r.json()["workers"][0]["state"] == "compiling"
        job = c.post("/eval", json=QUICK).json()
        assert job["state"] == "queued"  # not sent to a worker that is compiling
        assert wait_job(c, job["id"])["state"] == "succeeded"
        assert worker.state == "idle" and not worker.warm_pending
    assert len(rest_log.read_text().splitlines()) == 1  # once a start, not after every job


def test_workers_that_cannot_start_are_retried_then_marked_failed(tmp_path):
    from tests.helpers.app import EngineThatCannotStart

    settings = Settings(checkpoint_dirs=[DEMO], data_dirs=[DEMO], state_dir=tmp_path, devices=["cpu"])
    app = create_app(settings, engine_factory=EngineThatCannotStart)
    service = app.state.service
    service.pool.restart_delays = (0.0, 0.1, 0.1)
    with TestClient(app) as c:
        wait_for(lambda: service.pool.workers[0].state == "failed", 90, "the worker to be given up")
        r = c.get("/readyz")
        assert r.status_code == 503 and r.json()["workers"][0]["state"] == "failed"
        r = c.post("/eval", json=QUICK)
        assert r.status_code == 503 and r.json()["error"]["code"] == "no_workers"
        assert service.pool.workers[0].generation == 3  # started three times
        assert "out of memory on cpu" in service.pool.workers[0].last_error
