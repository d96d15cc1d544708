"""Successive halving (pgttt.client.halving) against an in-process fake of the HTTP API whose jobs score synthetic
documents and whose compare endpoint is the real one's computation: the same best point as the full grid for fewer
token-evaluations, rungs that grow and shrink as documented, a resumable run, and the report's account of it; a
rung's decisions with known answers (kept-top, kept-undecided when the interval against the best holds 0, cut) and
its fallback to val_bpb alone. The real server and the demo checkpoint: test_compare_e2e.py."""

from __future__ import annotations

import itertools
import json
import math
import zlib

import httpx
import numpy as np
import pytest

from pgttt.api.compare import CompareError, Side, compare
from pgttt.api.units import UnitSums
from pgttt.client.client import Client
from pgttt.client.halving import (
    CUT,
    KEPT_TOP,
    KEPT_UNDECIDED,
    bootstrap_units,
    decide,
    run_halving,
    rung_sizes,
    subset_knob,
)
from pgttt.client.report import write_report
from pgttt.client.retry import RetryPolicy
from pgttt.client.sweep_runner import SweepRunner
from pgttt.client.sweep_spec import Point, SweepError, parse_spec

URL = "http://fake:1"
LRS = [0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.3]
DOC_TOKENS = np.random.default_rng(0).integers(40, 200, 400)  # the val set's documents, 400 of them
DOC_HARDNESS = np.random.default_rng(1).normal(0, 0.3, 400)  # shared by every setting: what pairing cancels


def quality(lr: float) -> float:
    """Loss per token of a setting: lowest at lr 0.005, by a margin small against the documents' spread."""
    return 2.0 + 0.02 * (math.log10(lr) - math.log10(0.005)) ** 2


class FakeApi:
    def __init__(self) -> None:
        self.jobs: dict[str, dict] = {}
        self.units: dict[str, UnitSums] = {}
        self.submitted: list[dict] = []
        self._ids = itertools.count()

    def evaluate(self, request: dict) -> tuple[dict, UnitSums]:
        ends = np.cumsum(DOC_TOKENS)
        limit = request.get("max_tokens") or int(ends[-1])
        n = max(1, int(np.searchsorted(ends, limit, side="right")))
        tokens = DOC_TOKENS[:n]
        seed = zlib.crc32(json.dumps(request, sort_keys=True).encode())  # the same in every process
        noise = np.random.default_rng(seed).normal(0, 0.002, n)
        loss = tokens * (quality(request["ttt_lr"]) + DOC_HARDNESS[:n] + noise)
        units = UnitSums("document", np.cumsum(tokens) - tokens, tokens, 4 * tokens, loss)
        bpb = units.total[0] / math.log(2) / units.total[2]
        result = {
            "val_bpb": bpb,
            "val_loss": bpb,
            "tokens_scored": int(tokens.sum()),
            "config": request,
            "identity": {"checkpoint_sha256": "c" * 64, "val_fingerprint": "f" * 64},
            "timings": {"eval_s": 0.001 * tokens.sum()},
        }
        return result, units

    def handle(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path == "/readyz":
            return httpx.Response(200, json={"ready": True, "workers": []})
        if path == "/checkpoints/demo":
            return httpx.Response(200, json={"name": "demo", "sha256": "c" * 64})
        if path == "/datasets":
            return httpx.Response(
                200, json={"datasets": [{"name": "demo", "fingerprint": "f", "val_tokens": int(DOC_TOKENS.sum())}]}
            )
        if request.method == "POST" and path == "/eval":
            body = json.loads(request.content)
            self.submitted.append(body)
            fields = {k: v for k, v in body.items() if k not in ("checkpoint", "dataset", "gpus", "force")}
            job_id = f"j{next(self._ids)}"
            result, self.units[job_id] = self.evaluate(fields)
            self.jobs[job_id] = {
                "id": job_id,
                "state": "succeeded",
                "cached": False,
                "checkpoint": "demo",
                "dataset": "demo",
                "request": fields,
                "result": result,
                "error": None,
            }
            return httpx.Response(202, json=self.jobs[job_id])
        parts = path.split("/")
        if len(parts) == 5 and parts[3] == "compare":
            a, b = (Side.from_result(j, self.jobs[j]["result"], self.units[j]) for j in (parts[2], parts[4]))
            try:
                return httpx.Response(
                    200,
                    json=compare(
                        a, b, **{k: float(v) if k == "confidence" else int(v) for k, v in request.url.params.items()}
                    ).to_dict(),
                )
            except CompareError as exc:
                return httpx.Response(422, json={"error": {"code": "not_comparable", "message": str(exc)}})
        return httpx.Response(200, json=self.jobs[parts[2]])


def client_for(api: FakeApi):
    def make(url: str) -> Client:
        return Client(
            url, transport=httpx.MockTransport(api.handle), retry=RetryPolicy(attempts=2), sleep=lambda s: None
        )

    return make


def grid(**fixed) -> list[Point]:
    return parse_spec({"checkpoint": "demo", "dataset": "demo", "fixed": fixed, "grid": {"ttt_lr": LRS}}).expand()


def runners(api: FakeApi):
    return lambda out: SweepRunner([URL], out, poll_s=0.001, progress=False, client_factory=client_for(api))


def test_halving_finds_the_full_grids_best_for_fewer_token_evaluations(tmp_path):
    full_api, points = FakeApi(), grid()
    runners(full_api)(tmp_path / "grid").run(points)
    full = [j["result"] for j in full_api.jobs.values()]
    best_full = min(full, key=lambda r: r["val_bpb"])["config"]["ttt_lr"]
    full_cost = sum(r["tokens_scored"] for r in full)

    api = FakeApi()
    halving = run_halving(
        points, tmp_path / "out", runners(api), client_for(api), start=2000, factor=3, full=int(DOC_TOKENS.sum())
    )
    sizes = [r.size for r in halving.rungs]
    assert sizes == [2000, 6000, None] and [r.points for r in halving.rungs] == [9, 3, 1]  # one left: the full set
    final = json.loads((tmp_path / "out" / "results.jsonl").read_text().splitlines()[0])
    assert final["request"]["ttt_lr"] == best_full and "max_tokens" not in final["request"]
    assert final["key"] == next(p.key for p in points if p.fields["ttt_lr"] == best_full)  # the grid's own point
    assert halving.full_grid_token_evaluations == full_cost
    assert halving.token_evaluations == sum(j["result"]["tokens_scored"] for j in api.jobs.values()) < full_cost / 2
    kept = halving.rungs[0].table
    assert [r["status"] for r in kept] == [KEPT_TOP] * 3 + [CUT] * 6 and kept[0]["low"] == kept[0]["high"] == 0.0
    assert all(r["low"] > 0 for r in kept[3:])  # what was dropped was clearly worse than the rung's best
    assert all(r.fallback is None for r in halving.rungs)

    submitted = len(api.submitted)
    rerun = run_halving(
        points, tmp_path / "out", runners(api), client_for(api), start=2000, factor=3, full=int(DOC_TOKENS.sum())
    )
    assert len(api.submitted) == submitted and rerun.to_dict() == halving.to_dict()  # resumed from the files

    report = write_report(tmp_path / "out" / "results.jsonl")
    text = report.markdown.read_text()
    assert halving.summary() in text and f"{halving.token_evaluations:,} token-evaluations" in report.summary
    assert "### max_tokens=2000: 9 point(s)" in text


def test_rungs_and_the_subset_knob():
    assert rung_sizes(100, 3, 1000) == [100, 300, 900] and rung_sizes(100, 2.5, 250) == [100]
    assert len(rung_sizes(1, 2, None)) == 20
    with pytest.raises(SweepError, match="--halving-factor 1"):
        rung_sizes(100, 1, 1000)
    with pytest.raises(SweepError, match="--halving-start 0"):
        rung_sizes(0, 3, 1000)
    assert subset_knob(grid()) == "max_tokens" and subset_knob(grid(protocol="phased")) == "max_docs"
    mixed = parse_spec({"checkpoint": "demo", "dataset": "demo", "grid": {"protocol": ["phased", "chunked"]}})
    with pytest.raises(SweepError, match="mixes the phased protocol"):
        subset_knob(mixed.expand())


def test_a_rung_keeps_its_lowest_and_the_points_tied_with_them():
    # A subset of one chunk is scored before any training: every learning rate gets the same number.
    records = [{"key": k, "result": {"val_bpb": 2.0}} for k in "abcdef"]

    def kept(n: int) -> list[str]:
        return [k for k, s in decide(records, n, {})[0].items() if s != CUT]

    assert kept(2) == list("abcdef")
    records[3]["result"]["val_bpb"] = 1.9  # d is best, then a tie of five for the second place
    assert kept(2) == ["d", "a", "b", "c", "e", "f"]
    records[1]["result"]["val_bpb"] = 1.95
    assert kept(2) == ["d", "b"] and kept(1) == ["d"]
    assert decide(records, 1, {})[1].startswith("no paired interval against the best")  # said, not hidden


def sums(loss_per_token: np.ndarray, n: int = 200) -> UnitSums:
    tokens = DOC_TOKENS[:n]
    return UnitSums("document", np.cumsum(tokens) - tokens, tokens, 4 * tokens, tokens * loss_per_token[:n])


def test_a_point_the_rung_cannot_tell_from_the_best_is_kept_a_clearly_worse_one_cut():
    """Known answers: B differs from the best A by noise of either sign on each document (its paired interval holds
    0), C and D are worse on every document (their intervals exclude 0). With 4 points and factor 4 the fraction
    keeps one point; the rung keeps A (top) and B (undecided) and cuts C and D."""
    rng = np.random.default_rng(3)
    base = 2.0 + DOC_HARDNESS
    units = {
        "a": sums(base),
        "b": sums(base + rng.normal(0, 0.01, 400)),
        "c": sums(base + 0.05),
        "d": sums(base + 0.002),
    }
    sides = {k: Side.from_result(k, {"val_bpb": None}, u) for k, u in units.items()}
    bpb = {k: s.bpb for k, s in sides.items()}
    assert min(bpb, key=bpb.get) == "a"  # the seed makes B's noise cost a little: A is the rung's best
    intervals = {}
    for k in units:
        c = compare(sides["a"], sides[k], seed=0)
        intervals[k] = {"against": "a", "delta": c.delta_bpb, "low": c.low, "high": c.high, "units": c.units}
    assert intervals["b"]["low"] < 0 < intervals["b"]["high"]  # B cannot be told from A
    assert intervals["c"]["low"] > 0 and intervals["d"]["low"] > 0  # C and D are clearly worse
    assert intervals["a"]["low"] == intervals["a"]["high"] == 0.0

    records = [{"key": k, "result": {"val_bpb": v}} for k, v in bpb.items()]
    status, fallback = decide(records, math.ceil(4 / 4), intervals)
    assert fallback is None and status == {"a": KEPT_TOP, "b": KEPT_UNDECIDED, "d": CUT, "c": CUT}
    assert decide(records, 2, intervals)[0] == {"a": KEPT_TOP, "b": KEPT_TOP, "d": CUT, "c": CUT}

    # The best is kept whatever the intervals say, even ones that would put it behind (a broken server).
    hostile = {**intervals, "a": {"against": "a", "low": 1.0, "high": 2.0, "units": 200}}
    assert decide(records, 1, hostile)[0]["a"] == KEPT_TOP
    # Intervals against another point than the rung's best (another checkpoint's group) do not count.
    other = {k: {**i, "against": "x"} for k, i in intervals.items()}
    assert decide(records, 1, other)[0]["b"] == CUT


def test_a_rung_without_usable_intervals_keeps_by_val_bpb_and_says_why():
    records = [{"key": k, "result": {"val_bpb": v}} for k, v in (("a", 2.0), ("b", 2.01), ("c", 2.3))]
    one_unit = {
        k: {"against": "a", "low": d, "high": d, "delta": d, "units": 1}
        for k, d in (("a", 0.0), ("b", 0.0), ("c", 0.3))
    }  # zero width at Δ: b's "interval" holds 0 by accident
    status, fallback = decide(records, 1, one_unit)
    assert status == {"a": KEPT_TOP, "b": CUT, "c": CUT} and "1 unit(s)" in fallback
    # Two chunks, the first scored alike by every setting: a quarter of the resamples are that chunk alone, so every
    # 95% interval's lower end is 0; it tells nothing. Four units are the fewest a 95% interval is one over.
    assert (bootstrap_units(0.95), bootstrap_units(0.99)) == (4, 5)
    two = {
        k: {"against": "a", "low": 0.0, "high": 2 * d, "delta": d, "units": 2, "confidence": 0.95}
        for k, d in (("a", 0.0), ("b", 0.01), ("c", 0.3))
    }
    status, fallback = decide(records, 1, two)
    assert status == {"a": KEPT_TOP, "b": CUT, "c": CUT} and "2 unit(s): a 95% bootstrap interval needs 4" in fallback
    four = {k: {**i, "units": 4} for k, i in two.items()}
    assert decide(records, 1, four) == ({"a": KEPT_TOP, "b": KEPT_UNDECIDED, "c": KEPT_UNDECIDED}, None)
    refused = {k: {"against": "a", "problem": "ran on http://b:1, the best on http://a:1"} for k in "bc"}
    status, fallback = decide(records, 1, refused)
    assert status == {"a": KEPT_TOP, "b": CUT, "c": CUT} and fallback.endswith("the best on http://a:1")


def test_the_report_says_what_each_rung_decided(tmp_path):
    api = FakeApi()
    close = [0.004, 0.005, 0.006, 0.3]  # 0.004 and 0.006 lose 0.0002 nats a token to 0.005: within the noise
    points = parse_spec({"checkpoint": "demo", "dataset": "demo", "grid": {"ttt_lr": close}}).expand()
    halving = run_halving(
        points, tmp_path / "out", runners(api), client_for(api), start=3000, factor=4, full=int(DOC_TOKENS.sum())
    )
    first = halving.rungs[0]
    assert [r["status"] for r in first.table] == [KEPT_TOP, KEPT_UNDECIDED, KEPT_UNDECIDED, CUT]
    assert first.table[-1]["label"] == "ttt_lr=0.3" and first.table[-1]["low"] > 0
    assert all(r["low"] <= 0 <= r["high"] for r in first.table[1:3])
    assert halving.rungs[1].points == 3  # the undecided went on with the best
    text = write_report(tmp_path / "out" / "results.jsonl").markdown.read_text()
    assert "| decision |" in text and "| kept-undecided |" in text and "| cut |" in text
    assert "### max_tokens=3000: 4 point(s), " in text and "3 kept (1 top, 2 undecided)" in text

    # A first subset inside one document: one unit, intervals of zero width; the rung says it fell back.
    halving = run_halving(
        points, tmp_path / "one", runners(api), client_for(api), start=100, factor=4, full=int(DOC_TOKENS.sum())
    )
    assert "1 unit(s)" in halving.rungs[0].fallback and len(halving.rungs[0].kept) == 1
    text = write_report(tmp_path / "one" / "results.jsonl").markdown.read_text()
    assert "Kept by val_bpb alone: the subset holds 1 unit(s)" in text
