"""``pgttt train``: train the challenge's model on its shards and write a GPTQ-quantized model.bin."""

from __future__ import annotations

import argparse
from pathlib import Path

from pgttt.checkpoints.config import PRESETS, known_keys

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
    p.add_argument("--preset", choices=list(PRESETS), default="pg-2026-04-09", help="architecture preset")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help=f"an architecture key ({known_keys()}) or a training hyperparameter ({train_keys()})",
    )
    p.add_argument("--run-dir", type=Path, help="where training checkpoints are written and resumed from")
    p.add_argument("--checkpoint-every", type=int, default=0, metavar="N",
                   help="write a training checkpoint to --run-dir every N steps (and at the end)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --run-dir")
    p.add_argument("--eval-max-tokens", type=int, default=None, metavar="N",
                   help="evaluate on the first N val tokens only (default: all)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when there is one; torchrun: one GPU a rank)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the training step and the evaluations (default: on for CUDA)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from .job import TrainJob, run_training  # torch-heavy: imported when the command runs

    model_config, train_config = resolve_run_config(args.preset, args.overrides)
    job = TrainJob(
        data=args.data, tokenizer=args.tokenizer, output=args.output, run_dir=args.run_dir,
        checkpoint_every=args.checkpoint_every, resume=args.resume, eval_max_tokens=args.eval_max_tokens,
        device=args.device, compile=args.compile, preset=args.preset, overrides=tuple(args.overrides),
    )
    run_training(model_config, train_config, job)
    return 0
