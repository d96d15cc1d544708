"""The chunked protocol's two model calls, plain and compiled (``Steps``), the batches they take, and ``warm_up``.

``chunked.run_chunked`` calls a ``Steps``: its plain path is the model's own functions (``score_batch``,
``GPT.loss``); its compiled path runs the same functions through ``torch.compile`` with fixed shapes, and
``warm_up`` runs every shape an evaluation will use through the evaluation's own batch builders (``Batches``),
so the evaluation never compiles. Batches are built on the device from the window plan by index arithmetic
and one gather each; only the scored positions go through the output layer.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from pgttt.checkpoints.model import GPT, autocast

from .config import EvalConfig
from .distributed import World
from .plan import Plan, plan_windows, share
from .protocol import resolved_shape

log = logging.getLogger(__name__)


def score_batch(model: GPT, x: Tensor, positions: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
    """Summed cross-entropy (float64) at the masked ``positions`` of each window: logits only where scored."""
    hidden = model.forward_hidden(x, positions)  # the last block runs only at the scored positions
    logits = model.logits_from_hidden(hidden).float()
    nll = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
    return torch.where(mask.flatten(), nll, 0.0).sum(dtype=torch.float64)


class Steps:
    """The protocol's two model calls, compiled or plain; shapes already warmed up are remembered.

    Compiled, every scoring batch is padded to ``batch_seqs`` rows (``static_shapes``), so one graph serves
    every batch; window 0, the one window scored at every position, runs alone through the plain function
    (``score_first``): once an evaluation, it is not worth a graph of its own. Training batches whose shape was
    warmed up (``warm_up``) run static graphs; any other batch size runs one graph with a dynamic batch
    dimension (the fallback), so a new chunk size never compiles, or the plain ``GPT.loss`` while the fallback
    is deferred to a later warm-up (``fallback_deferred``). Run 5 (bench/RESULTS.md) measured the dynamic graph
    14-22% slower than static ones; compiling it took 84 s of a 175 s cold warm-up on an H200 (run 26).

    With ``cuda_graphs`` (the default) the static training graphs are replayed as CUDA graphs (Inductor's
    ``reduce-overhead`` mode): one launch instead of ~1,000 kernel launches a step. A gang's ranks train
    small shares of each batch, and their steps waited on the CPU without it: on two H200s a job's training
    went from no faster than one GPU to 1.70-1.73x (bench/RESULTS.md, runs 7, 9 and 12). No effect off CUDA.
    """

    def __init__(
        self, model: GPT, compiled: bool, static_shapes: bool | None = None, *, cuda_graphs: bool = True
    ) -> None:
        self.compiled = compiled
        self.static_shapes = compiled if static_shapes is None else static_shapes
        self.cuda_graphs = cuda_graphs
        self.warmed: set[tuple[Any, ...]] = set()
        # (sequences, seq_len, ids of the adapted parameters) of the training batches with static graphs.
        self.static_batches: set[tuple[int, int, tuple[int, ...]]] = set()
        # (seq_len, ids of the adapted parameters) the dynamic-batch graph serves; other batches run plain.
        self.dynamic_batches: set[tuple[int, tuple[int, ...]]] = set()
        self.fallback_deferred = False  # an explicit warm-up left the dynamic graph to a later one

        def score(x: Tensor, positions: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
            return score_batch(model, x, positions, targets, mask)

        def any_batch_loss(x: Tensor, y: Tensor) -> Tensor:
            # A frame of its own, so its dynamic graph is cached apart from model.loss's static ones.
            return model.loss(x, y)

        self.score_first = score
        if compiled:
            # Each (shape, adapted set) is its own graph; a service sees a few seq_lens, never 8 is too few.
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
            self.score = torch.compile(score, dynamic=False)
            static_loss = torch.compile(model.loss, dynamic=False, mode="reduce-overhead" if cuda_graphs else None)
            dynamic_loss = torch.compile(any_batch_loss)

            def loss(x: Tensor, y: Tensor, adapted: tuple[int, ...]) -> Tensor:
                if (*x.shape, adapted) in self.static_batches:
                    if cuda_graphs:
                        # A new step: the last replay's outputs (its loss, the gradients it made) are never read
                        # again (run_chunked drops the gradients first), so this replay may reuse their memory.
                        torch.compiler.cudagraph_mark_step_begin()
                    return static_loss(x, y)
                if (x.size(1), adapted) not in self.dynamic_batches:
                    return model.loss(x, y)  # no graph for it yet: plain, never a compile inside a job
                # A batch of one sequence is specialised (and warmed up) separately even here.
                torch._dynamo.maybe_mark_dynamic(x, 0)
                torch._dynamo.maybe_mark_dynamic(y, 0)
                return dynamic_loss(x, y)

            self.loss = loss
        else:
            self.score = score
            self.loss = lambda x, y, adapted: model.loss(x, y)


class Batches:
    """Builds batches on the device from the plan by index arithmetic and one gather each."""

    def __init__(self, plan: Plan, stream: Tensor) -> None:
        device = stream.device
        self.plan, self.stream = plan, stream
        self.starts = torch.from_numpy(plan.starts).to(device)
        self.ends = torch.from_numpy(plan.ends).to(device)
        self.score_from = torch.from_numpy(plan.score_from).to(device)
        self.offsets = torch.arange(plan.seq_len, device=device)

    def score(self, lo: int, hi: int, rows: int, width: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Windows ``lo .. hi-1`` padded to ``rows`` rows: inputs, scored positions, targets, mask."""
        total = self.plan.total_targets
        window = torch.arange(lo, lo + rows, device=self.stream.device)
        real = window < hi
        window = window.clamp(max=hi - 1)
        ws, we, sf = self.starts[window], self.ends[window], self.score_from[window]
        pos = ws[:, None] + self.offsets
        x = torch.where(real[:, None] & (pos < we[:, None]), self.stream[pos.clamp(max=total)], 0)
        # The window's last `width` positions; those before its first scored one are masked off.
        local = (we - ws)[:, None] - width + self.offsets[:width]
        mask = real[:, None] & (local >= (sf - ws)[:, None])
        local = local.clamp(min=0)
        targets = self.stream[ws[:, None] + local + 1]
        return x, local, targets, mask

    def train(self, first: int, count: int) -> tuple[Tensor, Tensor]:
        """``count`` consecutive sequences from ``first``: inputs and targets shifted by one."""
        length = self.plan.seq_len
        tokens = self.stream[first : first + count * length + 1]
        return tokens[:-1].view(count, length), tokens[1:].view(count, length)


@contextlib.contextmanager
def training(model: GPT, params: list[torch.nn.Parameter]) -> Iterator[None]:
    """Gradients on for ``params`` only while training. Scoring always sees every parameter without
    gradients, so one compiled scoring graph serves sliding and TTT settings alike (graphs guard on it)."""
    for p in params:
        p.requires_grad_(True)
    try:
        yield
    finally:
        model.requires_grad_(False)


def score_windows(
    steps: Steps, batches: Batches, lo: int, hi: int, batch_seqs: int, precision: str
) -> tuple[Tensor, Tensor]:
    """Summed loss and number of scored positions of windows ``lo .. hi-1`` (gradients off), in one batch at the
    stride's width: padded to ``batch_seqs`` rows with ``static_shapes``, else as many rows as windows. Window 0
    scores every position: it runs first, alone (``Steps.score_first``), and the batch holds the others."""
    loss = torch.zeros((), dtype=torch.float64, device=batches.stream.device)
    observed = torch.zeros((), dtype=torch.int64, device=batches.stream.device)
    with autocast(precision, batches.stream.device):
        if lo == 0:
            x, positions, targets, mask = batches.score(0, 1, 1, batches.plan.seq_len)
            loss, observed = loss + steps.score_first(x, positions, targets, mask), observed + mask.sum()
            lo = 1
        if hi > lo:
            rows = batch_seqs if steps.static_shapes else hi - lo
            x, positions, targets, mask = batches.score(lo, hi, rows, batches.plan.stride)
            loss, observed = loss + steps.score(x, positions, targets, mask), observed + mask.sum()
    return loss, observed


def train_loss(
    steps: Steps, batches: Batches, first: int, count: int, precision: str, adapted: tuple[int, ...]
) -> Tensor:
    """Mean training loss of ``count`` consecutive sequences from ``first``; ``adapted``: the ids of the
    parameters being trained (a compiled graph is specific to them)."""
    x, y = batches.train(first, count)
    with autocast(precision, x.device):
        return steps.loss(x, y, adapted)


def warm_up(
    model: GPT,
    steps: Steps,
    config: EvalConfig,
    params: list[torch.nn.Parameter],
    world: World | None = None,
    *,
    static_training: bool = True,
    fallback: bool | None = None,
) -> None:
    """Run every batch shape an evaluation with ``config`` (resolved) uses, through its own batch builders,
    so it never compiles. Each shape runs twice: a guard the first call leaves behind (a cache filled on
    the way) fails on the second, which compiles the graph that real calls then reuse. Training batch
    sizes get static graphs with ``static_training`` (an explicit warm-up); otherwise the dynamic-batch
    graph takes them and nothing new compiles. ``fallback``: whether to compile that dynamic-batch graph:
    False defers it to a later warm-up that passes True (batches without a graph run plain meanwhile), None
    does what the last explicit choice said (compile, unless deferred). ``params``: the parameters TTT adapts
    (``chunked.adapted_params``). Weights unchanged."""
    world = world or World.current()
    device = next(model.parameters()).device
    (length, precision), rows = resolved_shape(config), config.batch_seqs
    total = length * (rows + 1)  # enough windows for a full batch after window 0
    plan = plan_windows(total, length, config.stride, config.chunk_tokens, np.zeros(total, dtype=np.int64))
    batches = Batches(plan, torch.zeros(total + 1, dtype=torch.long, device=device))
    model.requires_grad_(False)
    model.cache_rotary(length, device)
    shape = ("score", rows, length, config.stride)
    if shape not in steps.warmed:
        t0 = time.perf_counter()
        hi = min(1 + rows, plan.num_windows)
        with torch.no_grad():
            for _ in range(2):
                score_windows(steps, batches, 1, hi, rows, precision)
        steps.warmed.add(shape)
        log.info(
            "chunked warm-up: scoring %d x %d (width %d) %.1f s", rows, length, config.stride, time.perf_counter() - t0
        )
    chunk_seqs = config.chunk_tokens // length if config.ttt_epochs > 0 else 0
    shares = (share(count, world.rank, world.size) for count in {min(rows, chunk_seqs), chunk_seqs % rows} - {0})
    counts = {b - a for a, b in shares} - {0}
    adapted = tuple(id(p) for p in params)

    def train_twice(count: int, what: str) -> None:
        t0 = time.perf_counter()
        with training(model, params):
            for _ in range(2):
                train_loss(steps, batches, 0, count, precision, adapted).backward()
                for p in params:  # as run_chunked does before each step (a CUDA graph's replay reuses them)
                    p.grad = None
        log.info("chunked warm-up: training %s (%d x %d) %.1f s", what, count, length, time.perf_counter() - t0)

    if fallback is not None:
        steps.fallback_deferred = not fallback
    if counts and not steps.fallback_deferred and (length, adapted) not in steps.dynamic_batches:
        # The dynamic-batch graph, at a size no static graph takes: it serves chunk sizes no warm-up saw.
        steps.dynamic_batches.add((length, adapted))  # first, so that these calls compile it
        train_twice(max(2, max(counts) + 1), "any batch size")
    for count in counts:
        train_shape = (count, length, adapted)
        if train_shape in steps.static_batches or not (static_training or count == 1):
            continue  # the dynamic graph or the plain loss takes it (a batch of one is always specialised)
        steps.static_batches.add(train_shape)  # first, so that these calls compile the static graph
        train_twice(count, "static")
