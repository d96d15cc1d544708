"""``pgttt eval``: one evaluation (sliding window, score-first TTT, or the records' document-masked pass)
of a checkpoint, in this process."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pgttt.api.settings import GROUPS, EvalSettings, Knob, knobs
from pgttt.checkpoints.cli import add_architecture_args
from pgttt.runtime import add_runtime_args, parse_device, set_threads, show_progress


def parse_flag(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not a boolean (use 1/0 or true/false)")


def flag_of(knob: Knob) -> str:
    """The knob's flag: ttt_lora_rank -> --ttt-lora-rank."""
    return "--" + knob.name.replace("_", "-")


def add_setting_flags(parser: argparse.ArgumentParser, settings: type = EvalSettings) -> None:
    """A flag per declared knob, grouped as declared, its help and default from the declaration. Every flag
    defaults to None (a list to []): only what is given reaches the config, which keeps its own defaults."""
    groups = {name: parser.add_argument_group(f"settings: {title}") for name, title in GROUPS.items()}
    parsers: dict[type, Callable[[str], Any]] = {bool: parse_flag, int: int, float: float, str: str}
    for knob in knobs(settings):
        group = groups[knob.group]
        text = "; ".join(t for t in (knob.help, knob.range_text(), knob.default_text()) if t)
        if knob.kind is tuple:
            group.add_argument(
                flag_of(knob),
                dest=knob.name,
                action="append",
                default=[],
                metavar="PATTERN",
                help=f"{text} (repeatable)",
            )
            continue
        group.add_argument(
            flag_of(knob),
            dest=knob.name,
            type=parsers[knob.kind],
            choices=knob.choices,
            help=text,
            metavar="{true,false}" if knob.kind is bool else None,
        )
    if any(k.name == "compile" for k in knobs(settings)):
        groups["common"].add_argument(
            "--no-compile", dest="compile", action="store_const", const=False, help="the same as --compile false"
        )


def register(subparsers: argparse._SubParsersAction, settings: type = EvalSettings) -> None:
    p = subparsers.add_parser(
        "eval",
        help="evaluate a checkpoint: sliding-window, score-first TTT or document-masked val_bpb",
        description="Score a model.bin or challenge .ptz on the val shards with the challenge's protocol: "
        "sliding windows (--ttt-epochs 0), score-first chunked test-time training, or the frontier records' "
        "document-masked diagnostic pass (--protocol doc_masked). CaseOps val sets (with "
        "fineweb_val_bytes_*.bin sidecars) take bytes from the sidecar.",
    )
    p.add_argument("--checkpoint", type=Path, required=True, help="a model.bin, or a .ptz artifact (with --preset)")
    add_architecture_args(p, required=False)  # --preset and --set, as pgttt inspect and import take them
    p.add_argument("--tokenizer", type=Path, required=True, help="the SentencePiece .model of the val shards")
    p.add_argument(
        "--val",
        required=True,
        metavar="DIR_OR_GLOB",
        help="a directory of fineweb_val_*.bin (and their fineweb_val_bytes_*.bin sidecars), a glob, or one shard",
    )
    add_setting_flags(p, settings)
    add_runtime_args(p)  # --device, --threads
    p.add_argument(
        "--json",
        nargs="?",
        const="-",
        metavar="OUT.json",
        help="the whole result as JSON instead of one line: printed, or written to OUT.json with its "
        "per-unit sums beside it in OUT.units.npz (what `pgttt compare` reads)",
    )
    p.add_argument(
        "--quiet",
        action="store_true",
        help="no progress bar on stderr (there is none either when stderr is not a terminal)",
    )
    p.set_defaults(func=run)


def eval_settings(args: argparse.Namespace, settings: type = EvalSettings) -> dict[str, Any]:
    """The EvalConfig fields the command line gave."""
    given = {k.name: getattr(args, k.name) for k in knobs(settings)}
    return {k: tuple(v) if isinstance(v, list) else v for k, v in given.items() if v is not None and v != []}


def write_result(result: Any, path: Path) -> None:
    """``OUT.json`` and, beside it, ``OUT.units.npz``; the JSON names the units file."""
    from pgttt.api.compare import units_path

    units = units_path(path)
    result.units.save(units)
    entry = {
        "file": units.name,
        "kind": result.units.kind,
        "count": len(result.units),
        "identity": result.units.identity(),
    }
    path.write_text(json.dumps({**result.to_dict(), "units": entry}, indent=2) + "\n")


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm  # torch-heavy imports wait until the command runs

    from .config import EvalConfig
    from .protocol import Progress
    from .session import EvalSession

    config = EvalConfig(**eval_settings(args))
    device = parse_device(args.device)
    set_threads(args.threads)
    session = EvalSession.load(
        args.checkpoint, preset=args.preset, overrides=args.overrides or None, tokenizer=args.tokenizer
    )
    bar = (
        tqdm(total=None, unit="tok", unit_scale=True, file=sys.stderr, desc="eval")
        if show_progress(args.quiet)
        else None
    )

    def show(p: Progress) -> None:
        assert bar is not None
        bar.total = p.tokens_total
        bar.update(p.tokens_scored - bar.n)
        bpb = "" if p.bpb is None else f" bpb {p.bpb:.4f}"
        where = f"chunk {p.chunk + 1}/{p.num_chunks}"
        if p.docs_total is not None:  # the phased protocol
            eta = "" if p.eta_s is None else f" eta {p.eta_s:.0f}s"
            where = f"docs {p.docs_done}/{p.docs_total} phases {p.phases_done}/{p.num_phases}{eta}"
        bar.set_postfix_str(f"{p.phase} {where}{bpb}", refresh=False)

    try:
        progress = None if bar is None else show
        result = session.evaluate(args.val, args.tokenizer, config, device=device, progress=progress)
        if bar is not None:
            bar.update(result.tokens_scored - bar.n)
    finally:
        if bar is not None:
            bar.close()
    if args.json not in (None, "-"):
        write_result(result, Path(args.json))
        print(result.summary())
    else:
        print(json.dumps(result.to_dict(), indent=2) if args.json else result.summary())
    if args.json != "-":  # printed as JSON, they are in the result's "warnings"
        for warning in result.warnings:
            print(f"pgttt eval: warning: {warning}", file=sys.stderr)
    return 0
