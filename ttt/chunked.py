"""Score-first chunked TTT (spec sections 3-4): the protocol ``protocol="chunked"`` names, and ``run_chunked``.

``run_chunked`` runs it on a model in place: windows are planned with numpy (``plan.plan_windows``); for each
chunk, score its windows with the current weights, then (unless it is the last chunk) train on the chunk's
whole sequences. Sliding-window evaluation is ``ttt_epochs=0``. The model calls, plain or compiled, and the
warm-up that compiles them are in ``chunked_compiled``; ``CHUNKED`` is the protocol as ``EvalSession`` runs it.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from pgttt.checkpoints.model import GPT

from .chunked_compiled import Batches, Steps, score_windows, train_loss, training, warm_up
from .compliance import ComplianceLog, check_compliance, verdict
from .config import EvalConfig
from .data import ByteSource
from .distributed import World
from .errors import EvalCancelled, EvalError
from .plan import merged_spans, plan_windows, share
from .protocol import (
    CancelEvent,
    ChunkTrace,
    Compiled,
    Progress,
    ProgressFn,
    ProtocolRun,
    bits_per_byte,
    resolved_shape,
)
from .units import UnitLog


def run_chunked(
    model: GPT,
    tokens: np.ndarray,
    tables: ByteSource,
    config: EvalConfig,
    *,
    steps: Steps | None = None,
    world: World | None = None,
    progress: ProgressFn | None = None,
    cancel: CancelEvent | None = None,
) -> ProtocolRun:
    """Spec sections 3-4 on ``model`` in place (its weights end adapted). ``tokens``: the trimmed val stream
    (T + 1 ids); ``tables``: the bytes of its targets (tokenizer tables or the val set's sidecar);
    ``config``: resolved. One unit per chunk that has windows (for a sliding-window evaluation too: the chunk
    plan is there all the same), first_token its first scored target."""
    run = _ChunkedRun(
        model, tokens, tables, config, steps or Steps(model, compiled=False), world or World.current(), progress, cancel
    )
    last = run.plan.num_chunks - 1
    for c in range(run.plan.num_chunks):
        w0, w1 = run.plan.chunk_windows(c)
        if w0 == w1:
            continue  # a chunk with no windows is neither scored nor trained on
        t0 = time.perf_counter()
        # 1. Score the chunk's windows with the current weights, before any update that could see them.
        scored_tokens, scored_bytes = run.score(c, w0, w1)
        t1 = time.perf_counter()
        # 2. Train on the chunk's whole sequences, unless it is the last chunk.
        lr, epoch_losses = run.train(c) if c < last else (None, [])
        run.trace(
            ChunkTrace(
                index=c,
                windows=w1 - w0,
                scored_tokens=scored_tokens,
                scored_bytes=scored_bytes,
                running_loss=run.loss_sum / run.scored,
                running_bpb=bits_per_byte(run.loss_sum, run.scored, run.bytes),
                lr=lr,
                train_loss=epoch_losses,
                scoring_s=t1 - t0,
                training_s=time.perf_counter() - t1,
            )
        )
    return run.finish()


class _ChunkedRun:
    """One evaluation's plan, batches, optimizer, running sums and ledgers (compliance, units, trace)."""

    def __init__(
        self,
        model: GPT,
        tokens: np.ndarray,
        tables: ByteSource,
        config: EvalConfig,
        steps: Steps,
        world: World,
        progress: ProgressFn | None,
        cancel: CancelEvent | None,
    ) -> None:
        self.length, self.precision = resolved_shape(config)
        self.model, self.config, self.steps, self.world = model, config, steps, world
        self.progress, self.cancel = progress, cancel
        self.device = next(model.parameters()).device
        self.total = len(tokens) - 1
        self.plan = plan_windows(
            self.total, self.length, config.stride, config.chunk_tokens, tables.target_bytes(tokens)
        )
        if self.plan.num_windows == 0:
            raise EvalError(
                f"max_tokens={config.max_tokens}: {self.total} targets leave no window; more than "
                f"seq_len - stride = {self.length - config.stride} targets are needed"
            )
        stream = torch.from_numpy(np.asarray(tokens, dtype=np.int64)).to(self.device)
        self.batches = Batches(self.plan, stream)
        self.params = adapted_params(model, config)
        self.adapted = tuple(id(p) for p in self.params)
        self.optimizer = make_optimizer(config, self.params) if self.params else None
        model.eval().requires_grad_(False)
        model.cache_rotary(self.length, self.device)
        self.log = ComplianceLog()
        self.units = UnitLog("chunk")
        self.chunks: list[ChunkTrace] = []
        self.loss_sum, self.scored, self.bytes = 0.0, 0, 0
        self.scoring_s = self.training_s = 0.0
        self.started = time.perf_counter()

    def report(self, phase: str, chunk: int, extra_tokens: int) -> None:
        if self.cancel is not None and self.cancel.is_set():
            raise EvalCancelled(f"cancelled in chunk {chunk + 1} of {self.plan.num_chunks} ({phase})")
        if self.progress is not None:
            loss = self.loss_sum / self.scored if self.scored else None
            self.progress(
                Progress(
                    phase,
                    chunk,
                    len(self.chunks),
                    self.plan.num_chunks,
                    self.scored + extra_tokens,
                    self.total,
                    loss,
                    bits_per_byte(self.loss_sum, self.scored, self.bytes),
                    time.perf_counter() - self.started,
                )
            )

    def score(self, c: int, w0: int, w1: int) -> tuple[int, int]:
        """This rank's share of chunk ``c``'s windows ``w0 .. w1-1``, gradients off; every rank's sums added to the
        running ones. Returns the chunk's scored tokens and bytes."""
        plan, batch_seqs, device = self.plan, self.config.batch_seqs, self.device
        lo, hi = (w0 + i for i in share(w1 - w0, self.world.rank, self.world.size))
        chunk_loss = torch.zeros((), dtype=torch.float64, device=device)
        observed = torch.zeros((), dtype=torch.int64, device=device)
        with torch.no_grad():
            for b in range(lo, hi, batch_seqs):
                self.report("scoring", c, plan.scored_tokens(lo, b))
                e = min(b + batch_seqs, hi)
                loss, scored = score_windows(self.steps, self.batches, b, e, batch_seqs, self.precision)
                chunk_loss += loss
                observed += scored
        local = [plan.scored_tokens(lo, hi), int(plan.window_bytes[lo:hi].sum())]
        sums = torch.cat(
            (torch.stack((chunk_loss, observed.double())), torch.tensor(local, dtype=torch.float64, device=device))
        )
        observed_here = int(observed)
        self.log.score(c, merged_spans(plan.score_from[lo:hi] + 1, plan.ends[lo:hi] + 1), observed_here)
        chunk_loss_sum, _, chunk_tokens, chunk_bytes = self.world.all_reduce_sum(sums).tolist()
        self.loss_sum += chunk_loss_sum
        self.scored += int(chunk_tokens)
        self.bytes += int(chunk_bytes)
        self.units.add(c, int(plan.score_from[w0]) + 1, int(chunk_tokens), int(chunk_bytes), chunk_loss_sum)
        return int(chunk_tokens), int(chunk_bytes)

    def train(self, c: int) -> tuple[float | None, list[float]]:
        """``ttt_epochs`` passes over chunk ``c``'s whole sequences at its learning rate, each rank on its share of
        each batch. Returns the rate and each epoch's mean loss (None and none: nothing to train)."""
        starts = self.plan.training_starts(c)
        if self.optimizer is None or not len(starts):
            return None, []
        config, world, device, params = self.config, self.world, self.device, self.params
        batch_seqs, epochs = config.batch_seqs, config.ttt_epochs
        lr = config.lr_at(c, self.plan.num_chunks)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        epoch_sums = torch.zeros(epochs, dtype=torch.float32, device=device)  # read once, after the epochs
        with training(self.model, params):
            for epoch in range(epochs):
                for j in range(0, len(starts), batch_seqs):
                    self.report("training", c, 0)
                    count = min(batch_seqs, len(starts) - j)
                    a, b = share(count, world.rank, world.size)
                    self.optimizer.zero_grad(set_to_none=True)
                    batch_loss = torch.zeros((), dtype=torch.float32, device=device)
                    if b > a:
                        loss = train_loss(
                            self.steps, self.batches, int(starts[j + a]), b - a, self.precision, self.adapted
                        )
                        # This rank's share of the batch's mean: the sum over ranks is the mean over the batch.
                        weighted = loss if b - a == count else loss * ((b - a) / count)
                        weighted.backward()
                        batch_loss = weighted.detach().float()
                        if epoch == 0:
                            self.log.train(c, [(int(starts[j + a]), int(starts[j + b - 1]) + self.length + 1)])
                    batch_loss = world.all_reduce_grads(params, batch_loss)
                    torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
                    self.optimizer.step()
                    epoch_sums[epoch] += batch_loss
        return lr, [v / -(-len(starts) // batch_seqs) for v in epoch_sums.tolist()]

    def trace(self, chunk: ChunkTrace) -> None:
        self.scoring_s += chunk.scoring_s
        self.training_s += chunk.training_s
        self.chunks.append(chunk)

    def finish(self) -> ProtocolRun:
        """Every rank's ledger merged and checked; the gradients dropped."""
        world = self.world
        merged = ComplianceLog.merge(world.all_gather(self.log)) if world.distributed else self.log
        for p in self.params:
            p.grad = None
        return ProtocolRun(
            self.loss_sum,
            self.scored,
            self.bytes,
            self.chunks,
            check_compliance(merged, self.total),
            self.scoring_s,
            self.training_s,
            self.units.sums(),
        )  # every rank holds every chunk's sums


def make_optimizer(config: EvalConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.ttt_lr, betas=(config.ttt_momentum, 0.999), weight_decay=0.0)
    return torch.optim.SGD(params, lr=config.ttt_lr, momentum=config.ttt_momentum, nesterov=False, weight_decay=0.0)


def adapted_params(model: GPT, config: EvalConfig) -> list[torch.nn.Parameter]:
    """The parameters TTT adapts (none with epochs 0)."""
    names = [n for n, _ in model.named_parameters()]
    adapted = set(config.adapted(names)) if config.ttt_epochs > 0 else set()
    if config.ttt_epochs > 0 and not adapted:
        raise EvalError(
            f"adapt_include={list(config.adapt_include)} adapt_exclude={list(config.adapt_exclude)}: "
            "no parameter is left to adapt (use ttt_epochs=0 for a sliding-window evaluation)"
        )
    return [p for name, p in model.named_parameters() if name in adapted]


class Chunked:
    """The chunked protocol as ``EvalSession`` runs it (``protocol.Protocol``)."""

    name = "chunked"
    cudnn_attention = True  # every window is seq_len long: a few shapes, each planned once

    @staticmethod
    def compiled_steps(model: GPT, compiled: Compiled) -> Steps:
        return compiled.twin(
            ("chunked", compiled.cuda_graphs), lambda: Steps(model, True, cuda_graphs=compiled.cuda_graphs)
        )

    def warm_up(
        self,
        model: GPT,
        compiled: Compiled,
        config: EvalConfig,
        world: World,
        *,
        tokens: np.ndarray | None = None,
        static_training: bool = False,
        fallback: bool | None = None,
    ) -> None:
        """In an evaluation (not ``EvalSession.warmup``), a new training batch size takes the dynamic-batch graph
        instead of a compile of its own, or runs plain while that graph is deferred (``chunked_compiled.warm_up``)."""
        if config.compile:
            warm_up(
                model,
                self.compiled_steps(model, compiled),
                config,
                adapted_params(model, config),
                world,
                static_training=static_training,
                fallback=fallback,
            )

    def run(
        self,
        model: GPT,
        compiled: Compiled,
        tokens: np.ndarray,
        source: ByteSource,
        config: EvalConfig,
        world: World,
        progress: ProgressFn | None,
        cancel: CancelEvent | None,
    ) -> ProtocolRun:
        steps = self.compiled_steps(model, compiled) if config.compile else None
        return run_chunked(model, tokens, source, config, steps=steps, world=world, progress=progress, cancel=cancel)

    def describe(self, config: dict[str, Any], compliance: dict[str, Any]) -> tuple[str, str]:
        mode = "sliding" if config["ttt_epochs"] == 0 else f"ttt {config['ttt_epochs']}ep/{config['chunk_tokens']}"
        return f"{mode} seq_len {config['seq_len']} stride {config['stride']}", verdict(compliance)

    def warnings(self, config: EvalConfig, run: ProtocolRun) -> list[str]:
        if config.ttt_epochs == 0 or any(c.lr is not None for c in run.chunks):
            return []
        return [
            f"ttt_epochs={config.ttt_epochs} trained on nothing: of {len(run.chunks)} chunk(s) of chunk_tokens="
            f"{config.chunk_tokens}, none was trained on (the last chunk never is, nor one without a whole "
            f"seq_len={config.seq_len} sequence), so val_bpb is ttt_epochs=0's; score more tokens than chunk_tokens"
        ]


CHUNKED = Chunked()
