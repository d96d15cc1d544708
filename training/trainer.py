"""The training loop: the records' recipe on one device or data-parallel under ``torchrun``.

Matrices of the blocks train with Muon, everything else with AdamW (the embedding at its own rate).
The learning rate is flat, then decays linearly over the last ``warmdown_frac`` of training; Muon's
momentum warms up; gradients are clipped; an EMA of the weights is the final model. Progress follows
wall-clock time when ``max_wallclock_seconds`` caps the run, steps otherwise. On several GPUs each
rank takes its micro-batches of the same global batch and gradients are summed over the ranks (the
engine's ``World``), so every rank holds the same weights and rank 0 alone writes files.

A training checkpoint (``checkpoint.pt``) holds tensors and plain values only, is written atomically
and read with ``weights_only=True``; resuming from it gives bit-identical weights on the CPU.
"""

from __future__ import annotations

import copy
import io
import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from pgttt.checkpoints.config import ModelConfig
from pgttt.checkpoints.format import write_atomic
from pgttt.checkpoints.model import GPT, CastedLinear, apply_precision, autocast, init_weights
from pgttt.errors import PgtttError
from pgttt.ttt.distributed import World

from .config import TrainConfig
from .loader import SequenceLoader, check_batch_shape, micro_batches
from .muon import Muon

CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_FORMAT = "pgttt-train-checkpoint/1"


class TrainError(PgtttError):
    """A training run that cannot start or continue as asked."""


def build_optimizers(model: GPT, config: TrainConfig, fused: bool) -> list[torch.optim.Optimizer]:
    """Muon for the blocks' linear weights (attention and MLP decay apart), AdamW for the rest."""
    matrices: dict[str, list[Tensor]] = {"attn": [], "mlp": []}
    for name, module in model.blocks.named_modules():
        if isinstance(module, CastedLinear):
            matrices["attn" if name.split(".")[1] == "attn" else "mlp"].append(module.weight)
    muon_ids = {id(p) for group in matrices.values() for p in group}
    head = [] if model.lm_head is None else [model.lm_head.weight]
    special = {id(model.tok_emb.weight), *(id(p) for p in head)}
    scalars = [p for p in model.parameters() if id(p) not in muon_ids and id(p) not in special]

    def group(params: list[Tensor], lr: float, **extra) -> dict:
        return {"params": params, "lr": lr, "base_lr": lr, **extra}

    adam = dict(betas=(config.beta1, config.beta2), eps=config.adam_eps, fused=fused)
    embed_lr = config.tied_embed_lr if model.config.tie_embeddings else config.embed_lr
    optimizers: list[torch.optim.Optimizer] = [
        torch.optim.AdamW([group([model.tok_emb.weight], embed_lr)], weight_decay=config.embed_wd, **adam),
        Muon(
            [group(ps, config.matrix_lr, weight_decay=config.wd_for(kind)) for kind, ps in matrices.items() if ps],
            lr=config.matrix_lr,
            momentum=config.muon_momentum,
            backend_steps=config.muon_backend_steps,
            row_normalize=config.muon_row_normalize,
        ),
        torch.optim.AdamW([group(scalars, config.scalar_lr)], weight_decay=config.adam_wd, **adam),
    ]
    if head:
        optimizers.append(torch.optim.Adam([group(head, config.head_lr)], **adam))
    return optimizers


def lr_scale(config: TrainConfig, progress: float) -> float:
    """1, then a linear warm-down to ``min_lr`` over the last ``warmdown_frac`` of training."""
    if config.warmdown_frac <= 0 or progress < 1.0 - config.warmdown_frac:
        return 1.0
    return max((1.0 - progress) / config.warmdown_frac, config.min_lr)


def muon_momentum(config: TrainConfig, step: int) -> float:
    if config.muon_momentum_warmup_steps <= 0:
        return config.muon_momentum
    frac = min(step / config.muon_momentum_warmup_steps, 1.0)
    return (1.0 - frac) * config.muon_momentum_warmup_start + frac * config.muon_momentum


class Trainer:
    """Model, optimizers, EMA, data position and clock of one run, and the step that advances them."""

    def __init__(
        self,
        model_config: ModelConfig,
        config: TrainConfig,
        loader: SequenceLoader,
        *,
        device: torch.device,
        compile: bool = False,
        log: Callable[[str], None] = print,
    ) -> None:
        world = World.current()
        check_batch_shape(config.train_batch_tokens, loader.seq_len, config.grad_accum_micro_batches, world.size)
        self.model_config, self.config, self.loader = model_config, config, loader
        self.device, self.world, self.log = device, world, log
        self.precision = "bf16" if device.type == "cuda" else "fp32"
        model = init_weights(GPT(model_config), config.seed, config.tied_embed_init_std)
        self.model = apply_precision(model, self.precision).to(device).train()
        # Depth recurrence switches on part-way through training (always on for evaluation).
        self.loops_later = model_config.num_loops > 0 and config.enable_looping_at > 0
        self.model.looping = not self.loops_later
        self.optimizers = build_optimizers(self.model, config, fused=device.type == "cuda")
        self.ema = {name: t.detach().float().clone() for name, t in self.model.state_dict().items()}
        self.step = 0
        self.train_seconds = 0.0
        self.last_loss = math.nan  # the loss of the last logged step
        self.loss_fn = torch.compile(self.model.loss) if compile else self.model.loss

    # ---- schedule ---------------------------------------------------------------------------
    @property
    def time_budget(self) -> float | None:
        cap = self.config.max_wallclock_seconds
        return cap - self.config.gptq_reserve_seconds if cap > 0 else None

    def progress(self) -> float:
        budget = self.time_budget
        if budget is not None:
            return min(self.train_seconds / budget, 1.0)
        return min(self.step / self.config.iterations, 1.0)

    def done(self) -> bool:
        budget = self.time_budget
        out_of_time = budget is not None and self.train_seconds >= budget
        if self.world.distributed:  # stop together: any rank out of time stops all
            out_of_time = bool(self.world.all_reduce_sum(torch.tensor(int(out_of_time), device=self.device)) > 0)
        return self.step >= self.config.iterations or out_of_time

    # ---- one step ---------------------------------------------------------------------------
    def train_step(self, lr_mul: float, momentum: float) -> Tensor:
        """One optimizer step on the next global batch; returns the mean loss (a tensor: no sync)."""
        cfg = self.config
        for opt in self.optimizers:
            for group in opt.param_groups:
                group["lr"] = group["base_lr"] * lr_mul
                if isinstance(opt, Muon):
                    group["momentum"] = momentum
            opt.zero_grad(set_to_none=True)
        num_micro = cfg.grad_accum_micro_batches
        loss_sum = torch.zeros((), device=self.device)
        for tokens in micro_batches(self.loader, cfg.train_batch_tokens, num_micro, self.world.rank, self.world.size):
            tokens = tokens.to(self.device, non_blocking=True)
            with autocast(self.precision, self.device):
                loss = self.loss_fn(tokens[:, :-1], tokens[:, 1:])
            # Each micro-batch weighs 1/num_micro: summed over ranks, the gradient of the global mean.
            (loss / num_micro).backward()
            loss_sum += loss.detach()
        params = list(self.model.parameters())
        loss_sum = self.world.all_reduce_grads(params, loss_sum)
        if cfg.grad_clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip_norm)
        for opt in self.optimizers:
            opt.step()
        return loss_sum / num_micro

    def advance(self) -> Tensor:
        """The scheduled step: looping switch, learning rate, momentum, then the EMA update."""
        progress = self.progress()
        if self.loops_later and not self.model.looping and progress >= self.config.enable_looping_at:
            self.model.looping = True
            self.log(f"step {self.step}: depth recurrence on (progress {progress:.3f})")
        loss = self.train_step(lr_scale(self.config, progress), muon_momentum(self.config, self.step))
        with torch.no_grad():
            ema, weights = list(self.ema.values()), [t.float() for t in self.model.state_dict().values()]
            torch._foreach_mul_(ema, self.config.ema_decay)
            torch._foreach_add_(ema, weights, alpha=1.0 - self.config.ema_decay)
        self.step += 1
        return loss

    def warm_up(self, progress: Callable[[int, int], None] | None = None) -> None:
        """The record's warm-up: ``warmup_steps`` steps (and as many with recurrence on), then undone.
        ``progress(done, total)`` after each step."""
        snapshot = copy.deepcopy(self.state_dict())
        passes = [False, True] if self.loops_later else [self.model.looping]
        total = len(passes) * self.config.warmup_steps
        for n, looping in enumerate(passes):
            self.model.looping = looping
            for i in range(self.config.warmup_steps):
                self.train_step(1.0, muon_momentum(self.config, i))
                if progress is not None:
                    progress(n * self.config.warmup_steps + i + 1, total)
        self.load_state_dict(snapshot)
        self.log(f"warm-up: {self.config.warmup_steps} steps run and undone")

    # ---- the loop ---------------------------------------------------------------------------
    def fit(
        self,
        *,
        checkpoint: Callable[[], None] | None = None,
        checkpoint_every: int = 0,
        validate: Callable[[GPT], str] | None = None,
    ) -> None:
        """Train until done (the last step's loss is logged). Validation and checkpoints stop the clock."""
        cfg = self.config
        tokens_per_step = cfg.train_batch_tokens
        start_step, start_seconds = self.step, self.train_seconds
        clock = time.perf_counter()
        while not self.done():
            loss = self.advance()
            self._sync()
            now = time.perf_counter()
            self.train_seconds += now - clock
            clock = now
            logged = cfg.train_log_every > 0 and (self.step <= 5 or self.step % cfg.train_log_every == 0)
            if logged or self.done():
                self.last_loss = float(loss.item())
                self.log(self._progress_line(self.last_loss, start_step, start_seconds, tokens_per_step))
            if validate is not None and cfg.val_loss_every > 0 and self.step % cfg.val_loss_every == 0:
                self.log(f"step {self.step}: {validate(self.model)}")
            if checkpoint is not None and checkpoint_every > 0 and self.step % checkpoint_every == 0:
                checkpoint()
            clock = time.perf_counter()

    def _progress_line(self, loss: float, start_step: int, start_seconds: float, tokens_per_step: int) -> str:
        steps = self.step - start_step
        seconds = max(self.train_seconds - start_seconds, 1e-9)
        per_step = seconds / max(steps, 1)
        eta = (self.config.iterations - self.step) * per_step
        if self.time_budget is not None:
            eta = min(eta, max(self.time_budget - self.train_seconds, 0.0))
        return (
            f"step {self.step}/{self.config.iterations} loss {loss:.4f} "
            f"lr_scale {lr_scale(self.config, self.progress()):.3f} tok/s {steps * tokens_per_step / seconds:,.0f} "
            f"train_time {self.train_seconds:.1f}s eta {eta:.1f}s"
        )

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def use_ema(self) -> None:
        """Load the EMA weights as the model's, recurrence on: the final model."""
        with torch.no_grad():
            for name, t in self.model.state_dict().items():
                t.copy_(self.ema[name].to(t.dtype))
        self.model.looping = True

    # ---- checkpoints ------------------------------------------------------------------------
    def state_dict(self) -> dict:
        cuda_rng = [torch.cuda.get_rng_state(self.device)] if self.device.type == "cuda" else []
        return {
            "format": CHECKPOINT_FORMAT,
            "model_config": json.dumps(self.model_config.to_dict(), sort_keys=True),
            "train_config": json.dumps(self.config.to_dict(), sort_keys=True),
            "step": self.step,
            "train_seconds": self.train_seconds,
            "last_loss": self.last_loss,
            "looping": self.model.looping,
            "model": self.model.state_dict(),
            "optimizers": [opt.state_dict() for opt in self.optimizers],
            "ema": self.ema,
            "loader": self.loader.state_dict(),
            "rng": {"cpu": torch.get_rng_state(), "cuda": cuda_rng},
        }

    def load_state_dict(self, state: dict, where: str = "checkpoint") -> None:
        if state.get("format") != CHECKPOINT_FORMAT:
            raise TrainError(f"{where}: not a pgttt training checkpoint (format {state.get('format')!r})")
        for key, current in (("model_config", self.model_config), ("train_config", self.config)):
            saved = json.loads(state[key])
            now = current.to_dict()
            changed = sorted(k for k in saved.keys() | now.keys() if saved.get(k) != now.get(k))
            if changed:
                detail = ", ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in changed)
                raise TrainError(f"{where}: was written by a run with other settings ({detail}); resume with the same")
        self.model.load_state_dict(state["model"])
        for opt, opt_state in zip(self.optimizers, state["optimizers"], strict=True):
            opt.load_state_dict(opt_state)
        self.ema = {name: t.to(self.device).clone() for name, t in state["ema"].items()}
        self.loader.load_state_dict(state["loader"])
        torch.set_rng_state(state["rng"]["cpu"])
        if self.device.type == "cuda" and state["rng"]["cuda"]:
            torch.cuda.set_rng_state(state["rng"]["cuda"][0], self.device)
        self.step, self.train_seconds = int(state["step"]), float(state["train_seconds"])
        self.last_loss = float(state["last_loss"])
        self.model.looping = bool(state["looping"])

    def save(self, path: Path) -> None:
        """Rank 0 writes (atomically: temp file, fsync, rename); every rank holds the same state."""
        if self.world.rank == 0:
            buffer = io.BytesIO()
            torch.save(self.state_dict(), buffer)
            write_atomic(path, buffer.getvalue())
            self.log(f"step {self.step}: checkpoint {path}")

    def load(self, path: Path) -> None:
        if not path.is_file():
            raise TrainError(f"{path}: no training checkpoint to resume from")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - a truncated or foreign file; say which
            raise TrainError(f"{path}: not a readable training checkpoint ({exc})") from None
        if not isinstance(state, dict):
            raise TrainError(f"{path}: not a pgttt training checkpoint")
        self.load_state_dict(state, where=str(path))
        self.log(f"resumed from {path} at step {self.step} ({self.train_seconds:.1f}s trained)")
