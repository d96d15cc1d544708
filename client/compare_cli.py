"""``pgttt compare A B``: two results, unit by unit: result files of ``pgttt eval --json OUT.json``, or job ids of a
server (``--server``)."""

from __future__ import annotations

import argparse
import json
import os

from pgttt.api.compare import CONFIDENCE, RESAMPLES, TOP, compare, load_side


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "compare",
        help="Δval_bpb of B against A with a paired bootstrap interval over the documents (or chunks) both scored",
        description="Compare two evaluations of one checkpoint on one val set unit by unit: Δval_bpb = bpb(B) - "
        "bpb(A), its paired bootstrap interval (the same resampled units for both), the share of units B improved, "
        "the largest contributors. Results of different checkpoints, val sets or units are refused.",
    )
    p.add_argument("a", metavar="A", help="a result JSON of `pgttt eval --json OUT.json`, or a job id with --server")
    p.add_argument("b", metavar="B", help="the same for the other result")
    p.add_argument("--server", metavar="URL", help="A and B are job ids of this pgttt serve")
    p.add_argument("--api-key", metavar="K", help="the server's API key (or set PGTTT_API_KEY)")
    p.add_argument(
        "--resamples", type=int, default=RESAMPLES, metavar="N", help=f"bootstrap resamples (default {RESAMPLES})"
    )
    p.add_argument(
        "--confidence",
        type=float,
        default=CONFIDENCE,
        metavar="C",
        help=f"the interval's confidence (default {CONFIDENCE})",
    )
    p.add_argument("--seed", type=int, default=0, metavar="S", help="the bootstrap's seed (default 0)")
    p.add_argument("--top", type=int, default=TOP, metavar="K", help=f"largest contributors shown (default {TOP})")
    p.add_argument("--json", action="store_true", help="print the comparison as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    params = {"resamples": args.resamples, "confidence": args.confidence, "seed": args.seed, "top": args.top}
    if args.server:
        from pgttt.client.client import Client

        with Client(args.server, api_key=args.api_key or os.environ.get("PGTTT_API_KEY")) as api:
            result = api.compare(args.a, args.b, **params)
    else:
        result = compare(load_side(args.a), load_side(args.b), **params)
    print(json.dumps(result.to_dict(), indent=2) if args.json else result.table())
    return 0
