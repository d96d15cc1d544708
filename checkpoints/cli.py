"""``pgttt inspect`` (what a model.bin or .ptz holds, and the challenge's size check) and ``pgttt import``."""

from __future__ import annotations

import argparse
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pgttt import __version__
from pgttt.api.challenge import ARTIFACT_LIMIT_BYTES

from .config import PRESETS, known_keys
from .format import CheckpointError, parameter_count, quantization_summary, save_model_bin
from .loading import LoadedCheckpoint, load_checkpoint
from .ptz import category

SIZE_LIMIT_BYTES = ARTIFACT_LIMIT_BYTES  # the challenge's limit on artifact + code bytes (decimal)
# Code bytes a record logged for its virtual code wrapper (spec 4.3), used when neither --code-bytes
# nor a training log gives one: #1855 (1.0611): pyminify, brotli q11, base85, a two-line exec wrapper.
RECORD_CODE_BYTES: dict[str, int] = {"pr1855": 31_999}


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "inspect",
        help="show what a model.bin or .ptz artifact holds",
        description="Config, parameter count, quantization, tokenizer, provenance and the challenge's "
        f"{SIZE_LIMIT_BYTES:,}-byte check of a model.bin or a challenge .ptz artifact.",
    )
    p.add_argument("file", type=Path, help="a model.bin, or a .ptz artifact (then --log or --preset is required)")
    add_architecture_args(p, required=False, with_log=True)
    p.add_argument("--tokenizer", type=Path, help="a SentencePiece .model to check against the checkpoint")
    p.add_argument(
        "--code-bytes",
        type=_non_negative_int,
        default=None,
        metavar="N",
        help="bytes of the submission's code, added to the artifact for the size check (default: the record's "
        "logged code-wrapper size when the training log or a known record gives one, else 0)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.set_defaults(func=run_inspect)

    p = subparsers.add_parser(
        "import",
        help="convert a challenge .ptz artifact to model.bin",
        description="Import a challenge .ptz artifact losslessly into a model.bin that records its "
        "architecture, tokenizer and provenance.",
    )
    p.add_argument("artifact", type=Path, help="the challenge's final_model.int6.ptz")
    add_architecture_args(p, required=False, with_log=True)
    p.add_argument("--tokenizer", type=Path, required=True, help="the SentencePiece .model it was trained with")
    p.add_argument("-o", "--output", type=Path, required=True, help="the model.bin to write")
    p.add_argument("--force", action="store_true", help="overwrite --output if it exists")
    p.set_defaults(func=run_import)


def add_architecture_args(p: argparse.ArgumentParser, *, required: bool, with_log: bool = False) -> None:
    if with_log:
        p.add_argument(
            "--log",
            type=Path,
            default=None,
            metavar="TRAIN_LOG",
            help="the record's training log (train_seed42.log): a .ptz's architecture from its Hyperparameters block",
        )
    p.add_argument(
        "--preset",
        required=required,
        choices=list(PRESETS),
        help="architecture preset of a .ptz artifact (with --log: the base for what a log does not print)",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"override a key of the preset or log (keys: {known_keys()})",
    )


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative")
    return value


# ---- inspect ----------------------------------------------------------------------------------
def code_size_rule(ckpt: LoadedCheckpoint, preset: str | None, code_bytes: int | None) -> tuple[int, str]:
    """The code bytes to count and the rule that gave them (spec 4.3), never a silent guess."""
    if code_bytes is not None:
        return code_bytes, "given (--code-bytes)"
    logged = (ckpt.provenance.get("training_log") or {}).get("code_bytes")
    if isinstance(logged, int):
        return logged, "the training log's 'Code size (compressed)' line: the record's code wrapper (spec 4.3)"
    if preset in RECORD_CODE_BYTES:
        return RECORD_CODE_BYTES[preset], (
            f"--code-bytes not given: assumed record {preset}'s logged code wrapper (brotli of its minified "
            "train_gpt.py, spec 4.3); give --code-bytes if your code differs"
        )
    return 0, "--code-bytes not given: code counted as 0"


def inspect_report(ckpt: LoadedCheckpoint, code_bytes: int | None) -> dict[str, Any]:
    preset = next((name for name, cfg in PRESETS.items() if cfg == ckpt.config), None)
    code, rule = code_size_rule(ckpt, preset, code_bytes)
    total = ckpt.size_bytes + code
    lqer = [
        {"name": n, "kind": qt.lqer.kind, "rank": qt.lqer.rank, "group": qt.lqer.group, "category": category(qt)}
        for n, qt in ckpt.tensors.items()
        if qt.lqer is not None
    ]
    return {
        "file": str(ckpt.path),
        "kind": ckpt.kind,
        "size_bytes": ckpt.size_bytes,
        "sha256": ckpt.sha256,
        "preset": preset,
        "config": ckpt.config.to_dict(),
        "parameters": parameter_count(ckpt.tensors),
        "quantization": quantization_summary(ckpt.tensors),
        "lqer": lqer,
        "tokenizer": None if ckpt.tokenizer is None else ckpt.tokenizer.to_dict(),
        "provenance": ckpt.provenance,
        "size_check": {
            "artifact_bytes": ckpt.size_bytes,
            "code_bytes": code,
            "code_bytes_given": code_bytes is not None,
            "code_bytes_rule": rule,
            "total_bytes": total,
            "limit_bytes": SIZE_LIMIT_BYTES,
            "within_limit": total <= SIZE_LIMIT_BYTES,
        },
    }


def format_report(r: dict[str, Any]) -> str:
    lines = [
        ("file", r["file"]),
        ("kind", r["kind"]),
        ("size", f"{r['size_bytes']:,} bytes"),
        ("sha256", r["sha256"]),
        ("architecture", f"preset {r['preset']}" if r["preset"] else "custom (equals no preset)"),
        ("", " ".join(f"{k}={v}" for k, v in r["config"].items())),
        ("parameters", f"{r['parameters']:,}"),
    ]
    for i, (scheme, s) in enumerate(r["quantization"].items()):
        lines.append(
            (
                "quantization" if i == 0 else "",
                f"{scheme:<13} {s['tensors']:>4} tensors {s['parameters']:>12,} params {s['bytes']:>12,} bytes raw",
            )
        )
    lines.append(("lqer", ", ".join(f"{e['name']} ({e['kind']}, rank {e['rank']})" for e in r["lqer"]) or "none"))
    tok = r["tokenizer"]
    lines.append(
        (
            "tokenizer",
            "none recorded" if tok is None else f"{tok['name']} (vocab {tok['vocab_size']}, sha256 {tok['sha256']})",
        )
    )
    lines.append(("provenance", json.dumps(r["provenance"], sort_keys=True)))
    sc = r["size_check"]
    code_note = "" if sc["code_bytes_given"] else f" ({sc['code_bytes_rule']})"
    verdict = (
        f"within the limit by {sc['limit_bytes'] - sc['total_bytes']:,}"
        if sc["within_limit"]
        else f"OVER the limit by {sc['total_bytes'] - sc['limit_bytes']:,}"
    )
    lines.append(
        (
            "size check",
            f"{sc['artifact_bytes']:,} artifact + {sc['code_bytes']:,} code{code_note} = {sc['total_bytes']:,} bytes; "
            f"limit {sc['limit_bytes']:,}: {verdict}",
        )
    )
    return "\n".join(f"{key:<13} {value}" for key, value in lines)


def run_inspect(args: argparse.Namespace) -> int:
    ckpt = load_checkpoint(
        args.file, preset=args.preset, overrides=args.overrides, tokenizer=args.tokenizer, log=args.log
    )
    report = inspect_report(ckpt, args.code_bytes)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


# ---- import -----------------------------------------------------------------------------------
def run_import(args: argparse.Namespace) -> int:
    out: Path = args.output
    if out.exists() and not args.force:
        raise CheckpointError(f"{out}: already exists (use --force to overwrite)")
    if out.exists() and out.resolve() == args.artifact.resolve():
        raise CheckpointError(f"{out}: the output would overwrite the artifact being imported")
    ckpt = load_checkpoint(
        args.artifact, preset=args.preset, overrides=args.overrides, tokenizer=args.tokenizer, log=args.log
    )
    provenance = {
        **ckpt.provenance,
        "source": "import",
        "imported_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "pgttt_version": __version__,
    }
    save_model_bin(out, ckpt.config, ckpt.tensors, tokenizer=ckpt.tokenizer, provenance=provenance)
    schemes = ", ".join(f"{s['tensors']} {k}" for k, s in quantization_summary(ckpt.tensors).items())
    lqer = sum(qt.lqer is not None for qt in ckpt.tensors.values())
    log = ckpt.provenance.get("training_log")
    if log is None:
        source = f"as preset {args.preset}"
    else:
        assumed = " ".join(f"{k}={v}" for k, v in log["not_in_log"].items())
        source = f"with the architecture of {log['file']} (from preset {log['base_preset']}, not in the log: {assumed})"
    print(
        f"imported {args.artifact.name} ({ckpt.size_bytes:,} bytes, {ckpt.provenance['compression']}) "
        f"{source}{' with ' + ' '.join(args.overrides) if args.overrides else ''}: "
        f"{parameter_count(ckpt.tensors):,} parameters in {len(ckpt.tensors)} tensors ({schemes}"
        f"{f'; {lqer} with LQER' if lqer else ''})"
    )
    assert ckpt.tokenizer is not None  # import's --tokenizer is required
    print(f"wrote {out} ({out.stat().st_size:,} bytes), tokenizer {ckpt.tokenizer.name}")
    return 0
