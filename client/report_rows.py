"""A sweep's points as the report sees them: one row per result, its baseline and gain, frontiers and budget.

A :class:`Row` holds a point's identity, the values of its evaluation fields (the engine's resolved values when
the result records them) and its numbers. The no-TTT baseline of a point is the mean val_bpb of the
``ttt_epochs=0`` points that share its checkpoint, dataset and the fields that change a sliding-window score
(:data:`BASELINE_FIELDS`); its gain is baseline minus its val_bpb (positive: TTT helped). The table, CSV and plot
(:mod:`pgttt.client.report`, :mod:`pgttt.client.report_plot`) are views of these rows. No torch.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from pgttt.api.settings import EvalSettings, request_knobs
from pgttt.client.results import ResultsError

# Fields that change the no-TTT (sliding-window) number; every other evaluation field only matters to TTT.
BASELINE_FIELDS = ("seq_len", "stride", "max_tokens", "precision")


def field_order(settings: type = EvalSettings) -> tuple[str, ...]:
    """Column order for the fields of the evaluation: the knobs as declared, then gpus; others follow in
    name order."""
    return (*(k.name for k in request_knobs(settings)), "gpus")


FIELD_ORDER = field_order()
METRICS = (
    "val_bpb",
    "val_loss",
    "delta_bpb",
    "delta_low",
    "delta_high",
    "reference_s",
    "eval_s",
    "tokens_per_s",
    "projected_8gpu_s",
    "baseline_bpb",
    "gain_bpb",
)
# The times that can decide the budget, best first: the record's own script on 8xH100 as pgttt.budget predicts
# it (the 600 s rule is about that), else pgttt's 8-GPU projection, else the seconds measured on the server.
BUDGET_TIMES = ("reference_s", "projected_8gpu_s", "eval_s")
TIME_TITLES = {
    "reference_s": "reference seconds on 8xH100 (predicted)",
    "projected_8gpu_s": "projected 8-GPU seconds",
    "eval_s": "eval seconds measured on the server",
}


@dataclass
class Row:
    """One point of the report: its identity, the values of the evaluation fields, and its numbers."""

    key: str
    checkpoint: str
    dataset: str
    job_id: str
    fields: dict[str, Any]
    val_bpb: float
    val_loss: float | None
    eval_s: float | None
    tokens_per_s: float | None
    projected_8gpu_s: float | None
    reference_s: float | None = None
    baseline_bpb: float | None = None
    gain_bpb: float | None = None
    delta_bpb: float | None = None  # against the best of the group, with its paired interval
    delta_low: float | None = None
    delta_high: float | None = None

    @property
    def group(self) -> tuple[str, str]:
        return self.checkpoint, self.dataset

    @property
    def is_baseline(self) -> bool:
        return self.fields.get("ttt_epochs") == 0

    def metric(self, name: str) -> float | None:
        return getattr(self, name)


def eval_seconds(result: dict[str, Any]) -> float | None:
    """Seconds of the evaluation loop itself (scoring and training; the engine's ``timings.eval_s``), the time
    the challenge's eval budget counts: checkpoint loading and warm-up are not in it."""
    return number((result.get("timings") or {}).get("eval_s"))


def projected_8gpu_seconds(result: dict[str, Any]) -> float | None:
    """The result's projection of its eval seconds on 8 GPUs, when it carries one."""
    return number(result.get("projected_8gpu_s", (result.get("timings") or {}).get("projected_8gpu_s")))


def reference_seconds(result: dict[str, Any]) -> float | None:
    """The reference's predicted TTT-loop seconds on 8xH100 (``projection.reference``), when the result has it."""
    reference = (result.get("projection") or {}).get("reference") or {}
    return number(result.get("reference_8xh100_s", reference.get("seconds")))


def build_rows(records: list[dict[str, Any]]) -> tuple[list[Row], list[str]]:
    """Rows (in file order) with baselines and gains filled in, and the field columns to show.

    The columns are the fields any request set; a row's value is the engine's resolved value when the result
    records it (so a field a request left to the default shows what ran), else the requested one.
    """
    names = {name for r in records for name in r["request"]}
    columns = [n for n in FIELD_ORDER if n in names] + sorted(names - set(FIELD_ORDER))
    rows = []
    for r in records:
        result, resolved = r["result"], r["result"].get("config") or {}
        values = {n: resolved.get(n, r["request"].get(n)) for n in set(columns) | set(BASELINE_FIELDS) | {"ttt_epochs"}}
        eval_s = eval_seconds(result)
        tps = number(result.get("tokens_per_second"))
        if tps is None and eval_s and number(result.get("tokens_scored")):
            tps = result["tokens_scored"] / eval_s
        bpb = number(result.get("val_bpb"))
        if bpb is None:
            raise ResultsError(f"result {r['key']}: no val_bpb in the result")
        rows.append(
            Row(
                key=r["key"],
                checkpoint=r["checkpoint"],
                dataset=r["dataset"],
                job_id=str(r.get("job_id", "")),
                fields=values,
                val_bpb=bpb,
                val_loss=number(result.get("val_loss")),
                eval_s=eval_s,
                tokens_per_s=tps,
                projected_8gpu_s=projected_8gpu_seconds(result),
                reference_s=reference_seconds(result),
            )
        )
    baselines: dict[tuple[Any, ...], list[float]] = defaultdict(list)
    for row in rows:
        if row.is_baseline:
            baselines[_baseline_key(row)].append(row.val_bpb)
    for row in rows:
        found = baselines.get(_baseline_key(row))
        if found:
            row.baseline_bpb = statistics.fmean(found)
            row.gain_bpb = row.baseline_bpb - row.val_bpb
    return rows, columns


def _baseline_key(row: Row) -> tuple[Any, ...]:
    return (row.checkpoint, row.dataset, *(json.dumps(row.fields.get(f)) for f in BASELINE_FIELDS))


def pareto_front(rows: list[Row], time: str) -> list[Row]:
    """Rows no other row beats on both val_bpb and ``time`` (lower is better for both), fastest first.
    Rows without that time are left out."""
    timed = sorted((r for r in rows if r.metric(time) is not None), key=lambda r: (r.metric(time), r.val_bpb))
    front: list[Row] = []
    for row in timed:
        if not front or row.val_bpb < front[-1].val_bpb:
            front.append(row)
    return front


def budget_time(rows: list[Row]) -> str:
    """The time that decides the budget: the first of :data:`BUDGET_TIMES` that every row has."""
    return next((t for t in BUDGET_TIMES[:-1] if rows and all(r.metric(t) is not None for r in rows)), "eval_s")


def best_within(rows: list[Row], time: str, budget_s: float) -> Row | None:
    inside = [r for r in rows if r.metric(time) is not None and r.metric(time) <= budget_s]
    return min(inside, key=lambda r: (r.val_bpb, r.metric(time)), default=None)


def cell(value: Any) -> str:
    """A field's value as text for the CSV and the tables: floats exactly (repr), lists joined with ``;``."""
    if value is None:
        return ""
    if isinstance(value, list):
        return ";".join(map(str, value))
    return repr(value) if isinstance(value, float) else str(value)


def by_group(rows: list[Row]) -> dict[tuple[str, str], list[Row]]:
    """Rows per (checkpoint, dataset), in file order."""
    groups: dict[tuple[str, str], list[Row]] = defaultdict(list)
    for row in rows:
        groups[row.group].append(row)
    return groups


def varying_fields(rows: list[Row], columns: list[str]) -> list[str]:
    """Columns whose value differs between rows (the ones worth printing in a label)."""
    return [c for c in columns if len({json.dumps(r.fields.get(c)) for r in rows}) > 1] or columns[:1]


def settings_label(row: Row, fields: list[str]) -> str:
    """``field=value, ...`` of ``fields``: a row's label in a table or on the plot."""
    return ", ".join(f"{f}={cell(row.fields.get(f))}" for f in fields)


def number(value: Any) -> float | None:
    """A finite number of a result as a float; None for anything else (missing, text, bool, nan)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if ok else None
