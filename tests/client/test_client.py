"""The HTTP client against httpx.MockTransport: retries, backoff, Retry-After, error parsing, SSE, polling."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import httpx
import pytest

from pgttt.client.client import Client, RequestError, ServerUnreachable
from pgttt.client.retry import RetryPolicy, parse_retry_after
from pgttt.client.sse import iter_sse

URL = "http://pod.test:8000"


def job_json(job_id: str = "j1", state: str = "queued", **extra) -> dict:
    return {
        "id": job_id,
        "url": f"/jobs/{job_id}",
        "state": state,
        "cached": False,
        "checkpoint": "demo",
        "dataset": "demo",
        "request": {},
        "config": None,
        "gpus": 1,
        "created_at": "2026-01-01T00:00:00Z",
        "started_at": None,
        "finished_at": None,
        "progress": None,
        "result": None,
        "error": None,
        **extra,
    }


class Script:
    """A handler answering from a list of responses (or exceptions to raise), recording every request."""

    def __init__(self, *answers) -> None:
        self.answers = list(answers)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        return answer


def client(handler, attempts: int = 4, **kwargs) -> tuple[Client, list[float]]:
    sleeps: list[float] = []
    api = Client(
        URL,
        transport=httpx.MockTransport(handler),
        retry=RetryPolicy(attempts=attempts),
        sleep=sleeps.append,
        rng=random.Random(0),
        **kwargs,
    )
    return api, sleeps


def error(status: int, code: str, message: str, headers: dict | None = None, **detail) -> httpx.Response:
    return httpx.Response(
        status, json={"error": {"code": code, "message": message, "detail": detail or None}}, headers=headers
    )


def test_503_then_200_is_retried_once():
    script = Script(error(503, "not_ready", "warming up"), httpx.Response(200, json={"status": "ok"}))
    api, sleeps = client(script)
    assert api.health() == {"status": "ok"}
    assert len(script.requests) == 2 and len(sleeps) == 1
    assert 0.25 <= sleeps[0] <= 0.5  # first backoff: initial 0.5 s less up to half of it as jitter


def test_retry_after_seconds_is_honoured_on_429():
    full = error(429, "queue_full", "queue is full", {"Retry-After": "7"})
    script = Script(full, httpx.Response(202, json=job_json()))
    api, sleeps = client(script)
    job = api.submit("demo", "demo", ttt_epochs=1)
    assert job.id == "j1" and job.state == "queued"
    assert sleeps == [7.0]
    sent = json.loads(script.requests[-1].content)
    assert sent == {"checkpoint": "demo", "dataset": "demo", "ttt_epochs": 1, "gpus": 1, "force": False}


def test_retry_after_http_date_is_honoured():
    when = datetime.now(UTC) + timedelta(seconds=30)
    script = Script(
        error(503, "not_ready", "later", {"Retry-After": format_datetime(when, usegmt=True)}),
        httpx.Response(200, json={"status": "ok"}),
    )
    api, sleeps = client(script)
    api.health()
    assert 27 <= sleeps[0] <= 30


def test_retry_after_is_capped():
    script = Script(error(503, "not_ready", "later", {"Retry-After": "100000"}), httpx.Response(200, json={}))
    api, sleeps = client(script)
    api.health()
    assert sleeps == [RetryPolicy().max_retry_after_s]


def test_connection_errors_are_retried_with_growing_backoff():
    refused = httpx.ConnectError("[Errno 111] Connection refused")
    script = Script(refused, refused, refused, httpx.Response(200, json={"status": "ok"}))
    api, sleeps = client(script, attempts=5)
    assert api.health() == {"status": "ok"}
    assert len(script.requests) == 4 and len(sleeps) == 3
    for n, delay in enumerate(sleeps):
        assert 0.5 * 2**n * 0.5 <= delay <= 0.5 * 2**n


def test_backoff_is_capped_and_jittered():
    policy = RetryPolicy(initial_s=1.0, max_delay_s=4.0, jitter=0.5)
    rng = random.Random(1)
    delays = [policy.delay(n, rng) for n in range(8)]
    assert all(2.0 <= d <= 4.0 for d in delays[2:])  # capped at 4, jitter takes at most half
    assert len(set(delays)) == len(delays)  # jitter: no two retries in lock step
    assert RetryPolicy(jitter=0.0).delay(3, rng) == 4.0


def test_gives_up_after_n_attempts_naming_the_url():
    script = Script(httpx.ConnectError("[Errno 111] Connection refused"))
    api, sleeps = client(script, attempts=3)
    with pytest.raises(ServerUnreachable) as info:
        api.job("j1")
    assert len(script.requests) == 3 and len(sleeps) == 2
    exc = info.value
    assert exc.status is None and exc.code == "unreachable"
    assert f"{URL}/jobs/j1" in str(exc) and "Connection refused" in str(exc) and "3 attempts" in str(exc)


def test_503_forever_gives_up_with_the_server_error():
    script = Script(error(503, "not_ready", "still warming up"))
    api, sleeps = client(script, attempts=3)
    with pytest.raises(RequestError) as info:
        api.submit("demo", "demo")
    assert info.value.status == 503 and info.value.code == "not_ready" and "still warming up" in str(info.value)
    assert len(script.requests) == 3


def test_422_is_not_retried_and_names_the_field():
    script = Script(error(422, "invalid_field", "ttt_lr=-1: must be within 0..10", field="ttt_lr"))
    api, sleeps = client(script)
    with pytest.raises(RequestError) as info:
        api.submit("demo", "demo", ttt_lr=-1.0)
    exc = info.value
    assert (exc.status, exc.code, exc.field) == (422, "invalid_field", "ttt_lr")
    assert exc.message == "ttt_lr=-1: must be within 0..10" and "'ttt_lr'" in str(exc)
    assert len(script.requests) == 1 and sleeps == []


def test_error_without_the_json_shape_still_reads():
    api, _ = client(Script(httpx.Response(502, text="<html>Bad gateway</html>")))
    with pytest.raises(RequestError) as info:
        api.checkpoints()
    assert info.value.status == 502 and info.value.code == "http_502" and "Bad gateway" in info.value.message


def test_a_post_cut_off_mid_answer_is_not_resent_but_a_get_is():
    dropped = httpx.ReadError("connection reset by peer")
    post = Script(dropped, httpx.Response(202, json=job_json()))
    api, _ = client(post)
    with pytest.raises(ServerUnreachable) as info:
        api.submit("demo", "demo")
    assert info.value.code == "connection_lost" and len(post.requests) == 1  # the job may exist: never sent twice
    get = Script(dropped, httpx.Response(200, json=job_json(state="running")))
    api, _ = client(get)
    assert api.job("j1").state == "running" and len(get.requests) == 2


def test_a_submit_that_waits_reads_for_as_long_as_the_server_may_wait():
    script = Script(httpx.Response(200, json=job_json(state="succeeded")))
    api, _ = client(script, timeout_s=30.0)
    api.submit("demo", "demo", ttt_epochs=1)
    api.submit("demo", "demo", ttt_epochs=1, wait=True, wait_timeout_s=300)
    api.submit("demo", "demo", ttt_epochs=1, wait=True)  # the server's default wait, 60 s
    reads = [r.extensions["timeout"]["read"] for r in script.requests]
    assert reads == [30.0, 330.0, 90.0] and json.loads(script.requests[1].content)["wait_timeout_s"] == 300


def test_api_key_is_sent_as_bearer():
    script = Script(httpx.Response(200, json={"checkpoints": [{"name": "demo"}]}))
    api, _ = client(script, api_key="s3cret")
    assert [c["name"] for c in api.checkpoints()] == ["demo"]
    assert script.requests[0].headers["Authorization"] == "Bearer s3cret"


def test_401_is_an_api_error():
    api, _ = client(Script(error(401, "unauthorized", "missing or wrong API key")))
    with pytest.raises(RequestError) as info:
        api.datasets()
    assert info.value.status == 401 and info.value.code == "unauthorized"


def test_jobs_list_sends_only_the_filters_given():
    script = Script(
        httpx.Response(200, json={"jobs": [job_json("a"), job_json("b")], "total": 7, "limit": 2, "offset": 0})
    )
    api, _ = client(script)
    jobs, total = api.jobs(state="queued", limit=2)
    assert [j.id for j in jobs] == ["a", "b"] and total == 7
    assert dict(script.requests[0].url.params) == {"state": "queued", "limit": "2", "offset": "0"}


def test_cancel_of_a_finished_job_is_409():
    script = Script(error(409, "conflict", "job j1 already succeeded"))
    api, _ = client(script)
    with pytest.raises(RequestError) as info:
        api.cancel("j1")
    assert info.value.status == 409 and script.requests[0].method == "DELETE"


def test_ready_reads_the_503_body_and_wait_ready_polls():
    not_ready = httpx.Response(503, json={"ready": False, "workers": [{"device": "cpu", "state": "loading"}]})
    script = Script(not_ready, not_ready, httpx.Response(200, json={"ready": True, "workers": []}))
    api, sleeps = client(script)
    assert api.ready()["ready"] is False
    assert api.wait_ready(timeout_s=60, poll_s=0.25)["ready"] is True
    assert sleeps == [0.25] and len(script.requests) == 3


def test_wait_polls_until_finished_and_reports_each_poll():
    script = Script(
        httpx.Response(200, json=job_json(state="queued")),
        httpx.Response(200, json=job_json(state="running")),
        httpx.Response(200, json=job_json(state="succeeded", result={"val_bpb": 1.5})),
    )
    api, sleeps = client(script)
    seen = []
    job = api.wait("j1", poll_s=0.1, on_update=lambda j: seen.append(j.state))
    assert job.state == "succeeded" and job.finished and job.result == {"val_bpb": 1.5}
    assert seen == ["queued", "running", "succeeded"] and sleeps == [0.1, 0.1]


def test_wait_times_out_with_an_api_error():
    api, _ = client(Script(httpx.Response(200, json=job_json(state="running"))))
    with pytest.raises(RequestError) as info:
        api.wait("j1", timeout_s=0.0)
    assert info.value.code == "timeout" and "still running" in str(info.value)


def test_sse_parsing_follows_the_event_stream_rules():
    lines = [
        ": keep-alive",
        "event: progress",
        'data: {"state":',
        'data: "running"}',
        "id: 3",
        "",
        "data: plain text",
        "",
        "event: end",
        "data: {}",
        "",
    ]
    events = list(iter_sse(iter(lines)))
    assert [(e.event, e.data, e.id) for e in events] == [
        ("progress", {"state": "running"}, "3"),
        ("message", "plain text", "3"),
        ("end", {}, "3"),
    ]


def test_events_streams_until_end():
    body = "".join(
        f"event: {name}\ndata: {json.dumps(job_json(state=state))}\n\n"
        for name, state in [("state", "running"), ("progress", "running"), ("state", "succeeded")]
    )
    body += "event: end\ndata: {}\n\nevent: progress\ndata: {}\n\n"
    script = Script(httpx.Response(200, text=body, headers={"Content-Type": "text/event-stream"}))
    api, _ = client(script)
    events = list(api.events("j1"))
    assert [e.event for e in events] == ["state", "progress", "state", "end"]
    assert events[2].data["state"] == "succeeded"
    assert script.requests[0].url.path == "/jobs/j1/events"
    assert script.requests[0].extensions["timeout"]["read"] is None  # a long job may be quiet for minutes


def test_events_of_an_unknown_job_raise():
    api, _ = client(Script(error(404, "not_found", "no job nope")))
    with pytest.raises(RequestError) as info:
        list(api.events("nope"))
    assert info.value.status == 404


@pytest.mark.parametrize("value, expected", [("5", 5.0), ("0.5", 0.5), ("-3", 0.0), ("soon", None), (None, None)])
def test_parse_retry_after(value, expected):
    assert parse_retry_after(value) == expected


def test_client_modules_import_neither_torch_nor_the_server():
    code = (
        "import pkgutil, sys, importlib, pgttt.client as c; "
        "names = [m.name for m in pkgutil.iter_modules(c.__path__, 'pgttt.client.')]; "
        "[importlib.import_module(n) for n in names]; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'fastapi', 'starlette', 'uvicorn') "
        "or m.startswith(('pgttt.app', 'pgttt.ttt', 'pgttt.checkpoints', 'pgttt.training'))); "
        "print(len(names), bad); sys.exit(1 if bad or len(names) < 5 else 0)"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
