"""The report of a sweep: ``results.csv``, a Pareto plot (``pareto.png``) and a markdown summary (``report.md``).

Input is a ``results.jsonl`` written by ``pgttt sweep`` (one finished evaluation per line: its request and the
engine's result), and beside it, when the sweep wrote them, each point's paired interval against the best
(``intervals.json``) and a halving sweep's rungs (``halving.json``). The no-TTT baseline of a point is the mean
val_bpb of the ``ttt_epochs=0`` points that share its checkpoint, dataset and the fields that change a
sliding-window score (:data:`BASELINE_FIELDS`); a point's gain is baseline minus its val_bpb
(positive: TTT helped). Plain Python and matplotlib (Agg): no torch.
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
from pgttt.api.settings import EvalSettings, request_knobs
from pgttt.client.results import HALVING_FILE, INTERVALS_FILE, ResultsError, read_results

# Fields that change the no-TTT (sliding-window) number; every other evaluation field only matters to TTT.
BASELINE_FIELDS = ("seq_len", "stride", "max_tokens", "precision")


def field_order(settings: type = EvalSettings) -> tuple[str, ...]:
    """Column order for the fields of the evaluation: the knobs as declared, then gpus; others follow in
    name order."""
    return (*(k.name for k in request_knobs(settings)), "gpus")


FIELD_ORDER = field_order()
METRICS = ("val_bpb", "val_loss", "delta_bpb", "delta_low", "delta_high", "reference_s", "eval_s", "tokens_per_s",
           "projected_8gpu_s", "baseline_bpb", "gain_bpb")
# The times that can decide the budget, best first: the record's own script on 8xH100 as pgttt.budget predicts
# it (the 600 s rule is about that), else pgttt's 8-GPU projection, else the seconds measured on the server.
BUDGET_TIMES = ("reference_s", "projected_8gpu_s", "eval_s")
TIME_TITLES = {"reference_s": "reference seconds on 8xH100 (predicted)", "projected_8gpu_s": "projected 8-GPU seconds",
               "eval_s": "eval seconds measured on the server"}


# ---- rows ------------------------------------------------------------------------------------------------------
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
    return _number((result.get("timings") or {}).get("eval_s"))


def projected_8gpu_seconds(result: dict[str, Any]) -> float | None:
    """The result's projection of its eval seconds on 8 GPUs, when it carries one."""
    return _number(result.get("projected_8gpu_s", (result.get("timings") or {}).get("projected_8gpu_s")))


def reference_seconds(result: dict[str, Any]) -> float | None:
    """The reference's predicted TTT-loop seconds on 8xH100 (``projection.reference``), when the result has it."""
    reference = (result.get("projection") or {}).get("reference") or {}
    return _number(result.get("reference_8xh100_s", reference.get("seconds")))


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
        tps = _number(result.get("tokens_per_second"))
        if tps is None and eval_s and _number(result.get("tokens_scored")):
            tps = result["tokens_scored"] / eval_s
        bpb = _number(result.get("val_bpb"))
        if bpb is None:
            raise ResultsError(f"result {r['key']}: no val_bpb in the result")
        rows.append(Row(
            key=r["key"], checkpoint=r["checkpoint"], dataset=r["dataset"], job_id=str(r.get("job_id", "")),
            fields=values, val_bpb=bpb, val_loss=_number(result.get("val_loss")), eval_s=eval_s,
            tokens_per_s=tps, projected_8gpu_s=projected_8gpu_seconds(result), reference_s=reference_seconds(result),
        ))
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


# ---- outputs ---------------------------------------------------------------------------------------------------
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
        row.delta_bpb, row.delta_low, row.delta_high = (_number(entry.get(k)) for k in ("delta", "low", "high"))
    halving = _read_json(results.parent / HALVING_FILE)
    out.mkdir(parents=True, exist_ok=True)
    csv_path, png_path, md_path = out / "results.csv", out / "pareto.png", out / "report.md"
    _write_csv(csv_path, rows, columns)
    _plot(png_path, rows, columns, budget_s)
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
    """The rungs of a halving sweep: each subset's points, their intervals against its best, who went on."""
    lines = ["## Successive halving", "", f"{halving['summary']}.", ""]
    for rung in halving["rungs"]:
        if rung["size"] is None:
            lines += [f"Full set: {rung['points']} point(s), {rung['token_evaluations']:,} token-evaluations "
                      "(the tables above).", ""]
            continue
        lines += [f"### {halving['knob']}={rung['size']}: {rung['points']} point(s), "
                  f"{rung['token_evaluations']:,} token-evaluations, {len(rung['kept'])} kept", "",
                  "| setting | val_bpb | Δ vs best [interval] | kept |", "|---|---|---|---|"]
        for r in rung["table"]:
            interval = _interval(r.get("delta"), r.get("low"), r.get("high"))
            lines.append(f"| {r['label']} | {r['val_bpb']:.4f} | {interval} | {'yes' if r['kept'] else ''} |")
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
            values = [_cell(row.fields.get(c)) for c in columns] + [_cell(row.metric(m)) for m in METRICS]
            writer.writerow([row.key, row.checkpoint, row.dataset, *values, row.job_id])


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, list):
        return ";".join(map(str, value))
    return repr(value) if isinstance(value, float) else str(value)


def _groups(rows: list[Row]) -> dict[tuple[str, str], list[Row]]:
    groups: dict[tuple[str, str], list[Row]] = defaultdict(list)
    for row in rows:
        groups[row.group].append(row)
    return groups


def _varying(rows: list[Row], columns: list[str]) -> list[str]:
    """Columns whose value differs between rows (the ones worth printing in a label)."""
    return [c for c in columns if len({json.dumps(r.fields.get(c)) for r in rows}) > 1] or columns[:1]


def _plot(path: Path, rows: list[Row], columns: list[str], budget_s: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("eval_s", "eval seconds (measured on the server)")]
    if any(r.reference_s is not None for r in rows):  # the time axis that decides the budget comes first
        panels.insert(0, ("reference_s", "reference seconds on 8xH100 (predicted; pgttt.budget)"))
    elif any(r.projected_8gpu_s is not None for r in rows):
        panels.append(("projected_8gpu_s", "projected seconds on 8 GPUs"))
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.8), squeeze=False)
    groups = _groups(rows)
    shown = {name: _varying(group, columns) for name, group in groups.items()}
    budget = budget_time(rows)
    for ax, (time, label) in zip(axes[0], panels, strict=True):
        for (checkpoint, dataset), group in groups.items():
            timed = [r for r in group if r.metric(time) is not None]
            if not timed:
                continue
            name = f"{checkpoint} / {dataset}" if len(groups) > 1 else "points"
            dots = ax.scatter([r.metric(time) for r in timed], [r.val_bpb for r in timed], s=22, alpha=0.6,
                              label=name)
            color = dots.get_facecolor()[0]
            paired = [r for r in timed if r.delta_low is not None and r.delta_high is not None and r.delta_bpb]
            if paired:  # the best of the group is the reference of every interval: it has none
                below = [max(r.delta_bpb - r.delta_low, 0.0) for r in paired]
                above = [max(r.delta_high - r.delta_bpb, 0.0) for r in paired]
                ax.errorbar([r.metric(time) for r in paired], [r.val_bpb for r in paired], yerr=[below, above],
                            fmt="none", ecolor=color, elinewidth=0.8, capsize=2, alpha=0.7,
                            label="paired interval vs the best")
            front = pareto_front(timed, time)
            ax.plot([r.metric(time) for r in front], [r.val_bpb for r in front], "-o", color=color, ms=4, lw=1.2,
                    label="Pareto frontier")
            for r in front:
                ax.annotate(_settings(r, shown[(checkpoint, dataset)]), (r.metric(time), r.val_bpb), fontsize=6,
                            xytext=(4, 4), textcoords="offset points")
            base = [r for r in timed if r.is_baseline]
            if base:
                ax.scatter([r.metric(time) for r in base], [r.val_bpb for r in base], marker="s", s=60,
                           facecolors="none", edgecolors="black", label="no TTT (ttt_epochs=0)")
        slowest = max((r.metric(time) for r in rows if r.metric(time) is not None), default=None)
        if time == budget and slowest is not None:
            if budget_s <= 1.25 * slowest:
                ax.axvline(budget_s, color="grey", ls="--", lw=1, label=f"budget {budget_s:g} s")
            else:  # a line far to the right would squeeze every point against the axis
                ax.set_title(f"every point within the {budget_s:g} s budget", fontsize=9)
        ax.set_xlabel(label)
        ax.set_ylabel("val_bpb (lower is better)")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no timings in the results", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle("val_bpb against evaluation time")
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")  # labels of the frontier may reach past the axes
    plt.close(fig)


def _markdown(
    rows: list[Row], columns: list[str], budget_s: float, source: Path, png: str
) -> tuple[str, str]:
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
    for (checkpoint, dataset), group in _groups(rows).items():
        shown = _varying(group, columns)
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
                f"at {_fmt(best.metric(time))} s with {_settings(best, shown)}"
            )
        for front_time, title in (("reference_s", "reference 8xH100 seconds"), ("eval_s", "eval seconds"),
                                  ("projected_8gpu_s", "projected 8-GPU seconds")):
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
        cells = [_cell(r.fields.get(f)) for f in fields] + [
            fmt(r.metric(m)) if fmt else _interval(r.delta_bpb, r.delta_low, r.delta_high) for m, _, fmt in numbers]
        out.append("| " + " | ".join([*cells, f"`{r.key}`"]) + " |")
    return out


def _repeats(rows: list[Row], columns: list[str]) -> list[str]:
    """Mean and standard deviation of val_bpb over seeds, for settings run with more than one seed."""
    by_setting: dict[str, list[Row]] = defaultdict(list)
    others = [c for c in columns if c != "seed"]
    for row in rows:
        by_setting[json.dumps([row.fields.get(c) for c in others])].append(row)
    shown = _varying(rows, others)
    out = []
    for group in by_setting.values():
        if len(group) > 1:
            bpbs = [r.val_bpb for r in group]
            out.append(
                f"| {_settings(group[0], shown)} | {len(group)} | {statistics.fmean(bpbs):.4f} "
                f"| {statistics.stdev(bpbs):.4f} |"
            )
    return ["| setting | seeds | mean val_bpb | std |", "|---|---|---|---|", *out] if out else []


def _settings(row: Row, fields: list[str]) -> str:
    return ", ".join(f"{f}={_cell(row.fields.get(f))}" for f in fields)


def _fmt(value: Any, digits: int = 1) -> str:
    return "" if value is None else f"{value:,.{digits}f}"


def _number(value: Any) -> float | None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if ok else None
