"""``pgttt estimate``: the reference's predicted TTT-loop seconds on 8xH100 for a setting, without running it."""

from __future__ import annotations

import argparse
import json
from dataclasses import fields

from .oracle import BUDGET_S, estimate
from .settings import FAMILIES, ChunkedSettings, PhasedSettings, make_settings


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "estimate",
        help="predict the reference evaluator's TTT-loop seconds on 8xH100 for a setting (no GPU, milliseconds)",
        description="Predict what the record's own script would take on 8xH100 for these settings on the full "
        "val set, with a 90%% band and the 600-second verdict. See docs/budget.md.",
    )
    p.add_argument("--protocol", choices=("chunked", "phased"), default="chunked")
    p.add_argument(
        "--dataset",
        default="sp8192",
        metavar="NAME",
        help=f"a family ({', '.join(FAMILIES)}) or a dataset name that contains one (default sp8192)",
    )
    p.add_argument("--budget-s", type=float, default=BUDGET_S, metavar="S")
    p.add_argument("--json", action="store_true", help="print the whole estimate as JSON")
    knobs = {f.name: f for cls in (ChunkedSettings, PhasedSettings) for f in fields(cls) if f.init}
    for name in knobs:
        p.add_argument("--" + name.replace("_", "-"), dest=name, type=int, metavar="N")
    p.set_defaults(func=_run, knobs=tuple(knobs))


def _run(args: argparse.Namespace) -> int:
    cls = ChunkedSettings if args.protocol == "chunked" else PhasedSettings
    own = {f.name for f in fields(cls) if f.init}
    given = {k: getattr(args, k) for k in args.knobs if getattr(args, k) is not None}
    settings = make_settings(args.protocol, given)  # a knob of the other protocol is an error naming it
    result = estimate(settings, dataset=args.dataset, budget_s=args.budget_s)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
        return 0
    print(result.summary())
    print("  settings  " + ", ".join(f"{k}={v}" for k, v in result.settings.items() if k in own))
    print("  split     " + ", ".join(f"{k} {v:.0f} s" for k, v in result.breakdown.items() if v))
    print(f"  counted   {result.counted}")
    print(f"  not in it {result.not_counted}")
    return 0
