"""End to end: `pgttt sweep` and `pgttt report` against a real `pgttt serve` process (the bundled demo checkpoint
on the CPU, a free localhost port): a 6-point sweep whose report agrees with the jobs, a sweep interrupted halfway
and resumed, a server restarted in the middle of a sweep, a dead server URL beside a live one."""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import matplotlib.image
import pytest

from pgttt.client.client import Client, RequestError
from pgttt.client.report_rows import build_rows
from pgttt.client.results import read_results
from pgttt.client.retry import RetryPolicy
from pgttt.main import main

pytestmark = pytest.mark.slow
READY_TIMEOUT_S = 240


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`pgttt serve` with its defaults (the demo) on a port of its own; restartable on the same port and store."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir, self.port = state_dir, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = state_dir / "serve.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with self.log.open("a") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "pgttt.main",
                    "serve",
                    "--port",
                    str(self.port),
                    "--state-dir",
                    str(self.state_dir),
                    "--log-level",
                    "warning",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env={k: v for k, v in os.environ.items() if not k.startswith("PGTTT_")},
            )  # its defaults: the demo
        deadline = time.monotonic() + READY_TIMEOUT_S
        with self.client(attempts=1) as api:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    pytest.fail(f"pgttt serve exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
                try:
                    if api.ready().get("ready"):
                        return
                except Exception:  # not listening yet
                    pass
                time.sleep(0.2)
        pytest.fail(f"pgttt serve not ready after {READY_TIMEOUT_S} s:\n{self.log.read_text()[-3000:]}")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)

    def client(self, attempts: int = 3) -> Client:
        return Client(self.url, retry=RetryPolicy(attempts=attempts, initial_s=0.2))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("serve"))
    srv.start()
    yield srv
    srv.kill()


@pytest.fixture(scope="module")
def names(server) -> dict:
    """The checkpoint and dataset the server has (the demo's), and sizes that keep an evaluation short."""
    with server.client() as api:
        (checkpoint,), (dataset,) = api.checkpoints(), api.datasets()
    assert (checkpoint["name"], dataset["name"]) == ("demo", "demo")
    seq_len = checkpoint["config"]["train_seq_len"]
    return {"checkpoint": checkpoint["name"], "dataset": dataset["name"], "seq_len": seq_len}


def write_spec(path: Path, names: dict, epochs: list[int], force: bool = False) -> Path:
    """Points ``epochs`` x two chunk sizes on the first 4 sequences of the val stream; stride = seq_len keeps the
    windows few. ``force``: evaluate again what an earlier test left in the server's result cache."""
    seq = names["seq_len"]
    path.write_text(
        json.dumps(
            {
                "checkpoint": names["checkpoint"],
                "dataset": names["dataset"],
                "force": force,
                "fixed": {"max_tokens": seq * 4, "seq_len": seq, "stride": seq},
                "grid": {"ttt_epochs": epochs, "chunk_tokens": [seq, seq * 2]},
            }
        )
    )  # JSON is YAML
    return path


def sweep_process(spec: Path, out: Path, *servers: str, extra: tuple[str, ...] = ()) -> subprocess.Popen:
    args = [sys.executable, "-m", "pgttt.main", "sweep", str(spec), "--out", str(out), "--quiet", "--poll-s", "0.1"]
    for url in servers:
        args += ["--server", url]
    # A pytest started in the background (`&`) has SIGINT ignored, and a child inherits that: the Ctrl-C test's
    # SIGINT would then never arrive. Default handling in the child makes Python turn it into KeyboardInterrupt.
    return subprocess.Popen(
        [*args, *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def wait_for(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


def result_lines(out: Path) -> list[dict]:
    path = out / "results.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def same_point(job, request: dict) -> bool:
    """The job was submitted with these fields."""
    return all(job.request.get(k) == v for k, v in request.items())


def all_jobs(server: Server) -> list:
    with server.client() as api:
        jobs, total = api.jobs(limit=500)
    assert len(jobs) == total
    return jobs


def test_a_six_point_sweep_and_its_report_agree_with_the_jobs(server, names, tmp_path, capsys):
    spec, out = write_spec(tmp_path / "sweep.yaml", names, [0, 1, 2]), tmp_path / "out"
    dead = f"http://127.0.0.1:{free_port()}"
    code = main(
        [
            "sweep",
            str(spec),
            "--server",
            server.url,
            "--server",
            dead,
            "--out",
            str(out),
            "--quiet",
            "--poll-s",
            "0.1",
            "--retries",
            "3",
        ]
    )
    err = capsys.readouterr().err
    assert code == 0, err
    assert f"server {dead} is unreachable and will not be used: {dead}/checkpoints/" in err
    assert "Connection refused" in err and "Traceback" not in err

    records = result_lines(out)
    assert len(records) == 6 and len({r["key"] for r in records}) == 6
    with server.client() as api:
        jobs = {r["job_id"]: api.job(r["job_id"]) for r in records}
    for r in records:
        job = jobs[r["job_id"]]
        assert job.state == "succeeded" and r["result"] == job.result and r["server"] == server.url
        assert same_point(job, r["request"])

    with (out / "results.csv").open() as f:
        rows = {row["key"]: row for row in csv.DictReader(f)}
    assert set(rows) == {r["key"] for r in records}
    baseline = {}
    for r in records:
        res = jobs[r["job_id"]].result
        row = rows[r["key"]]
        assert float(row["val_bpb"]) == res["val_bpb"] and float(row["val_loss"]) == res["val_loss"]
        assert float(row["eval_s"]) == res["timings"]["eval_s"]
        assert float(row["tokens_per_s"]) == res["tokens_per_second"]
        assert int(row["ttt_epochs"]) == r["request"]["ttt_epochs"] == res["config"]["ttt_epochs"]
        if res["config"]["ttt_epochs"] == 0:
            baseline[r["key"]] = res["val_bpb"]
    assert len(baseline) == 2 and len(set(baseline.values())) == 1  # chunk size cannot change a no-TTT score
    base = next(iter(baseline.values()))
    for r in records:
        assert float(rows[r["key"]]["gain_bpb"]) == pytest.approx(base - jobs[r["job_id"]].result["val_bpb"])

    # the frontier in report.md is exactly the non-dominated jobs
    points = [
        (jobs[r["job_id"]].result["timings"]["eval_s"], jobs[r["job_id"]].result["val_bpb"], r["key"]) for r in records
    ]
    front = sorted(
        (t, b, k) for t, b, k in points if not any(t2 <= t and b2 <= b and (t2, b2) != (t, b) for t2, b2, _ in points)
    )
    text = (out / "report.md").read_text()
    table = text.split("### Pareto frontier: val_bpb against eval seconds")[1].split("###")[0]
    assert [line.rsplit("`", 2)[1] for line in table.splitlines() if "`" in line] == [k for _, _, k in front]
    assert f"{base:.4f}" in text.split("### No-TTT baseline")[1].split("###")[0]
    image = matplotlib.image.imread(out / "pareto.png")
    assert image.ndim == 3 and image.shape[0] > 300 and image.shape[1] > 500

    rows_again, _ = build_rows(read_results(out / "results.jsonl"))
    assert sorted(r.val_bpb for r in rows_again) == sorted(float(v["val_bpb"]) for v in rows.values())


def test_an_interrupted_sweep_cancels_its_job_and_a_rerun_submits_only_the_rest(server, names, tmp_path, capsys):
    spec, out = write_spec(tmp_path / "sweep.yaml", names, [0, 1], force=True), tmp_path / "out"
    before = {j.id for j in all_jobs(server)}
    proc = sweep_process(spec, out, server.url, extra=("--concurrency", "1"))

    def halfway() -> bool:
        finished = {r["job_id"] for r in result_lines(out)}
        busy = [j for j in all_jobs(server) if j.id not in before | finished and not j.finished]
        return len(finished) >= 2 and bool(busy)

    wait_for(lambda: halfway() or proc.poll() is not None, 120, "two finished points and one in flight")
    proc.send_signal(signal.SIGINT)  # Ctrl-C
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()  # never left behind, polling a server that is about to go
        proc.communicate(timeout=10)
        pytest.fail("the sweep did not stop within 60 s of SIGINT")
    assert proc.returncode == 130, err
    done = result_lines(out)
    assert 2 <= len(done) < 4, err
    assert "cancelled 1 job(s); " in err
    first = {j.id: j for j in all_jobs(server) if j.id not in before}
    assert len(first) == len(done) + 1  # the finished ones and the one in flight
    (cancelled,) = [j for j in first.values() if j.id not in {r["job_id"] for r in done}]
    with server.client() as api:
        wait_for(lambda: api.job(cancelled.id).state == "cancelled", 60, "the job in flight to be cancelled")

    code = main(["sweep", str(spec), "--server", server.url, "--out", str(out), "--quiet", "--poll-s", "0.1"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert f"{len(done)} point(s) were already in" in err
    second = [j for j in all_jobs(server) if j.id not in before and j.id not in first]
    assert len(second) == 4 - len(done)  # only what was missing was submitted
    for job in second:
        assert not any(same_point(job, r["request"]) for r in done)
    records = result_lines(out)
    assert records[: len(done)] == done and len({r["key"] for r in records}) == 4


def test_a_server_restarted_mid_sweep_costs_only_time(server, names, tmp_path):
    seq, out = names["seq_len"], tmp_path / "out"
    spec = tmp_path / "sweep.yaml"
    # a quick point; then one of a few batches (32 sequences' worth of windows, stride seq/4), long enough to be
    # killed while it runs; then a quick one
    spec.write_text(
        json.dumps(
            {
                "checkpoint": names["checkpoint"],
                "dataset": names["dataset"],
                "force": True,
                "fixed": {"seq_len": seq, "chunk_tokens": seq * 2},
                "points": [
                    {"ttt_epochs": 0, "max_tokens": seq * 4, "stride": seq},
                    {"ttt_epochs": 0, "max_tokens": seq * 32, "stride": seq // 4},
                    {"ttt_epochs": 1, "max_tokens": seq * 4, "stride": seq},
                ],
            }
        )
    )
    proc = sweep_process(spec, out, server.url, extra=("--concurrency", "1", "--retries", "14"))
    with server.client() as api:

        def running() -> bool:
            return bool(result_lines(out)) and api.jobs(state="running")[1] > 0

        wait_for(lambda: running() or proc.poll() is not None, 120, "a finished point and a running job")
    server.kill()
    server.start()  # same port, same job store
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    records = result_lines(out)
    assert len(records) == 3 and len({r["key"] for r in records}) == 3
    stopped = [j for j in all_jobs(server) if j.error and j.error.get("code") == "server_stopped"]
    assert stopped, "the job running at the kill should have been marked failed by the restarted server"
    assert "resubmitting" in err and "server stopped while the job was running" in err
    for job in stopped:
        assert any(same_point(job, r["request"]) for r in records)  # the stopped point was evaluated again


def test_the_client_against_the_real_server(server, names, tmp_path):
    """Cache hits, SSE, and the error contract as the client sees them (no new evaluation needed)."""
    seq = names["seq_len"]
    fields = {"max_tokens": seq * 4, "seq_len": seq, "stride": seq, "ttt_epochs": 0, "chunk_tokens": seq}
    with server.client() as api:
        assert api.health() == {"status": "ok"} and api.ready()["ready"] is True
        first = api.wait(api.submit(names["checkpoint"], names["dataset"], **fields).id, poll_s=0.1)
        job = api.submit(names["checkpoint"], names["dataset"], **fields)
        assert job.cached and job.state == "succeeded" and job.result["val_bpb"] == first.result["val_bpb"]
        events = list(api.events(job.id))
        assert events[-1].event == "end" and any(e.data.get("state") == "succeeded" for e in events[:-1])
        with pytest.raises(RequestError) as info:
            api.submit(names["checkpoint"], names["dataset"], **{**fields, "ttt_lr": -1.0})
        assert info.value.status == 422 and info.value.field == "ttt_lr"
        with pytest.raises(RequestError) as info:
            api.job("no-such-job")
        assert info.value.status == 404
        with pytest.raises(RequestError) as info:
            api.cancel(job.id)
        assert info.value.status == 409
        with pytest.raises(RequestError) as info:
            api.checkpoint("no-such-checkpoint")
        assert info.value.status == 404
