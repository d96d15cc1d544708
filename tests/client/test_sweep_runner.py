"""The sweep runner against in-process test doubles of the HTTP API (httpx.MockTransport): spreading, bounds,
resuming, restarts, vanished jobs, dead servers, rejected points, Ctrl-C. The real server: test_sweep_e2e.py."""

from __future__ import annotations

import _thread
import itertools
import json
import re
import signal
import threading

import httpx
import pytest

from pgttt.client.client import Client
from pgttt.client.retry import RetryPolicy
from pgttt.client.sweep_runner import SweepRunner
from pgttt.client.sweep_spec import SweepError, parse_spec

SPEC = {
    "checkpoint": "demo",
    "dataset": "demo",
    "fixed": {"max_tokens": 4096},
    "grid": {"ttt_epochs": [0, 1, 2], "chunk_tokens": [1024, 2048]},
}
_ids = itertools.count()


class FakeServer:
    """The API's job lifecycle without an engine: a job finishes after ``polls`` GETs; its result is made up
    from the request. ``down`` refuses connections for that many requests; ``restart()`` also fails the
    unfinished jobs the way the real store does after a restart."""

    def __init__(
        self,
        url: str,
        *,
        polls: int = 2,
        sha256: str = "c0ffee",
        fingerprint: str = "f1",
        forget: bool = False,
        key: str | None = None,
    ) -> None:
        self.url, self.polls, self.sha256, self.fingerprint, self.forget, self.key = (
            url,
            polls,
            sha256,
            fingerprint,
            forget,
            key,
        )
        self.lock = threading.Lock()
        self.jobs: dict[str, dict] = {}
        self.seen: dict[str, int] = {}
        self.submitted: list[dict] = []
        self.deleted: list[str] = []
        self.down = 0
        self.max_active = 0
        self.on_submit = None
        self.fail_codes: list[str] = []  # error codes for the next jobs to fail with
        self.warming = 0  # /readyz answers 503 this many times (and POST /eval 503 meanwhile)
        self.drop_posts = 0  # POST /eval answers lost on the way back

    def active(self) -> int:
        return sum(j["state"] in ("queued", "running") for j in self.jobs.values())

    def restart(self, down_for: int) -> None:
        for job in self.jobs.values():
            if job["state"] in ("queued", "running"):
                job.update(
                    state="failed",
                    error={"code": "server_stopped", "message": "server stopped while the job was running"},
                )
        self.down = down_for

    def handle(self, request: httpx.Request) -> httpx.Response:
        with self.lock:
            if self.down:
                self.down -= 1
                raise httpx.ConnectError("[Errno 111] Connection refused")
            if self.key and request.headers.get("Authorization") != f"Bearer {self.key}":
                return error(401, "unauthorized", "missing or wrong API key")
            method, path = request.method, request.url.path
            if path == "/readyz":
                self.warming -= 1
                return httpx.Response(200 if self.warming < 0 else 503, json={"ready": self.warming < 0, "workers": []})
            if self.warming >= 0 and method == "POST":
                return error(503, "not_ready", "warming up")
            if path == "/checkpoints/demo":
                return httpx.Response(200, json={"name": "demo", "sha256": self.sha256})
            if path.startswith("/checkpoints/"):
                return error(404, "not_found", f"no checkpoint {path.rsplit('/', 1)[1]}")
            if path == "/checkpoints":
                return httpx.Response(200, json={"checkpoints": [{"name": "demo"}]})
            if path == "/datasets":
                return httpx.Response(200, json={"datasets": [{"name": "demo", "fingerprint": self.fingerprint}]})
            if method == "POST" and path == "/eval":
                answer = self.submit(json.loads(request.content))
                if self.drop_posts:  # the job exists, but the answer never arrives
                    self.drop_posts -= 1
                    raise httpx.ReadError("connection reset by peer")
                return answer
            job_id = path.split("/")[2]
            job = self.jobs.get(job_id)
            if job is None or self.forget:
                return error(404, "not_found", f"no job {job_id}")
            if method == "DELETE":
                if job["state"] not in ("queued", "running"):
                    return error(409, "conflict", f"job {job_id} already {job['state']}")
                self.deleted.append(job_id)
                job["state"] = "cancelled"
                return httpx.Response(200, json=job)
            self.seen[job_id] += 1
            if job["state"] in ("queued", "running") and self.seen[job_id] >= self.polls:
                if self.fail_codes:
                    code = self.fail_codes.pop(0)
                    job.update(state="failed", error={"code": code, "message": f"{code} happened"})
                else:
                    job.update(state="succeeded", result=made_up_result(job["request"]))
            elif job["state"] == "queued":
                job["state"] = "running"
            return httpx.Response(200, json=job)

    def submit(self, body: dict) -> httpx.Response:
        if body.get("ttt_lr", 0) < 0:
            return error(422, "invalid_field", f"ttt_lr={body['ttt_lr']}: must be within 0..10", field="ttt_lr")
        self.submitted.append(body)
        request = {k: v for k, v in body.items() if k not in ("checkpoint", "dataset", "gpus", "force")}
        job_id = f"j{next(_ids)}"
        self.jobs[job_id] = {
            "id": job_id,
            "url": f"/jobs/{job_id}",
            "state": "queued",
            "cached": False,
            "checkpoint": body["checkpoint"],
            "dataset": body["dataset"],
            "request": request,
            "result": None,
            "error": None,
            "created_at": "2026-01-01T00:00:00Z",
        }
        self.seen[job_id] = 0
        self.max_active = max(self.max_active, self.active())
        if self.on_submit:
            self.on_submit(self)
        return httpx.Response(202, json=self.jobs[job_id], headers={"Location": f"/jobs/{job_id}"})


def made_up_result(request: dict) -> dict:
    epochs = request.get("ttt_epochs", 3)
    return {
        "val_bpb": 2.0 - 0.01 * epochs + request.get("chunk_tokens", 0) * 1e-6,
        "val_loss": 1.4,
        "tokens_scored": 4096,
        "config": {"ttt_epochs": epochs},
        "timings": {"eval_s": 1.0 + epochs},
    }


def error(status: int, code: str, message: str, **detail) -> httpx.Response:
    return httpx.Response(status, json={"error": {"code": code, "message": message, "detail": detail or None}})


def runner(
    tmp_path, *servers: FakeServer, concurrency: int = 2, api_key: str | None = None, progress: bool = False, **kwargs
) -> SweepRunner:
    by_url = {s.url: s for s in servers}

    def client(url: str) -> Client:
        return Client(
            url,
            api_key=api_key,
            transport=httpx.MockTransport(by_url[url].handle),
            retry=RetryPolicy(attempts=3, initial_s=0.001),
            sleep=lambda s: None,
        )

    return SweepRunner(
        list(by_url),
        tmp_path / "out",
        concurrency=concurrency,
        poll_s=0.001,
        progress=progress,
        client_factory=client,
        **kwargs,
    )


def lines(tmp_path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]


def test_points_spread_over_servers_within_the_concurrency_bound(tmp_path):
    a, b = FakeServer("http://a:1", polls=4), FakeServer("http://b:2", polls=4)
    points = parse_spec(SPEC).expand()
    outcome = runner(tmp_path, a, b, concurrency=2).run(points)
    assert (outcome.done, outcome.already, outcome.failed, outcome.dead) == (6, 0, [], {})
    records = lines(tmp_path)
    assert sorted(r["key"] for r in records) == sorted(p.key for p in points)
    for r in records:
        server = a if r["server"] == a.url else b
        job = server.jobs[r["job_id"]]
        assert r["result"] == job["result"] and job["state"] == "succeeded"
        assert r["request"] == job["request"] == next(p.fields for p in points if p.key == r["key"])
    assert a.submitted and b.submitted and len(a.submitted) + len(b.submitted) == 6
    assert 1 <= a.max_active <= 2 and 1 <= b.max_active <= 2


def test_the_progress_bar_shows_done_of_total_and_the_best_so_far(tmp_path, capsys):
    points = parse_spec(SPEC).expand()
    runner(tmp_path, FakeServer("http://a:1"), progress=True).run(points[:2])
    best = min(made_up_result(p.fields)["val_bpb"] for p in points[:2])
    bar = capsys.readouterr().err.split("\r")[-1]
    assert bar.startswith("sweep: 100%") and "2/2" in bar and f"best bpb {best:.4f}, failed 0" in bar
    runner(tmp_path, FakeServer("http://a:1"), progress=True).run(points)  # resumed: the bar counts what is left
    assert f"{len(points) - 2}/{len(points) - 2}" in capsys.readouterr().err.split("\r")[-1]


def test_the_sweep_waits_for_a_warming_server_and_passes_force(tmp_path):
    server = FakeServer("http://a:1")
    server.warming = 3
    outcome = runner(tmp_path, server, force=True).run(parse_spec(SPEC).expand())
    assert outcome.done == 6 and server.warming < 0
    assert all(body["force"] is True for body in server.submitted)


def test_a_server_that_goes_back_to_warming_up_is_waited_for(tmp_path):
    server = FakeServer("http://a:1")
    server.on_submit = lambda s: setattr(s, "warming", 5) if len(s.submitted) == 2 else None
    outcome = runner(tmp_path, server).run(parse_spec(SPEC).expand())
    assert (outcome.done, outcome.failed, outcome.dead) == (6, [], {}) and len(server.submitted) == 6


def test_a_rerun_submits_only_what_is_missing(tmp_path):
    points = parse_spec(SPEC).expand()
    runner(tmp_path, FakeServer("http://a:1")).run(points)
    path = tmp_path / "out" / "results.jsonl"
    kept = path.read_text().splitlines()[:3]
    path.write_text("\n".join(kept) + "\n" + '{"key": "half-written')  # killed in the middle of a write
    again = FakeServer("http://a:1")
    outcome = runner(tmp_path, again).run(points)
    assert (outcome.already, outcome.done) == (3, 3) and len(again.submitted) == 3
    kept_keys = {json.loads(line)["key"] for line in kept}
    sent = {
        json.dumps({k: v for k, v in s.items() if k not in ("checkpoint", "dataset", "gpus", "force")}, sort_keys=True)
        for s in again.submitted
    }
    assert sent == {json.dumps(p.fields, sort_keys=True) for p in points if p.key not in kept_keys}
    assert sorted(r["key"] for r in lines(tmp_path)) == sorted(p.key for p in points)  # the partial line is gone
    third = FakeServer("http://a:1")
    assert runner(tmp_path, third).run(points).already == 6 and third.submitted == []


def test_a_whole_last_line_without_newline_is_kept(tmp_path):
    points = parse_spec(SPEC).expand()
    runner(tmp_path, FakeServer("http://a:1")).run(points[:2])
    path = tmp_path / "out" / "results.jsonl"
    path.write_text(path.read_text().rstrip("\n"))  # e.g. edited by hand
    again = FakeServer("http://a:1")
    assert runner(tmp_path, again).run(points).already == 2 and len(again.submitted) == 4
    assert len(lines(tmp_path)) == 6


def test_a_server_restart_costs_only_time(tmp_path):
    server = FakeServer("http://a:1", polls=3)
    server.on_submit = lambda s: s.restart(down_for=2) if len(s.submitted) == 3 else None
    outcome = runner(tmp_path, server).run(parse_spec(SPEC).expand())
    assert (outcome.done, outcome.failed, outcome.dead) == (6, [], {})
    failed = [j for j in server.jobs.values() if j["state"] == "failed"]
    assert failed and all(j["error"]["code"] == "server_stopped" for j in failed)
    assert len(server.submitted) == 6 + len(failed)  # each stopped job was submitted again
    assert len(lines(tmp_path)) == 6


def test_a_submit_cut_off_mid_answer_is_submitted_again_and_the_server_kept(tmp_path):
    server = FakeServer("http://a:1")
    server.drop_posts = 1
    outcome = runner(tmp_path, server).run(parse_spec(SPEC).expand())
    assert (outcome.done, outcome.failed, outcome.dead) == (6, [], {}) and len(server.submitted) == 7


def test_a_job_the_server_forgot_is_resubmitted(tmp_path):
    server = FakeServer("http://a:1", forget=True)
    outcome = runner(tmp_path, server, max_attempts=2).run(parse_spec({**SPEC, "grid": {"ttt_epochs": [1]}}).expand())
    assert outcome.done == 0 and len(server.submitted) == 2
    ((point, why),) = outcome.failed
    assert "404 not_found: no job" in why and "|" in why  # both attempts' reasons


def test_a_failed_job_is_retried_but_refused_settings_are_not(tmp_path):
    server = FakeServer("http://a:1")
    server.fail_codes = ["engine_error", "invalid_input"]
    spec = {**SPEC, "grid": {"ttt_epochs": [1]}, "points": [{"ttt_epochs": 2, "ttt_lr": -1.0}]}
    outcome = runner(tmp_path, server, concurrency=1).run(parse_spec(spec).expand())
    failures = {p.fields["ttt_epochs"]: why for p, why in outcome.failed}
    assert outcome.done == 0 and set(failures) == {1, 2}
    assert "job j" in failures[1] and "failed: invalid_input happened" in failures[1]  # not resubmitted after it
    assert len(server.submitted) == 2  # epochs 1 twice (engine_error, then invalid_input); lr -1 refused
    assert "rejected the request" in failures[2] and "(field 'ttt_lr')" in failures[2]


def test_a_dead_server_is_named_and_the_others_do_the_work(tmp_path):
    alive, dead = FakeServer("http://alive:1"), FakeServer("http://dead:2")
    dead.down = 10**6
    outcome = runner(tmp_path, alive, dead).run(parse_spec(SPEC).expand())
    assert outcome.done == 6 and len(alive.submitted) == 6
    assert list(outcome.dead) == ["http://dead:2"]
    assert "Connection refused" in outcome.dead["http://dead:2"] and "3 attempts" in outcome.dead["http://dead:2"]


def test_a_server_lost_mid_sweep_hands_its_points_to_the_others(tmp_path):
    a, b = FakeServer("http://a:1", polls=3), FakeServer("http://b:2", polls=3)
    b.on_submit = lambda s: setattr(s, "down", 10**6) if len(s.submitted) == 1 else None
    outcome = runner(tmp_path, a, b, concurrency=1).run(parse_spec(SPEC).expand())
    assert outcome.done == 6 and list(outcome.dead) == ["http://b:2"]
    assert len(lines(tmp_path)) == 6 and {r["server"] for r in lines(tmp_path)} == {"http://a:1"}


def test_every_server_dead_is_an_error_naming_them(tmp_path):
    dead = FakeServer("http://dead:2")
    dead.down = 10**6
    message = r"no server can be reached: http://dead:2/checkpoints/demo: unreachable: .*Connection refused"
    with pytest.raises(SweepError, match=message):
        runner(tmp_path, dead).run(parse_spec(SPEC).expand())


def test_losing_the_last_server_mid_sweep_keeps_what_finished(tmp_path):
    server = FakeServer("http://a:1", polls=2)
    server.on_submit = lambda s: setattr(s, "down", 10**6) if len(s.submitted) == 3 else None
    with pytest.raises(SweepError, match=r"every server is gone with \d point\(s\) left .*rerun to resume"):
        runner(tmp_path, server, concurrency=1).run(parse_spec(SPEC).expand())
    assert len(lines(tmp_path)) == 2


@pytest.mark.parametrize(
    "servers, message",
    [
        (
            [FakeServer("http://a:1"), FakeServer("http://b:2", sha256="beef")],
            "servers disagree about checkpoint 'demo': http://a:1 has sha256 c0ffee, http://b:2 has sha256 beef",
        ),
        (
            [FakeServer("http://a:1"), FakeServer("http://b:2", fingerprint="f2")],
            "servers disagree about dataset 'demo': http://a:1 has fingerprint f1, http://b:2 has fingerprint f2",
        ),
    ],
)
def test_servers_must_agree_on_what_they_evaluate(tmp_path, servers, message):
    with pytest.raises(SweepError, match=re.escape(message)):
        runner(tmp_path, *servers).run(parse_spec(SPEC).expand())


def test_unknown_names_and_refused_keys_stop_before_any_job(tmp_path):
    server = FakeServer("http://a:1")
    with pytest.raises(SweepError, match=r"server http://a:1 has no checkpoint 'nope' \(it has: demo\)"):
        runner(tmp_path, server).run(parse_spec({**SPEC, "checkpoint": "nope"}).expand())
    with pytest.raises(SweepError, match=r"server http://a:1 has no dataset 'other' \(it has: demo\)"):
        runner(tmp_path, server).run(parse_spec({**SPEC, "dataset": "other"}).expand())
    locked = FakeServer("http://k:1", key="right")
    with pytest.raises(SweepError, match=r"server http://k:1: .*401 unauthorized"):
        runner(tmp_path, locked, api_key="wrong").run(parse_spec(SPEC).expand())
    assert server.submitted == [] and locked.submitted == []
    assert runner(tmp_path, locked, api_key="right").run(parse_spec(SPEC).expand()).done == 6


@pytest.fixture
def python_ctrl_c():
    """Python's own Ctrl-C handler for the test: interrupt_main does nothing while SIGINT is ignored or handled
    by something else, as code an earlier test ran in this process may leave it (the full suite hung once)."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


@pytest.mark.usefixtures("python_ctrl_c")
def test_ctrl_c_cancels_the_jobs_in_flight(tmp_path):
    server = FakeServer("http://a:1", polls=10**9)  # jobs never finish on their own
    sweep = runner(tmp_path, server, concurrency=4)

    def ctrl_c_until_heard() -> None:
        # interrupt_main only marks the interrupt for the main thread's next bytecode; a finalizer that runs
        # there (garbage collection of an earlier test's objects) can swallow it, and the sweep would wait for
        # ever. So Ctrl-C again, twice a second, until the runner has started cancelling.
        while not sweep._stop.is_set():
            _thread.interrupt_main()
            sweep._stop.wait(0.5)

    def on_submit(s: FakeServer) -> None:
        if len(s.submitted) == 4:
            threading.Thread(target=ctrl_c_until_heard, daemon=True).start()

    server.on_submit = on_submit
    outcome = sweep.run(parse_spec(SPEC).expand())
    assert outcome.interrupted and outcome.done == 0
    assert len(server.submitted) == 4 and sorted(server.deleted) == sorted(server.jobs)
    assert outcome.cancelled == 4 and all(j["state"] == "cancelled" for j in server.jobs.values())
