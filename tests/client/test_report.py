"""`pgttt report` on synthetic results: CSV rows equal the inputs, frontier and baseline right, the PNG is an image."""

from __future__ import annotations

import csv
import json
import struct

import matplotlib.image
import pytest

from pgttt.client.report import write_report
from pgttt.client.report_rows import build_rows, pareto_front
from pgttt.client.results import ResultsError, read_results
from pgttt.main import main

# (ttt_epochs, chunk_tokens, val_bpb, eval seconds): a grid where more epochs cost time and mostly help.
GRID = [
    (0, 8192, 1.900, 10.0),
    (0, 32768, 1.900, 11.0),
    (1, 8192, 1.850, 30.0),
    (1, 32768, 1.870, 20.0),
    (2, 8192, 1.830, 50.0),
    (2, 32768, 1.860, 35.0),
    (3, 8192, 1.835, 70.0),
    (3, 32768, 1.840, 45.0),
]


def record(i: int, epochs: int, chunk: int, bpb: float, secs: float, **result) -> dict:
    request = {"ttt_epochs": epochs, "chunk_tokens": chunk, "max_tokens": 65536}
    config = {**request, "seq_len": 256, "stride": 64, "precision": "fp32", "ttt_lr": 0.005, "seed": 0}
    return {
        "key": f"k{i:02d}",
        "checkpoint": "demo",
        "dataset": "demo",
        "request": request,
        "server": "http://x",
        "job_id": f"job{i}",
        "cached": False,
        "result": {
            "val_bpb": bpb,
            "val_loss": bpb * 0.7,
            "tokens_scored": 65536,
            "bytes_scored": 200000,
            "config": config,
            "timings": {"eval_s": secs, "total_s": secs + 1.5},
            **result,
        },
    }


def write_results(path, records, tail: str = "") -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail)


def dominated(row, rows, time) -> bool:
    return any(
        getattr(o, time) <= getattr(row, time)
        and o.val_bpb <= row.val_bpb
        and (getattr(o, time), o.val_bpb) != (getattr(row, time), row.val_bpb)
        for o in rows
    )


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def section(markdown: str, title: str) -> list[str]:
    """The table rows (keys in backticks) under a ### heading."""
    lines = markdown.split("\n")
    start = next(i for i, line in enumerate(lines) if line.startswith("### " + title))
    keys = []
    for line in lines[start + 1 :]:
        if line.startswith("#"):
            break
        if line.startswith("| ") and "`" in line:
            keys.append(line.rsplit("`", 2)[1])
    return keys


def test_report_from_synthetic_results(tmp_path):
    records = [record(i, *g) for i, g in enumerate(GRID)]
    write_results(tmp_path / "results.jsonl", records)
    report = write_report(tmp_path / "results.jsonl", tmp_path / "out", budget_s=40)

    with report.csv.open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(GRID)
    for row, (epochs, chunk, bpb, secs), rec in zip(rows, GRID, records, strict=True):
        assert (row["key"], row["checkpoint"], row["job_id"]) == (rec["key"], "demo", rec["job_id"])
        assert (int(row["ttt_epochs"]), int(row["chunk_tokens"]), int(row["max_tokens"])) == (epochs, chunk, 65536)
        assert float(row["val_bpb"]) == bpb and float(row["eval_s"]) == secs
        assert float(row["val_loss"]) == pytest.approx(bpb * 0.7)
        assert float(row["tokens_per_s"]) == pytest.approx(65536 / secs)  # from tokens and seconds
        assert float(row["baseline_bpb"]) == 1.9 and float(row["gain_bpb"]) == pytest.approx(1.9 - bpb)
        assert row["projected_8gpu_s"] == ""

    text = report.markdown.read_text()
    built, _ = build_rows(records)
    expected_front = sorted((r for r in built if not dominated(r, built, "eval_s")), key=lambda r: r.eval_s)
    assert section(text, "Pareto frontier: val_bpb against eval seconds") == [r.key for r in expected_front]
    assert [r.key for r in expected_front] == ["k00", "k03", "k02", "k07", "k04"]
    assert "projected 8-GPU" not in text.split("### All points")[0].split("### Best")[0]
    assert section(text, "No-TTT baseline") == ["k00", "k01"]
    # within 40 s: k00 (1.900), k01, k03 (1.870), k02 (1.850), k05 (1.860) -> k02
    assert section(text, "Best within the 40 s budget (eval seconds") == ["k02"]
    assert "+0.0500" in text  # k02's gain over 1.900
    assert "val_bpb 1.8500, gain +0.0500 at 30.0 s with ttt_epochs=1, chunk_tokens=8192" in report.summary

    width, height = png_size(report.png)
    image = matplotlib.image.imread(report.png)
    assert image.shape[:2] == (height, width) and width > 500 and height > 400
    assert image[..., :3].std() > 0.05  # something was drawn


def test_projected_seconds_add_a_panel_and_decide_the_budget(tmp_path):
    records = [record(i, *g, projected_8gpu_s=g[3] * 20) for i, g in enumerate(GRID)]
    write_results(tmp_path / "results.jsonl", records)
    report = write_report(tmp_path / "results.jsonl", budget_s=600)
    assert report.csv.parent == tmp_path  # beside the results by default
    with report.csv.open() as f:
        assert [float(r["projected_8gpu_s"]) for r in csv.DictReader(f)] == [g[3] * 20 for g in GRID]
    text = report.markdown.read_text()
    # 600 s projected = 30 s measured: k00, k01, k02 (1.850), k03 -> k02
    assert section(text, "Best within the 600 s budget (projected 8-GPU seconds)") == ["k02"]
    assert section(text, "Pareto frontier: val_bpb against projected 8-GPU seconds") == [
        "k00",
        "k03",
        "k02",
        "k07",
        "k04",
    ]
    two_panels, _ = png_size(report.png)
    write_results(tmp_path / "one.jsonl", [record(i, *g) for i, g in enumerate(GRID)])
    one_panel, _ = png_size(write_report(tmp_path / "one.jsonl", tmp_path / "one").png)
    assert two_panels > 1.7 * one_panel


def test_tokens_per_second_from_the_result_when_it_has_it():
    rows, _ = build_rows([record(0, 1, 1, 1.8, 4.0, tokens_per_second=12345.0), record(1, 1, 2, 1.8, 4.0)])
    assert [r.tokens_per_s for r in rows] == [12345.0, 65536 / 4.0]
    assert [r.eval_s for r in rows] == [4.0, 4.0]  # the loop's seconds, not total_s


def test_baseline_matches_only_the_same_sliding_settings(tmp_path):
    base = record(0, 0, 8192, 1.9, 5.0)
    other_len = record(1, 2, 8192, 1.8, 9.0)
    other_len["result"]["config"]["seq_len"] = 512  # a different sliding-window number: no baseline for it
    same = record(2, 2, 8192, 1.85, 9.0)
    rows, columns = build_rows([base, other_len, same])
    assert [r.baseline_bpb for r in rows] == [1.9, None, 1.9]
    assert rows[2].gain_bpb == pytest.approx(0.05) and rows[1].gain_bpb is None
    assert columns == ["ttt_epochs", "chunk_tokens", "max_tokens"]


def test_resolved_config_fills_fields_the_request_left_out():
    rec = record(0, 1, 8192, 1.8, 3.0)
    del rec["request"]["ttt_epochs"]  # left to the engine default; the result says what ran
    rec2 = record(1, 0, 8192, 1.9, 2.0)
    rows, _ = build_rows([rec, rec2])
    assert rows[0].fields["ttt_epochs"] == 1 and rows[0].gain_bpb == pytest.approx(0.1)


def test_repeats_over_seeds_get_mean_and_std(tmp_path):
    records = []
    for i, bpb in enumerate([1.80, 1.82, 1.84]):
        r = record(i, 1, 8192, bpb, 3.0)
        r["request"]["seed"] = r["result"]["config"]["seed"] = i
        records.append(r)
    write_results(tmp_path / "results.jsonl", records)
    text = write_report(tmp_path / "results.jsonl").markdown.read_text()
    assert "### Repeats over seeds" in text and "| 3 | 1.8200 | 0.0200 |" in text


def test_pareto_front_keeps_ties_out():
    rows, _ = build_rows(
        [
            record(0, 1, 1, 1.8, 10.0),
            record(1, 2, 1, 1.8, 10.0),
            record(2, 3, 1, 1.9, 5.0),
            record(3, 4, 1, 1.7, 20.0),
            record(4, 5, 1, 1.75, 20.0),
        ]
    )
    assert [r.key for r in pareto_front(rows, "eval_s")] == ["k02", "k00", "k03"]


def test_read_results_drops_a_partial_last_line_and_keeps_the_latest_per_key(tmp_path):
    path = tmp_path / "results.jsonl"
    first, second = record(0, 1, 8192, 1.8, 3.0), record(0, 1, 8192, 1.7, 3.0)
    write_results(path, [first, record(1, 0, 8192, 1.9, 2.0), second], tail='{"key": "k09", "check')
    records = read_results(path)
    assert [(r["key"], r["result"]["val_bpb"]) for r in records] == [("k00", 1.7), ("k01", 1.9)]


def test_read_results_keeps_a_last_line_without_newline(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_text(json.dumps(record(0, 1, 8192, 1.8, 3.0)))
    assert len(read_results(path)) == 1


@pytest.mark.parametrize(
    "content, message",
    [
        ("not json\n" + json.dumps(record(0, 1, 1, 1.8, 3.0)) + "\n", "results.jsonl:1: not JSON"),
        ("\n[1, 2]\n", "results.jsonl:2: not a sweep result (a JSON list)"),
        ('{"key": "a", "checkpoint": "c"}\n', "results.jsonl:1: not a sweep result (missing dataset, request, result)"),
    ],
)
def test_bad_results_files_name_the_line(tmp_path, content, message):
    (tmp_path / "results.jsonl").write_text(content)
    with pytest.raises(ResultsError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        read_results(tmp_path / "results.jsonl")


def test_report_cli(tmp_path, capsys):
    write_results(tmp_path / "results.jsonl", [record(i, *g) for i, g in enumerate(GRID)])
    assert main(["report", str(tmp_path / "results.jsonl"), "--out", str(tmp_path / "r"), "--budget-s", "20"]) == 0
    out = capsys.readouterr().out
    assert "best within 20 s" in out and "val_bpb 1.8700" in out
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == ["pareto.png", "report.md", "results.csv"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["missing.jsonl"], "missing.jsonl: cannot read the results"),
        (["empty.jsonl"], "empty.jsonl: no results yet"),
        (["results.jsonl", "--budget-s", "0"], "--budget-s 0.0: must be a positive number"),
    ],
)
def test_report_cli_errors_are_one_line(tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty.jsonl").write_text("")
    write_results(tmp_path / "results.jsonl", [record(0, 1, 1, 1.8, 3.0)])
    assert main(["report", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pgttt report: error: ") and message in err and err.count("\n") == 1


def test_reference_seconds_are_the_time_axis_and_decide_the_budget(tmp_path):
    # the record's script on 8xH100 (projection.reference): 12x pgttt's measured seconds here
    records = [
        record(i, *g, projected_8gpu_s=g[3] * 2, projection={"reference": {"seconds": g[3] * 12}})
        for i, g in enumerate(GRID)
    ]
    write_results(tmp_path / "results.jsonl", records)
    report = write_report(tmp_path / "results.jsonl", budget_s=600)
    with report.csv.open() as f:
        rows = list(csv.DictReader(f))
    assert [float(r["reference_s"]) for r in rows] == [g[3] * 12 for g in GRID]
    assert [float(r["eval_s"]) for r in rows] == [g[3] for g in GRID]  # pgttt's own seconds stay a column
    text = report.markdown.read_text()
    # 600 s reference = 50 s measured: everything but k06 (70 s); best bpb k04 (1.830 at 50 s)
    assert section(text, "Best within the 600 s budget (reference seconds on 8xH100") == ["k04"]
    assert "| ref 8xH100 s | pgttt eval s |" in text
    assert section(text, "Pareto frontier: val_bpb against reference 8xH100 seconds")[0] == "k00"


def test_paired_intervals_beside_the_results_reach_the_csv_the_tables_and_the_plot(tmp_path, monkeypatch):
    import matplotlib.axes

    records = [record(i, *g) for i, g in enumerate(GRID)]
    write_results(tmp_path / "results.jsonl", records)
    best = min(records, key=lambda r: r["result"]["val_bpb"])["key"]  # k04, 1.830
    intervals = {
        r["key"]: {
            "against": best,
            "delta": r["result"]["val_bpb"] - 1.830,
            "low": r["result"]["val_bpb"] - 1.840,
            "high": r["result"]["val_bpb"] - 1.820,
        }
        for r in records
    }
    intervals[best] = {"against": best, "delta": 0.0, "low": 0.0, "high": 0.0}
    (tmp_path / "intervals.json").write_text(json.dumps(intervals))
    bars = []
    errorbar = matplotlib.axes.Axes.errorbar

    def recorded(self, x, y, **kw):
        bars.append((list(x), list(y), kw["yerr"]))
        return errorbar(self, x, y, **kw)

    monkeypatch.setattr(matplotlib.axes.Axes, "errorbar", recorded)
    report = write_report(tmp_path / "results.jsonl")
    with report.csv.open() as f:
        rows = {r["key"]: r for r in csv.DictReader(f)}
    assert (
        float(rows["k02"]["delta_bpb"]) == pytest.approx(0.02)
        and float(rows["k02"]["delta_low"]) == pytest.approx(0.01)
        and float(rows["k02"]["delta_high"]) == pytest.approx(0.03)
    )
    assert "| +0.0200 [+0.0100, +0.0300] |" in report.markdown.read_text()  # k02's row
    ((x, y, (below, above)),) = bars  # one group: one set of error bars, the best (Δ = 0) without one
    assert len(x) == len(GRID) - 1 and 1.830 not in y
    assert below == pytest.approx([0.01] * 7) and above == pytest.approx([0.01] * 7)
