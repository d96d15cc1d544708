"""``pgttt train``: train the challenge's model on its shards and write a GPTQ-quantized model.bin."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pgttt.checkpoints.config import PRESETS, known_keys
from pgttt.errors import PgtttError
from pgttt.runtime import add_runtime_args, parse_device, set_threads, show_progress

from .config import resolve_run_config, train_keys


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train",
        help="train a model on the challenge's shards and write a quantized model.bin",
        description="Train GPT(preset + overrides) with the records' recipe (Muon, AdamW, EMA, warm-down), "
        "quantize it with GPTQ and write model.bin; val_bpb is reported before and after quantization. "
        "Under torchrun, runs data-parallel on every GPU (rank 0 writes).",
    )
    p.add_argument("--data", type=Path, required=True, help="directory of fineweb_train_*.bin and fineweb_val_*.bin")
    p.add_argument("--tokenizer", type=Path, required=True, help="the SentencePiece .model of the shards")
    p.add_argument("-o", "--output", type=Path, required=True, help="the model.bin to write")
    p.add_argument("--force", action="store_true", help="overwrite --output if it exists")
    p.add_argument("--preset", choices=list(PRESETS), default="pg-2026-04-09", help="architecture preset")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"an architecture key ({known_keys()}) or a training hyperparameter ({train_keys()})",
    )
    p.add_argument("--run-dir", type=Path, help="where training checkpoints are written and resumed from")
    p.add_argument(
        "--checkpoint-every",
        type=int,
        default=0,
        metavar="N",
        help="write a training checkpoint to --run-dir every N steps (and at the end)",
    )
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --run-dir")
    p.add_argument(
        "--eval-max-tokens",
        type=int,
        default=None,
        metavar="N",
        help="evaluate on the first N val tokens only (default: all)",
    )
    add_runtime_args(p)  # --device (under torchrun: one GPU a rank), --threads
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="torch.compile the training step and the evaluations (default: on for CUDA)",
    )
    p.add_argument(
        "--quiet",
        action="store_true",
        help="no warm-up progress bar on stderr (there is none either when stderr is not a terminal)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .job import TrainJob, run_training  # torch-heavy: imported when the command runs

    if args.output.exists() and not args.force:
        raise PgtttError(f"{args.output}: already exists (use --force to overwrite)")
    model_config, train_config = resolve_run_config(args.preset, args.overrides)
    parse_device(args.device)  # refused here, before the data is read
    set_threads(args.threads)
    job = TrainJob(
        data=args.data,
        tokenizer=args.tokenizer,
        output=args.output,
        run_dir=args.run_dir,
        checkpoint_every=args.checkpoint_every,
        resume=args.resume,
        eval_max_tokens=args.eval_max_tokens,
        device=args.device,
        compile=args.compile,
        preset=args.preset,
        overrides=tuple(args.overrides),
    )
    bar = None

    def warmup_progress(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, unit="step", file=sys.stderr, desc="warm-up")
        bar.update(done - bar.n)
        if done == total:
            bar.close()

    def log(line: str) -> None:
        if bar is not None and not bar.disable:
            tqdm.write(line)  # above the bar, which then redraws
        else:
            print(line, flush=True)

    try:
        run_training(
            model_config,
            train_config,
            job,
            log=log,
            warmup_progress=warmup_progress if show_progress(args.quiet) else None,
        )
    finally:
        if bar is not None:
            bar.close()
    return 0
