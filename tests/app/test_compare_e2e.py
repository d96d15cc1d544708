"""Paired comparisons end to end on the demo checkpoint: a real ``pgttt serve`` on the CPU (GET /jobs/{a}/compare/{b},
its refusals, hostile units files, ``pgttt compare --server``), ``pgttt eval --json OUT.json`` files compared
without a server, and a halving sweep that finds the full grid's best for fewer token-evaluations."""

from __future__ import annotations

import io
import json
import zipfile

import pytest

from pgttt.api.units import UnitSums
from pgttt.client.client import Client, RequestError
from pgttt.main import main
from tests.helpers.app import DEMO, LONG, Server

pytestmark = pytest.mark.slow
# Short evaluations: 16 windows of 256 (stride = seq_len), 8 chunks of 512 trained one epoch each.
BASE = {"ttt_epochs": 1, "chunk_tokens": 512, "max_tokens": 4096, "stride": 256}
GOOD, WORSE = 0.3, 3.0  # ttt_lr: the second diverges partway (val_bpb ~3.5 against ~2.0)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("serve")).start()
    with Client(srv.url) as api:
        api.wait_ready(240, poll_s=0.2)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def jobs(server) -> dict[str, str]:
    with Client(server.url) as api:
        ids = {
            name: api.submit("demo", "demo", wait=True, wait_timeout_s=300, **{**BASE, **fields}).id
            for name, fields in (
                ("good", {"ttt_lr": GOOD}),
                ("worse", {"ttt_lr": WORSE}),
                ("short", {"ttt_lr": GOOD, "max_tokens": 2048}),
            )
        }
        for job_id in ids.values():
            assert api.wait(job_id, timeout_s=300, poll_s=0.2).state == "succeeded"
    return ids


def test_a_job_against_itself_and_its_cached_twin_is_zero_exactly(server, jobs):
    with Client(server.url) as api:
        self_compare = api.compare(jobs["good"], jobs["good"])
        cached = api.submit("demo", "demo", ttt_lr=GOOD, **BASE)
        assert cached.cached and cached.result["units"]["job"] == jobs["good"]
        twin = api.compare(jobs["good"], cached.id)
        job = api.job(jobs["good"])
    for c in (self_compare, twin):
        assert c.delta_bpb == 0.0 and c.low == 0.0 and c.high == 0.0 and c.improved == 0.0
    units = job.result["units"]
    assert units["count"] == c.units > 1 and units["kind"] == c.kind
    assert (server.state_dir / "units" / f"{job.id}.npz").is_file()
    assert "units" not in json.dumps(job.result["config"])  # the JSON names them, the arrays are in the file


def test_a_deliberately_worse_lr_has_an_interval_above_zero(server, jobs, capsys):
    with Client(server.url) as api:
        c = api.compare(jobs["good"], jobs["worse"], resamples=500, top=3)
        good, worse = api.job(jobs["good"]).result, api.job(jobs["worse"]).result
    assert c.low > 0 and c.verdict.startswith("B is worse") and c.resamples == 500 and len(c.contributors) == 3
    assert c.delta_bpb == pytest.approx(worse["val_bpb"] - good["val_bpb"], rel=1e-9)
    assert c.differs == {"ttt_lr": [GOOD, WORSE]}

    assert main(["compare", jobs["good"], jobs["worse"], "--server", server.url, "--resamples", "500"]) == 0
    table = capsys.readouterr().out
    assert f"Δval_bpb (B - A) {c.delta_bpb:+.6f}" in table and "B is worse" in table and "largest contributors" in table
    assert main(["compare", jobs["good"], jobs["worse"], "--server", server.url, "--resamples", "500", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["high"] == api_compare(server, jobs, resamples=500)["high"]


def api_compare(server, jobs, **params) -> dict:
    with Client(server.url) as api:
        return api.compare(jobs["good"], jobs["worse"], **params).to_dict()


def test_refusals_and_unknown_or_unfinished_jobs(server, jobs, capsys):
    with Client(server.url) as api:
        with pytest.raises(RequestError) as info:
            api.compare(jobs["good"], jobs["short"])
        assert info.value.status == 422 and info.value.code == "not_comparable" and info.value.field == "units"
        assert "max_tokens" in info.value.message
        with pytest.raises(RequestError) as info:
            api.compare(jobs["good"], "f" * 32)
        assert info.value.status == 404 and info.value.code == "job_not_found"
        with pytest.raises(RequestError) as info:
            api.compare(jobs["good"], jobs["good"], confidence=1.5)
        assert info.value.status == 422 and info.value.field == "confidence"
        running = api.submit("demo", "demo", **{k: v for k, v in LONG.items() if k not in ("checkpoint", "dataset")})
        with pytest.raises(RequestError) as info:
            api.compare(running.id, jobs["good"])
        assert info.value.status == 409 and info.value.code == "job_not_succeeded"
        api.cancel(running.id)
    assert main(["compare", jobs["good"], jobs["short"], "--server", server.url]) == 2
    assert "the results scored different" in capsys.readouterr().err


def bomb() -> bytes:
    """A units file whose members declare far more bytes than any units file holds (a zip bomb's header)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name in ("kind", "first_token", "tokens", "bytes", "loss_sum"):
            zf.writestr(f"{name}.npy", b"\0" * (1 << 20))
    data = bytearray(buf.getvalue())
    return bytes(data).replace((1 << 20).to_bytes(4, "little"), (1 << 31).to_bytes(4, "little"))


def test_hostile_units_files_are_4xx(server, jobs):
    path = server.state_dir / "units" / f"{jobs['worse']}.npz"
    original = path.read_bytes()
    good = UnitSums.from_bytes(original)
    swapped = UnitSums(good.kind, good.first_token, good.tokens, good.bytes, good.loss_sum * 0.5).to_bytes()
    try:
        for data, match in ((b"not a zip", "not a units file"), (bomb(), "declares"), (swapped, "not this result's")):
            path.write_bytes(data)
            with Client(server.url) as api, pytest.raises(RequestError) as info:
                api.compare(jobs["good"], jobs["worse"])
            assert info.value.status == 422 and match in info.value.message
    finally:
        path.write_bytes(original)
    with Client(server.url) as api:
        assert api.compare(jobs["good"], jobs["worse"]).low > 0


def test_eval_json_files_compare_without_a_server(server, jobs, tmp_path, capsys):
    files = {}
    for name, lr in (("good", GOOD), ("worse", WORSE)):
        files[name] = tmp_path / f"{name}.json"
        args = [
            "eval",
            "--checkpoint",
            str(DEMO / "model.bin"),
            "--tokenizer",
            str(DEMO / "tokenizer.model"),
            "--val",
            str(DEMO),
            "--quiet",
            "--json",
            str(files[name]),
            "--ttt-lr",
            str(lr),
        ]
        for key, value in BASE.items():
            args += ["--" + key.replace("_", "-"), str(value)]
        assert main(args) == 0
    capsys.readouterr()
    result = json.loads(files["good"].read_text())
    assert result["units"]["file"] == "good.units.npz" and (tmp_path / "good.units.npz").is_file()

    assert main(["compare", str(files["good"]), str(files["worse"]), "--json"]) == 0
    local = json.loads(capsys.readouterr().out)
    remote = api_compare(server, jobs)
    assert {k: local[k] for k in ("delta_bpb", "low", "high", "units")} == {
        k: remote[k] for k in ("delta_bpb", "low", "high", "units")
    }  # the same engine, the same numbers
    assert main(["compare", str(files["good"]), str(files["good"])]) == 0
    assert "Δval_bpb (B - A) +0.000000  95% interval [+0.000000, +0.000000]" in capsys.readouterr().out


def test_a_halving_sweep_finds_the_grids_best_for_fewer_token_evaluations(server, tmp_path, capsys):
    spec = tmp_path / "sweep.yaml"
    spec.write_text(
        json.dumps(
            {
                "checkpoint": "demo",
                "dataset": "demo",
                "fixed": BASE,
                "grid": {"ttt_lr": [0.001, 0.01, 0.1, 0.3, 1.0, 3.0]},
            }
        )
    )
    common = ["sweep", str(spec), "--server", server.url, "--quiet", "--poll-s", "0.1"]
    assert main([*common, "--out", str(tmp_path / "halving"), "--halving", "--halving-start", "1024"]) == 0
    err = capsys.readouterr().err
    assert main([*common, "--out", str(tmp_path / "grid")]) == 0
    capsys.readouterr()

    def best(out: str) -> dict:
        lines = (tmp_path / out / "results.jsonl").read_text().splitlines()
        return min((json.loads(line) for line in lines), key=lambda r: r["result"]["val_bpb"])

    assert best("halving")["key"] == best("grid")["key"]
    halving = json.loads((tmp_path / "halving" / "halving.json").read_text())
    grid_cost = sum(
        json.loads(line)["result"]["tokens_scored"]
        for line in (tmp_path / "grid" / "results.jsonl").read_text().splitlines()
    )
    assert halving["full_grid_token_evaluations"] == grid_cost
    assert halving["token_evaluations"] < grid_cost and halving["summary"] in err
    assert [r["size"] for r in halving["rungs"]] == [1024, 3072, None]
    for rung in halving["rungs"][:-1]:  # the best goes on; a cut point's interval against it excludes 0
        table = rung["table"]
        assert table[0]["status"] == "kept-top" and table[0]["low"] == table[0]["high"] == 0.0
        cut = [r for r in table if r["status"] == "cut"]
        assert rung["fallback"] is not None or all(not r["low"] <= 0 <= r["high"] for r in cut)
        assert [r["key"] for r in table if r["status"] != "cut"] == rung["kept"]
    report = (tmp_path / "halving" / "report.md").read_text()
    assert "## Successive halving" in report and f"{halving['token_evaluations']:,} token-evaluations" in report
    intervals = json.loads((tmp_path / "grid" / "intervals.json").read_text())
    assert len(intervals) == 6 and sum(i["low"] == i["high"] == 0.0 for i in intervals.values()) == 1
    assert "Δ vs best [interval]" in (tmp_path / "grid" / "report.md").read_text()
