"""The report of a sweep: ``results.csv``, the Pareto plot (``pareto.png``) and a markdown summary (``report.md``).

Input is a ``results.jsonl`` written by ``pgttt sweep`` (one finished evaluation per line: its request and the
engine's result), and beside it, when the sweep wrote them, each point's paired interval against the best
(``intervals.json``) and a halving sweep's rungs (``halving.json``). The rows, baselines and frontiers are
:mod:`pgttt.client.report_rows`'s, the figure :mod:`pgttt.client.report_plot`'s; this module writes the files and
the markdown's tables. Plain Python: no torch.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pgttt.api.challenge import EVAL_BUDGET_S
from pgttt.client.report_plot import plot_pareto
from pgttt.client.report_rows import (
    BASELINE_FIELDS,
    METRICS,
    TIME_TITLES,
    Row,
    best_within,
    budget_time,
    build_rows,
    by_group,
    cell,
    number,
    pareto_front,
    settings_label,
    varying_fields,
)
from pgttt.client.results import HALVING_FILE, INTERVALS_FILE, ResultsError, read_results


@dataclass(frozen=True)
class Report:
    csv: Path
    png: Path
    markdown: Path
    summary: str


def write_report(results: str | Path, out_dir: str | Path | None = None, *, budget_s: float = EVAL_BUDGET_S) -> Report:
    """Write ``results.csv``, ``pareto.png`` and ``report.md`` for a results file (default: beside it)."""
    results = Path(results)
    out = Path(out_dir) if out_dir is not None else results.parent
    if not math.isfinite(budget_s) or budget_s <= 0:
        raise ResultsError(f"--budget-s {budget_s}: must be a positive number of seconds")
    records = read_results(results)
    if not records:
        raise ResultsError(f"{results}: no results yet")
    rows, columns = build_rows(records)
    intervals = _read_json(results.parent / INTERVALS_FILE) or {}
    for row in rows:
        entry = intervals.get(row.key) or {}
        row.delta_bpb, row.delta_low, row.delta_high = (number(entry.get(k)) for k in ("delta", "low", "high"))
    halving = _read_json(results.parent / HALVING_FILE)
    out.mkdir(parents=True, exist_ok=True)
    csv_path, png_path, md_path = out / "results.csv", out / "pareto.png", out / "report.md"
    _write_csv(csv_path, rows, columns)
    plot_pareto(png_path, rows, columns, budget_s)
    text, summary = _markdown(rows, columns, budget_s, results, png_path.name)
    if halving is not None:
        text += _halving(halving)
        summary += "\n" + str(halving.get("summary", ""))
    md_path.write_text(text)
    return Report(csv_path, png_path, md_path, summary)


def _read_json(path: Path) -> Any:
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ResultsError(f"{path}: cannot read: {exc}") from exc


def _halving(halving: dict[str, Any]) -> str:
    """The rungs of a halving sweep: each subset's points, their intervals against its best, the decision on each
    (kept-top, kept-undecided: its interval holds 0, cut), and the rung's fallback to val_bpb alone if it had one."""
    lines = ["## Successive halving", "", f"{halving['summary']}.", ""]
    for rung in halving["rungs"]:
        if rung["size"] is None:
            lines += [
                f"Full set: {rung['points']} point(s), {rung['token_evaluations']:,} token-evaluations "
                "(the tables above).",
                "",
            ]
            continue
        decisions = [r["status"] for r in rung["table"]]
        lines += [
            f"### {halving['knob']}={rung['size']}: {rung['points']} point(s), "
            f"{rung['token_evaluations']:,} token-evaluations, {len(rung['kept'])} kept "
            f"({decisions.count('kept-top')} top, {decisions.count('kept-undecided')} undecided)",
            "",
        ]
        if rung.get("fallback"):
            lines += [f"Kept by val_bpb alone: {rung['fallback']}.", ""]
        lines += ["| setting | val_bpb | Δ vs best [interval] | decision |", "|---|---|---|---|"]
        for r in rung["table"]:
            interval = _interval(r.get("delta"), r.get("low"), r.get("high")) or f"no interval: {r.get('problem')}"
            lines.append(f"| {r['label']} | {r['val_bpb']:.4f} | {interval} | {r['status']} |")
        lines.append("")
    return "\n".join(lines)


def _interval(delta: float | None, low: float | None, high: float | None) -> str:
    if delta is None or low is None or high is None:
        return ""
    return f"{delta:+.4f} [{low:+.4f}, {high:+.4f}]"


def _write_csv(path: Path, rows: list[Row], columns: list[str]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["key", "checkpoint", "dataset", *columns, *METRICS, "job_id"])
        for row in rows:
            values = [cell(row.fields.get(c)) for c in columns] + [cell(row.metric(m)) for m in METRICS]
            writer.writerow([row.key, row.checkpoint, row.dataset, *values, row.job_id])


def _markdown(rows: list[Row], columns: list[str], budget_s: float, source: Path, png: str) -> tuple[str, str]:
    """The report text, and a short summary (the best setting within budget per group) for the terminal."""
    lines = [
        "# Sweep report",
        "",
        f"{len(rows)} point(s) from `{source}`. Gain = no-TTT baseline val_bpb minus the point's val_bpb "
        "(positive: TTT helped); the baseline of a point is the `ttt_epochs=0` point(s) with the same checkpoint, "
        f"dataset, {', '.join(BASELINE_FIELDS)}. Δ vs best: a point's val_bpb minus the best's of its group, with "
        "the paired bootstrap interval over the units both scored (`pgttt compare`); an interval above 0: clearly "
        "worse than the best.",
        "",
        f"![val_bpb against evaluation time]({png})",
        "",
    ]
    summary = []
    for (checkpoint, dataset), group in by_group(rows).items():
        shown = varying_fields(group, columns)
        lines += [f"## {checkpoint} on {dataset}", ""]
        base = [r for r in group if r.is_baseline]
        if base:
            lines += ["### No-TTT baseline (ttt_epochs=0)", "", *_table(base, shown), ""]
        else:
            lines += ["No `ttt_epochs=0` point in this group: no baseline, no gains.", ""]
        time = budget_time(group)
        how = TIME_TITLES[time]
        best = best_within(group, time, budget_s)
        lines += [f"### Best within the {budget_s:g} s budget ({how})", ""]
        if best is None:
            lines += [f"No point finished within {budget_s:g} s.", ""]
            summary.append(f"{checkpoint} on {dataset}: no point within {budget_s:g} s")
        else:
            lines += [*_table([best], shown), ""]
            gain = "" if best.gain_bpb is None else f", gain {best.gain_bpb:+.4f}"
            summary.append(
                f"{checkpoint} on {dataset}: best within {budget_s:g} s ({how}): val_bpb {best.val_bpb:.4f}{gain} "
                f"at {_fmt(best.metric(time))} s with {settings_label(best, shown)}"
            )
        for front_time, title in (
            ("reference_s", "reference 8xH100 seconds"),
            ("eval_s", "eval seconds"),
            ("projected_8gpu_s", "projected 8-GPU seconds"),
        ):
            front = pareto_front(group, front_time)
            if front:
                lines += [f"### Pareto frontier: val_bpb against {title}", "", *_table(front, shown), ""]
        lines += ["### All points (best first)", "", *_table(sorted(group, key=lambda r: r.val_bpb), shown), ""]
        repeats = _repeats(group, columns)
        if repeats:
            lines += ["### Repeats over seeds", "", *repeats, ""]
    return "\n".join(lines), "\n".join(summary)


def _fmt_gain(value: float | None) -> str:
    return "" if value is None else f"{value:+.4f}"


# Table columns for the numbers: (Row attribute, heading, format).
_NUMBERS: tuple[tuple[str, str, Callable[[Any], str] | None], ...] = (
    ("val_bpb", "val_bpb", lambda v: _fmt(v, 4)),
    ("gain_bpb", "gain", _fmt_gain),
    ("delta_bpb", "Δ vs best [interval]", None),
    ("reference_s", "ref 8xH100 s", lambda v: _fmt(v, 1)),
    ("eval_s", "pgttt eval s", lambda v: _fmt(v, 1)),
    ("projected_8gpu_s", "8-GPU s", lambda v: _fmt(v, 1)),
    ("tokens_per_s", "tokens/s", lambda v: _fmt(v, 0)),
)


def _table(rows: list[Row], fields: list[str]) -> list[str]:
    """A markdown table of rows: the given fields, then the numbers any of the rows has."""
    numbers = [n for n in _NUMBERS if any(r.metric(n[0]) is not None for r in rows)]
    head = [*fields, *(title for _, title, _ in numbers), "key"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [cell(r.fields.get(f)) for f in fields] + [
            fmt(r.metric(m)) if fmt else _interval(r.delta_bpb, r.delta_low, r.delta_high) for m, _, fmt in numbers
        ]
        out.append("| " + " | ".join([*cells, f"`{r.key}`"]) + " |")
    return out


def _repeats(rows: list[Row], columns: list[str]) -> list[str]:
    """Mean and standard deviation of val_bpb over seeds, for settings run with more than one seed."""
    by_setting: dict[str, list[Row]] = defaultdict(list)
    others = [c for c in columns if c != "seed"]
    for row in rows:
        by_setting[json.dumps([row.fields.get(c) for c in others])].append(row)
    shown = varying_fields(rows, others)
    out = []
    for group in by_setting.values():
        if len(group) > 1:
            bpbs = [r.val_bpb for r in group]
            out.append(
                f"| {settings_label(group[0], shown)} | {len(group)} | {statistics.fmean(bpbs):.4f} "
                f"| {statistics.stdev(bpbs):.4f} |"
            )
    return ["| setting | seeds | mean val_bpb | std |", "|---|---|---|---|", *out] if out else []


def _fmt(value: Any, digits: int = 1) -> str:
    return "" if value is None else f"{value:,.{digits}f}"
