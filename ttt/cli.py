"""``pgttt eval``: one evaluation (sliding window, score-first TTT, or the records' document-masked pass)
of a checkpoint, in this process."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from pgttt.checkpoints.cli import add_architecture_args
from pgttt.checkpoints.model import PRECISIONS
from pgttt.runtime import add_runtime_args, parse_device, set_threads, show_progress

from .config import LR_SCHEDULES, OPTIMIZERS, PHASED_KNOBS, PROTOCOLS, EvalConfig
from .record_defaults import RECORD_TTT_DEFAULTS

# flag -> EvalConfig field, for the settings passed through only when given (the config keeps its defaults).
SETTINGS: dict[str, tuple[str, type, str]] = {
    "--ttt-epochs": ("ttt_epochs", int, "TTT epochs per chunk; 0: sliding-window evaluation (default 3)"),
    "--chunk-tokens": ("chunk_tokens", int, "tokens per TTT chunk (default 32768)"),
    "--ttt-lr": ("ttt_lr", float, "TTT learning rate, cosine-decayed over chunks (default 0.005)"),
    "--ttt-momentum": ("ttt_momentum", float, "SGD momentum, or AdamW's beta1 (default 0.9)"),
    "--seq-len": ("seq_len", int, "window length (default: the checkpoint's train_seq_len)"),
    "--stride": ("stride", int, "sliding-window stride (default 64)"),
    "--batch-seqs": ("batch_seqs", int, "windows per scoring batch and sequences per training batch (default 32)"),
    "--max-tokens": ("max_tokens", int, "score only the first N targets of the trimmed val stream"),
    "--seed": ("seed", int, "random seed; the phased protocol's SEED: LoRA A draws, val_doc_fraction (default 0)"),
    "--val-batch-tokens": ("val_batch_tokens", int, "doc_masked: the records' VAL_BATCH_TOKENS (default 524288)"),
    "--emulate-ranks": ("emulate_ranks", int, "phased: the schedule and packing of this many reference ranks "
                                               "(default 8, as the records ran; 1: one GPU's)"),
    "--max-docs": ("max_docs", int, "phased: only the stream's first N documents"),
}


def parse_flag(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not a boolean (use 1/0 or true/false)")


def _phased_settings() -> dict[str, tuple[str, Any, str]]:
    """A flag per phased knob, named after the record's environment variable (ttt_lora_rank -> --ttt-lora-rank)."""
    kinds = {f.name: str(f.type) for f in dataclasses.fields(EvalConfig)}
    settings = {}
    for knob in PHASED_KNOBS:
        kind = kinds[knob]
        parse = parse_flag if "bool" in kind else int if "int" in kind else float if "float" in kind else str
        settings["--" + knob.replace("_", "-")] = (
            knob, parse, f"phased: {knob.upper()} (default: the checkpoint's record's value)")
    return settings


SETTINGS.update(_phased_settings())


def register(subparsers: argparse._SubParsersAction) -> None:
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
    p.add_argument("--val", required=True, metavar="DIR_OR_GLOB",
                   help="a directory of fineweb_val_*.bin (and their fineweb_val_bytes_*.bin sidecars), a glob, "
                        "or one shard")
    for flag, (_, kind, text) in SETTINGS.items():
        p.add_argument(flag, type=kind, help=text)
    p.add_argument("--protocol", choices=PROTOCOLS,
                   help="chunked: sliding windows / score-first TTT (default); doc_masked: the frontier records' "
                        "diagnostic eval_val (document-masked packed rows, no TTT; some targets never scored); "
                        "phased: per-document LoRA TTT with global-SGD phases (the 04-10 ... 04-29 records)")
    p.add_argument("--record-defaults", choices=list(RECORD_TTT_DEFAULTS),
                   help="phased: take unset knobs from this record (default: the checkpoint's preset's record)")
    p.add_argument("--precision", choices=PRECISIONS, help="bf16 (default on CUDA) or fp32 (default elsewhere)")
    p.add_argument("--optimizer", choices=OPTIMIZERS, help="TTT optimizer (default sgd)")
    p.add_argument("--lr-schedule", choices=LR_SCHEDULES, help="learning rate over chunks (default cosine)")
    p.add_argument("--adapt-include", action="append", default=[], metavar="PATTERN",
                   help="adapt only parameters matching this fnmatch pattern (repeatable; default: all)")
    p.add_argument("--adapt-exclude", action="append", default=[], metavar="PATTERN",
                   help="freeze parameters matching this fnmatch pattern (repeatable)")
    add_runtime_args(p)  # --device, --threads
    p.add_argument("--no-compile", action="store_true", help="do not torch.compile (compiling is on for CUDA)")
    p.add_argument("--json", nargs="?", const="-", metavar="OUT.json",
                   help="the whole result as JSON instead of one line: printed, or written to OUT.json with its "
                        "per-unit sums beside it in OUT.units.npz (what `pgttt compare` reads)")
    p.add_argument("--quiet", action="store_true",
                   help="no progress bar on stderr (there is none either when stderr is not a terminal)")
    p.set_defaults(func=run)


def eval_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The EvalConfig fields the command line gave."""
    settings = {field: getattr(args, flag[2:].replace("-", "_")) for flag, (field, _, _) in SETTINGS.items()}
    settings.update(protocol=args.protocol, precision=args.precision, optimizer=args.optimizer,
                    lr_schedule=args.lr_schedule, record_defaults=args.record_defaults)
    settings.update(adapt_include=tuple(args.adapt_include), adapt_exclude=tuple(args.adapt_exclude))
    if args.no_compile:
        settings["compile"] = False
    return {k: v for k, v in settings.items() if v is not None and v != ()}


def write_result(result: Any, path: Path) -> None:
    """``OUT.json`` and, beside it, ``OUT.units.npz``; the JSON names the units file."""
    from pgttt.client.compare import units_path

    units = units_path(path)
    result.units.save(units)
    entry = {"file": units.name, "kind": result.units.kind, "count": len(result.units),
             "identity": result.units.identity()}
    path.write_text(json.dumps({**result.to_dict(), "units": entry}, indent=2) + "\n")


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm  # torch-heavy imports wait until the command runs

    from .config import EvalConfig
    from .engine import EvalSession, Progress

    config = EvalConfig(**eval_settings(args))
    device = parse_device(args.device)
    set_threads(args.threads)
    session = EvalSession.load(args.checkpoint, preset=args.preset, overrides=args.overrides or None,
                               tokenizer=args.tokenizer)
    bar = tqdm(total=None, unit="tok", unit_scale=True, file=sys.stderr, desc="eval") \
        if show_progress(args.quiet) else None

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
