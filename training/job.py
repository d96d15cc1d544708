"""One ``pgttt train`` run end to end: data, training (or resuming), evaluation, GPTQ, ``model.bin``.

The val numbers are the engine's sliding-window evaluation (``ttt_epochs=0``) of the EMA model before
quantization and of the written ``model.bin`` after it; both are recorded in the file's provenance
with the recipe and the run's outcome.
"""

from __future__ import annotations

import contextlib
import glob
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from pgttt import __version__
from pgttt.checkpoints.cli import SIZE_LIMIT_BYTES
from pgttt.checkpoints.config import ModelConfig
from pgttt.checkpoints.format import save_model_bin, tokenizer_identity
from pgttt.ttt.bytes import load_byte_tables
from pgttt.ttt.config import EvalConfig
from pgttt.ttt.data import ValSet, load_val, open_shard
from pgttt.ttt.distributed import World, process_group
from pgttt.ttt.session import EvalResult, EvalSession, default_device

from .config import TrainConfig, describe
from .gptq import collect_hessians, quantize_model
from .loader import SequenceLoader, micro_batches
from .trainer import CHECKPOINT_NAME, Trainer, TrainError

TRAIN_PATTERN = "fineweb_train_*.bin"


@dataclass(frozen=True)
class TrainJob:
    """Everything about a run that is not a hyperparameter."""

    data: Path  # a directory of fineweb_train_*.bin and fineweb_val_*.bin
    tokenizer: Path
    output: Path
    run_dir: Path | None = None
    checkpoint_every: int = 0
    resume: bool = False
    eval_max_tokens: int | None = None
    device: str | None = None
    compile: bool | None = None  # None: on for CUDA
    preset: str | None = None  # recorded in the provenance
    overrides: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.checkpoint_every < 0:
            raise TrainError(f"--checkpoint-every {self.checkpoint_every}: must be 0 (never) or a number of steps")
        if self.eval_max_tokens is not None and self.eval_max_tokens < 1:
            raise TrainError(f"--eval-max-tokens {self.eval_max_tokens}: must be at least 1")
        if (self.checkpoint_every or self.resume) and self.run_dir is None:
            raise TrainError("--checkpoint-every and --resume need --run-dir (where training checkpoints live)")


@dataclass(frozen=True)
class TrainOutcome:
    output: Path
    steps: int
    val_bpb: float
    val_bpb_quantized: float
    artifact_bytes: int
    provenance: dict


@contextlib.contextmanager
def _joined(requested: str | None) -> Iterator[torch.device]:
    """The device, inside ``torchrun``'s process group when there is one (rank r: GPU r); a group joined
    here is left when the block ends."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        device = torch.device(requested) if requested else default_device()
        if dist.is_initialized() and device.type == "cuda":
            device = torch.device("cuda", torch.cuda.current_device())
        yield device
        return
    device = torch.device("cpu")
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    with process_group(device):
        yield device


def _barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def _train_files(data: Path) -> list[Path]:
    files = sorted(glob.glob(str(data / TRAIN_PATTERN)))
    if not files:
        raise TrainError(f"{data}: no {TRAIN_PATTERN} files (expected the challenge's data directory)")
    return [Path(f) for f in files]


def evaluate(model, val: ValSet, tables, device: torch.device, **settings) -> EvalResult:
    """The engine's evaluation of an in-memory model (a copy: ``model`` is left as it is)."""
    return EvalSession(model).evaluate(val, tables, EvalConfig(ttt_epochs=0, **settings), device=device)


def calibrate(
    trainer: Trainer, shards: list, world: World, log: Callable[[str], None]
) -> tuple[dict[str, torch.Tensor], int]:
    """Activation second moments ``X^T X / n`` over ``gptq_calibration_batches`` global batches, all ranks;
    progress to ``log`` about eight times on the way (on one GPU this takes seconds per batch)."""
    cfg, seq_len = trainer.config, trainer.model_config.train_seq_len
    loader = SequenceLoader(shards, seq_len, cfg.seed)  # a fresh stream: the run's first batches, as the record
    shape = (cfg.train_batch_tokens, cfg.grad_accum_micro_batches, world.rank, world.size)
    total, every = cfg.gptq_calibration_batches, max(1, cfg.gptq_calibration_batches // 8)
    log(f"GPTQ: Hessians from {total} batches of {cfg.train_batch_tokens:,} tokens")
    started = time.perf_counter()

    def batches():
        for done in range(total):
            if done and done % every == 0:
                elapsed = time.perf_counter() - started
                log(f"GPTQ: batch {done}/{total}, {elapsed:.0f}s, eta {elapsed / done * (total - done):.0f}s")
            for tokens in micro_batches(loader, *shape):
                yield tokens[:, :-1].to(trainer.device)

    hessians, rows = collect_hessians(trainer.model, batches(), trainer.precision)
    total = world.all_reduce_sum(torch.tensor(float(rows), dtype=torch.float64, device=trainer.device))
    for name in sorted(hessians):
        hessians[name] = world.all_reduce_sum(hessians[name]) / float(total)
    return hessians, int(total)


def run_training(
    model_config: ModelConfig,
    config: TrainConfig,
    job: TrainJob,
    log: Callable[[str], None] = print,
    warmup_progress: Callable[[int, int], None] | None = None,
) -> TrainOutcome:
    """``warmup_progress(done, total)``: after each warm-up step (on CPU they take seconds each)."""
    with _joined(job.device) as device:
        return _run(model_config, config, job, device, log, warmup_progress)


def _run(
    model_config: ModelConfig,
    config: TrainConfig,
    job: TrainJob,
    device: torch.device,
    log: Callable[[str], None],
    warmup_progress: Callable[[int, int], None] | None = None,
) -> TrainOutcome:
    started = time.perf_counter()
    world = World.current()
    say = log if world.rank == 0 else (lambda _msg: None)
    identity = tokenizer_identity(job.tokenizer)
    if identity.vocab_size > model_config.vocab_size:
        raise TrainError(
            f"{job.tokenizer}: {identity.vocab_size} tokens, more than the model's vocab_size={model_config.vocab_size}"
        )
    tables = load_byte_tables(job.tokenizer, model_config.vocab_size)
    train_files = _train_files(job.data)
    shards = [open_shard(f, model_config.vocab_size) for f in train_files]
    val = load_val(job.data, model_config.vocab_size)
    compile = device.type == "cuda" if job.compile is None else job.compile
    torch.manual_seed(config.seed)
    loader = SequenceLoader(shards, model_config.train_seq_len, config.seed)
    trainer = Trainer(model_config, config, loader, device=device, compile=compile, log=say)
    say(describe(model_config, config))
    say(
        f"pgttt train: {model_config.num_parameters():,} parameters | {sum(len(s) for s in shards):,} train tokens "
        f"in {len(shards)} shard(s), {loader.num_sequences:,} sequences | val {val.describe()} | "
        f"{device} x{world.size} {trainer.precision}{' compiled' if compile else ''}"
    )
    checkpoint_path = job.run_dir / CHECKPOINT_NAME if job.run_dir is not None else None
    if checkpoint_path is not None:
        checkpoint_path.parent.mkdir(parents=True, exist_ok=True)
    if job.resume:
        trainer.load(checkpoint_path)
    elif config.warmup_steps:
        trainer.warm_up(progress=warmup_progress if world.rank == 0 else None)

    def validate(model) -> str:
        r = evaluate(
            model, val, tables, device, stride=model_config.train_seq_len, max_tokens=job.eval_max_tokens, compile=False
        )
        return f"val_loss {r.val_loss:.4f} val_bpb {r.val_bpb:.4f} ({r.tokens_scored:,} tokens)"

    trainer.fit(
        checkpoint=(lambda: trainer.save(checkpoint_path)) if checkpoint_path is not None else None,
        checkpoint_every=job.checkpoint_every,
        validate=validate,
    )
    if checkpoint_path is not None and job.checkpoint_every and trainer.step % job.checkpoint_every:
        trainer.save(checkpoint_path)  # the final state too (a run stopped by the clock ends off the grid)
    trainer.use_ema()
    before = evaluate(trainer.model, val, tables, device, max_tokens=job.eval_max_tokens, compile=compile)
    say(f"val (EMA, before quantization): {before.summary()}")

    t0 = time.perf_counter()
    hessians, rows = calibrate(trainer, shards, world, say)
    tensors = (
        {}
        if world.rank
        else quantize_model(  # rank 0 alone writes the file
            trainer.model.state_dict(),
            hessians,
            matrix_clip_sigmas=config.matrix_clip_sigmas,
            embed_clip_sigmas=config.embed_clip_sigmas,
            block_size=config.gptq_block_size,
            damp=config.gptq_damp,
        )
    )
    gptq_seconds = time.perf_counter() - t0
    say(f"GPTQ: {len(hessians)} Hessians from {rows:,} tokens, {gptq_seconds:.1f}s")
    outcome = {
        "steps": trainer.step,
        "tokens": trainer.step * config.train_batch_tokens,
        "train_seconds": trainer.train_seconds,
        "final_train_loss": None if math.isnan(trainer.last_loss) else trainer.last_loss,
        "val_loss": before.val_loss,
        "val_bpb": before.val_bpb,
        "eval_tokens": before.tokens_scored,
        "gptq_seconds": gptq_seconds,
        "gptq_calibration_tokens": rows,
        "device": str(device),
        "world_size": world.size,
        "precision": trainer.precision,
    }
    provenance = {
        "source": "pgttt train",
        "pgttt_version": __version__,
        "torch_version": torch.__version__,
        "preset": job.preset,
        "overrides": list(job.overrides),
        "train_config": config.to_dict(),
        "data": {
            "train_files": [f.name for f in train_files],
            "val_files": [f.name for f in val.files],
            "val_fingerprint": val.fingerprint,
        },
        "outcome": outcome,
    }
    if world.rank == 0:
        save_model_bin(job.output, model_config, tensors, tokenizer=identity, provenance=provenance)
    _barrier(world)
    after = EvalSession.load(job.output, tokenizer=job.tokenizer).evaluate(
        val, tables, EvalConfig(ttt_epochs=0, max_tokens=job.eval_max_tokens, compile=compile), device=device
    )
    say(f"val (model.bin, after quantization): {after.summary()}")
    outcome.update(
        val_loss_quantized=after.val_loss, val_bpb_quantized=after.val_bpb, wall_seconds=time.perf_counter() - started
    )
    if world.rank == 0:  # the same tensors, now with the post-quantization numbers in the provenance
        save_model_bin(job.output, model_config, tensors, tokenizer=identity, provenance=provenance)
    _barrier(world)
    size = job.output.stat().st_size
    verdict = "within" if size <= SIZE_LIMIT_BYTES else "OVER"
    say(
        f"final: val_bpb {before.val_bpb:.6f} before quantization, {after.val_bpb:.6f} after "
        f"(sliding window, stride {before.config['stride']}, {before.tokens_scored:,} tokens) | "
        f"{job.output} {size:,} bytes, {verdict} the challenge's {SIZE_LIMIT_BYTES:,}-byte limit"
        " (artifact + code)"
    )
    return TrainOutcome(job.output, trainer.step, before.val_bpb, after.val_bpb, size, provenance)
