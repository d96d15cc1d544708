"""``pgttt sweep`` (run a spec of evaluations against servers over HTTP) and ``pgttt report`` (CSV, plot, markdown)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from pgttt.api.challenge import EVAL_BUDGET_S
from pgttt.client.client import Client
from pgttt.client.halving import paired_intervals, run_halving, subset_knob, write_intervals
from pgttt.client.report import Report, write_report
from pgttt.client.results import read_results
from pgttt.client.retry import RetryPolicy
from pgttt.client.sweep_budget import describe, screen
from pgttt.client.sweep_runner import SweepRunner
from pgttt.client.sweep_spec import Point, SweepError, load_sweep


def register(subparsers: argparse._SubParsersAction) -> None:
    sweep = subparsers.add_parser(
        "sweep",
        help="run a grid/list/random sweep of evaluation settings on one or more servers",
        description="Run every point of SPEC on the servers, append results to OUT/results.jsonl (a rerun submits "
        "only what is missing), then write the report. Ctrl-C cancels the submitted jobs. See docs/sweeps.md.",
    )
    sweep.add_argument("spec", type=Path, metavar="SPEC.yaml", help="the sweep spec (docs/sweeps.md)")
    sweep.add_argument(
        "--server",
        action="append",
        required=True,
        metavar="URL",
        help="a pgttt serve URL, e.g. http://127.0.0.1:8000 (repeat for several)",
    )
    sweep.add_argument(
        "--out",
        type=Path,
        default=Path("sweep-out"),
        metavar="DIR",
        help="where results.jsonl and the report go (default: ./sweep-out)",
    )
    sweep.add_argument("--concurrency", type=int, default=2, metavar="N", help="jobs in flight per server (default 2)")
    sweep.add_argument("--api-key", metavar="K", help="the servers' API key (or set PGTTT_API_KEY)")
    sweep.add_argument(
        "--retries",
        type=int,
        default=8,
        metavar="N",
        help="tries per request on connection errors, 503 and 429, with exponential backoff "
        "(default 8: about 35 s before a server is declared gone)",
    )
    sweep.add_argument(
        "--max-attempts", type=int, default=3, metavar="N", help="jobs per point before it counts as failed (default 3)"
    )
    sweep.add_argument("--poll-s", type=float, default=0.5, metavar="S", help="seconds between polls of a job")
    sweep.add_argument(
        "--ready-timeout-s",
        type=float,
        default=600.0,
        metavar="S",
        help="how long to wait for a server to load and warm up (default 600)",
    )
    sweep.add_argument(
        "--budget-s",
        type=float,
        default=EVAL_BUDGET_S,
        metavar="S",
        help="the time budget: points predicted over it (the reference on 8xH100) are marked",
    )
    sweep.add_argument(
        "--skip-over-budget",
        action="store_true",
        help="do not run points the reference is predicted to take longer than --budget-s for",
    )
    sweep.add_argument(
        "--halving",
        action="store_true",
        help="successive halving: every point on a subset of the val set; the best 1/F by val_bpb, "
        "and any other whose paired interval against the best holds 0, go on to a subset F "
        "times larger, until the full set (docs/sweeps.md)",
    )
    sweep.add_argument(
        "--halving-start",
        type=int,
        metavar="N",
        help="the first subset: max_tokens (max_docs for the phased protocol); default the full "
        "set's tokens over F squared",
    )
    sweep.add_argument(
        "--halving-factor",
        type=float,
        default=3.0,
        metavar="F",
        help="how much each subset grows, and 1/F the share kept (default 3)",
    )
    sweep.add_argument("--quiet", action="store_true", help="no progress bar")
    sweep.set_defaults(func=_sweep)

    report = subparsers.add_parser(
        "report",
        help="write results.csv, pareto.png and report.md from a sweep's results.jsonl",
        description="Summarise a sweep: one CSV row per point, a Pareto plot of val_bpb against eval seconds, and a "
        "markdown report with the frontier, the no-TTT baseline, gains, and the best setting within the budget.",
    )
    report.add_argument("results", type=Path, metavar="RESULTS.jsonl")
    report.add_argument("--out", type=Path, metavar="DIR", help="output folder (default: beside RESULTS.jsonl)")
    report.add_argument(
        "--budget-s",
        type=float,
        default=EVAL_BUDGET_S,
        metavar="S",
        help="seconds for 'best within budget' (default %(default)g, the challenge's)",
    )
    report.set_defaults(func=_report)


def _sweep(args: argparse.Namespace) -> int:
    if args.retries < 1:
        raise SweepError(f"--retries {args.retries}: must be at least 1")
    spec = load_sweep(args.spec)
    points = spec.expand()
    screened = screen(points, args.budget_s)
    over = [s for s in screened if s.over]
    for s in over:
        print(("skipped: " if args.skip_over_budget else "over budget: ") + describe(s), file=sys.stderr)
    if args.skip_over_budget:
        points = [s.point for s in screened if not s.over]
        if not points:
            raise SweepError(f"every point of {args.spec} is predicted over {args.budget_s:g} s on 8xH100")
    api_key = args.api_key or os.environ.get("PGTTT_API_KEY")
    retry = RetryPolicy(attempts=args.retries)

    def make_runner(out: Path) -> SweepRunner:
        return SweepRunner(
            args.server,
            out,
            concurrency=args.concurrency,
            api_key=api_key,
            retry=retry,
            poll_s=args.poll_s,
            ready_timeout_s=args.ready_timeout_s,
            max_attempts=args.max_attempts,
            force=spec.force,
            progress=not args.quiet,
        )

    def client_for(url: str) -> Client:
        return Client(url, api_key=api_key, retry=retry)

    runner = make_runner(args.out)
    print(f"{len(points)} point(s) in {args.spec}; results in {runner.results.path}", file=sys.stderr)
    if args.halving:
        halving = run_halving(
            points,
            args.out,
            make_runner,
            client_for,
            factor=args.halving_factor,
            **halving_start(points, args, client_for),
        )
        print(halving.summary(), file=sys.stderr)
        outcome = halving.outcome
    else:
        outcome = runner.run(points)
    if outcome.already:
        print(f"{outcome.already} point(s) were already in {runner.results.path}", file=sys.stderr)
    for server, why in outcome.dead.items():
        print(f"server {server} was lost: {why}", file=sys.stderr)
    if outcome.interrupted:
        print(
            f"cancelled {outcome.cancelled} job(s); {outcome.done} point(s) finished and saved; rerun to resume",
            file=sys.stderr,
        )
        raise KeyboardInterrupt
    for point, why in outcome.failed:
        print(f"failed: {point.checkpoint} {point.dataset} {point.label()}: {why}", file=sys.stderr)
    print(f"{outcome.done} point(s) evaluated, {len(outcome.failed)} failed", file=sys.stderr)
    if runner.results.path.exists() and runner.results.keys():
        records = [r for r in read_results(runner.results.path) if r["key"] in {p.key for p in points}]
        write_intervals(args.out, paired_intervals(records, client_for))
        _print_report(write_report(runner.results.path, args.out, budget_s=args.budget_s))
    return 1 if outcome.failed else 0


def halving_start(points: list[Point], args: argparse.Namespace, client_for: Any) -> dict[str, int | None]:
    """The first subset and the full set's size: the spec's own, else the dataset's tokens from the server;
    documents are counted by the rungs themselves."""
    knob = subset_knob(points)
    full = points[0].fields.get(knob)
    if full is None and knob == "max_tokens":
        with client_for(args.server[0]) as api:
            full = next((d["val_tokens"] for d in api.datasets() if d["name"] == points[0].dataset), None)
    start = args.halving_start
    if start is None:
        if full is None:
            raise SweepError("--halving-start: give the first subset's documents (the phased protocol's max_docs)")
        start = max(1, int(full / args.halving_factor**2))
    return {"start": start, "full": full}


def _report(args: argparse.Namespace) -> int:
    _print_report(write_report(args.results, args.out, budget_s=args.budget_s))
    return 0


def _print_report(report: Report) -> None:
    print(report.summary)
    print(f"wrote {report.csv}, {report.png}, {report.markdown}")
