"""Successive halving over a sweep's points, and the paired intervals of a sweep's points against its best.

Halving (``pgttt sweep --halving``): every point runs on a subset of the val set (its first ``start`` tokens, or
documents for the phased protocol); a rung keeps the ``ceil(n/factor)`` of lowest val_bpb (with any tied with
the last of them: *kept-top*), and also every other point whose paired interval against the rung's best holds 0
(*kept-undecided*: the rung cannot tell it from the best, so cutting it would be a guess); the rest are *cut*.
The rung's best is always kept. Where a rung has no usable intervals (too few units for a bootstrap, comparisons
the server refused), it keeps by val_bpb alone and its table says why. The subset grows ``factor``-fold, until
the survivors run on the full set: that last rung runs the spec's own points, so its results are what the full
grid has for them. The cost is counted in token-evaluations (tokens scored, summed over every job) against the
full grid's (every point on the full set).
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pgttt.api.compare import CONFIDENCE
from pgttt.client.client import Client, RequestError, ServerUnreachable
from pgttt.client.results import HALVING_FILE, INTERVALS_FILE, read_results
from pgttt.client.sweep_runner import SweepOutcome, SweepRunner
from pgttt.client.sweep_spec import Point, SweepError


# ---- paired intervals against the best -----------------------------------------------------------------------
def paired_intervals(
    records: list[dict[str, Any]], client_for: Callable[[str], Client], **params: Any
) -> dict[str, dict[str, Any]]:
    """Per record key: ``delta``, ``low``, ``high`` of its val_bpb minus the best of its (checkpoint, dataset)
    group, from the server that ran both (``GET /jobs/{best}/compare/{it}``), or ``problem`` saying why none."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        groups[(r["checkpoint"], r["dataset"])].append(r)
    out: dict[str, dict[str, Any]] = {}
    gone: dict[str, str] = {}  # servers that stopped answering: not asked again
    for group in groups.values():
        best = min(group, key=lambda r: r["result"]["val_bpb"])
        for r in group:
            entry: dict[str, Any] = {"against": best["key"]}
            if r["server"] != best["server"]:
                entry["problem"] = f"ran on {r['server']}, the best on {best['server']}"
            elif r["server"] in gone:
                entry["problem"] = gone[r["server"]]
            else:
                try:
                    with client_for(r["server"]) as api:
                        c = api.compare(best["job_id"], r["job_id"], **params)
                except ServerUnreachable as exc:
                    entry["problem"] = gone[r["server"]] = str(exc)
                except RequestError as exc:
                    entry["problem"] = exc.message
                else:
                    entry.update(delta=c.delta_bpb, low=c.low, high=c.high, confidence=c.confidence, units=c.units)
            out[r["key"]] = entry
    return out


def write_intervals(out_dir: Path, intervals: dict[str, dict[str, Any]]) -> Path:
    path = out_dir / INTERVALS_FILE
    path.write_text(json.dumps(intervals, indent=1, sort_keys=True, allow_nan=False) + "\n")
    return path


# ---- successive halving --------------------------------------------------------------------------------------
KEPT_TOP, KEPT_UNDECIDED, CUT = "kept-top", "kept-undecided", "cut"  # a rung's decision on a point


@dataclass
class Rung:
    size: int | None  # tokens or documents of the subset; None: the full set
    points: int
    kept: list[str]  # keys of the spec's points that went on
    token_evaluations: int
    table: list[dict[str, Any]] = field(default_factory=list)  # per point: label, val_bpb, interval, status
    fallback: str | None = None  # why the rung kept by val_bpb alone (no usable intervals); None: it used them


@dataclass
class Halving:
    knob: str
    factor: float
    rungs: list[Rung]
    token_evaluations: int
    full_grid_token_evaluations: int
    outcome: SweepOutcome

    def summary(self) -> str:
        used, full = self.token_evaluations, self.full_grid_token_evaluations
        sizes = " -> ".join("full" if r.size is None else f"{r.size}" for r in self.rungs)
        return (
            f"successive halving over {self.knob} {sizes}: {' -> '.join(str(r.points) for r in self.rungs)} "
            f"point(s); {used:,} token-evaluations, the full grid {full:,} ({used / full:.0%} of it)"
        )

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        del data["outcome"]
        return {**data, "summary": self.summary()}


def subset_knob(points: list[Point]) -> str:
    """max_docs for the phased protocol, max_tokens otherwise; one of them for every point."""
    kinds = {p.fields.get("protocol") == "phased" for p in points}
    if len(kinds) > 1:
        raise SweepError(
            "--halving: the spec mixes the phased protocol with others; their subsets differ "
            "(documents, tokens): halve them in separate sweeps"
        )
    return "max_docs" if kinds == {True} else "max_tokens"


def rung_sizes(start: int, factor: float, full: int | None) -> list[int]:
    """The subsets before the full set: start, start*factor, ... below ``full`` (at most 20 when it is unknown)."""
    if start < 1:
        raise SweepError(f"--halving-start {start}: must be at least 1")
    if not factor > 1:
        raise SweepError(f"--halving-factor {factor}: must be more than 1")
    sizes, size = [], start
    while (full is None or size < full) and len(sizes) < 20:
        sizes.append(size)
        size = math.ceil(size * factor)
    return sizes


def run_halving(
    points: list[Point],
    out_dir: Path,
    make_runner: Callable[[Path], SweepRunner],
    client_for: Callable[[str], Client],
    *,
    start: int,
    factor: float = 3.0,
    full: int | None = None,
    **compare_params: Any,
) -> Halving:
    """Run the rungs (each resumable in ``OUT/rungs/KNOB-SIZE/``), then the survivors' own points in ``OUT``."""
    knob = subset_knob(points)
    fixed = {json.dumps(p.fields.get(knob)) for p in points}
    if len(fixed) > 1:
        raise SweepError(f"--halving: the points set {knob} to different values; the full set must be one")
    spec_size = points[0].fields.get(knob)
    full = spec_size if spec_size is not None else full
    alive, rungs = list(points), []
    for size in rung_sizes(start, factor, full):
        if len(alive) == 1:
            break
        subset = {Point.make(p.checkpoint, p.dataset, {**p.fields, knob: size}).key: p for p in alive}
        rung_points = [Point.make(p.checkpoint, p.dataset, {**p.fields, knob: size}) for p in alive]
        runner = make_runner(out_dir / "rungs" / f"{knob}-{size}")
        runner.run(rung_points)
        records = [r for r in read_results(runner.results.path) if r["key"] in subset]
        intervals = paired_intervals(records, client_for, **compare_params)
        status, fallback = decide(records, math.ceil(len(alive) / factor), intervals)
        kept = [k for k, s in status.items() if s != CUT]
        rungs.append(
            Rung(
                size,
                len(alive),
                [subset[k].key for k in kept],
                _token_evals(records),
                _table(records, intervals, status, subset),
                fallback,
            )
        )
        alive = [subset[k] for k in kept]
        if knob == "max_docs" and records and all(_units(r) < size for r in records):
            break  # the subset already held every document: the next rung is the full set
    runner = make_runner(out_dir)
    outcome = runner.run(alive)
    final = [r for r in read_results(runner.results.path) if r["key"] in {p.key for p in alive}]
    full_tokens = max((r["result"].get("tokens_scored", 0) for r in final), default=0)
    rungs.append(Rung(None, len(alive), [r["key"] for r in final], _token_evals(final)))
    used = sum(r.token_evaluations for r in rungs)
    halving = Halving(knob, factor, rungs, used, full_tokens * len(points), outcome)
    (out_dir / HALVING_FILE).write_text(json.dumps(halving.to_dict(), indent=1, allow_nan=False) + "\n")
    return halving


def decide(
    records: list[dict[str, Any]], n: int, intervals: dict[str, dict[str, Any]]
) -> tuple[dict[str, str], str | None]:
    """Each record's key -> KEPT_TOP, KEPT_UNDECIDED or CUT (in val_bpb order), and why the intervals were not
    used (None when they were).

    Kept-top: the ``n`` of lowest val_bpb and any tied with the last of them (a subset of one chunk is scored
    before any training, so it tells no learning rates apart). Kept-undecided: another point whose paired interval
    against the rung's best (``intervals[key]``: ``against``, ``low``, ``high``, ``units``) holds 0. The best is
    kept-top whatever the intervals say: its interval against itself is [0, 0], so ranking by an interval's
    optimistic end would put every other point ahead of it. Intervals over fewer units than
    :func:`bootstrap_units` asks are not intervals (their ends can be one unit's own Δ): then, or when no point
    has an interval against the best, the rung keeps by val_bpb alone."""
    bpb = {r["key"]: r["result"]["val_bpb"] for r in records}
    ranked = sorted(bpb, key=bpb.__getitem__)
    n = max(1, n)
    best = ranked[0]
    usable = {
        k: i
        for k, i in intervals.items()
        if k in bpb and k != best and i.get("against") == best and "low" in i and "high" in i
    }
    fallback = None
    if len(ranked) > n and not usable:
        problems = [intervals.get(k, {}).get("problem") for k in ranked[1:]]
        fallback = "no paired interval against the best" + next((f": {p}" for p in problems if p), "")
    elif usable:
        units = min(i.get("units", 0) for i in usable.values())
        confidence = max(i.get("confidence", CONFIDENCE) for i in usable.values())
        if units < bootstrap_units(confidence):
            fallback = (
                f"the subset holds {units} unit(s): a {confidence:.0%} bootstrap interval needs "
                f"{bootstrap_units(confidence)} or more (over fewer, its ends can be one unit's own Δ)"
            )
    status = {}
    for i, k in enumerate(ranked):
        if i < n or bpb[k] == bpb[ranked[n - 1]]:
            status[k] = KEPT_TOP
        elif fallback is None and k in usable and usable[k]["low"] <= 0.0 <= usable[k]["high"]:
            status[k] = KEPT_UNDECIDED
        else:
            status[k] = CUT
    return status, fallback


def bootstrap_units(confidence: float = CONFIDENCE) -> int:
    """The fewest units whose percentile bootstrap interval at ``confidence`` is an interval: a resample draws one
    unit n times with probability n * n**-n in all, and while that reaches a tail, (1 - confidence) / 2, the
    interval's ends can be one unit's own Δ (over 2 chunks, the first scored alike by every setting: every
    lower end is 0). 4 at 95%, 5 at 99%."""
    n = 2
    while n ** (1 - n) >= (1 - confidence) / 2:
        n += 1
    return n


def _table(
    records: list[dict[str, Any]],
    intervals: dict[str, dict[str, Any]],
    status: dict[str, str],
    subset: dict[str, Point],
) -> list[dict[str, Any]]:
    rows = []
    for r in sorted(records, key=lambda r: r["result"]["val_bpb"]):
        i = intervals.get(r["key"], {})
        rows.append(
            {
                "key": subset[r["key"]].key,
                "label": subset[r["key"]].label(),
                "val_bpb": r["result"]["val_bpb"],
                **{k: i[k] for k in ("delta", "low", "high", "problem") if k in i},
                "status": status[r["key"]],
            }
        )
    return rows


def _token_evals(records: list[dict[str, Any]]) -> int:
    return sum(int(r["result"].get("tokens_scored") or 0) for r in records)


def _units(record: dict[str, Any]) -> int:
    return int((record["result"].get("units") or {}).get("count") or 0)
