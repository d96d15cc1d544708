"""Score-first chunked test-time training (spec sections 3-4), and the session that serves it.

``run_protocol`` runs the protocol on a model in place: for each chunk, score its windows with the
current weights, then (unless it is the last chunk) train on the chunk's whole sequences. Windows are
planned with numpy (``plan``), batched by one gather (padded to fixed ``(batch_seqs, seq_len)`` shapes
when compiled), and only the scored positions go through the output layer. ``EvalSession`` holds a
checkpoint's pristine weights and one working model per (device, precision), reset before every
evaluation. With several ranks, cancel every rank's evaluation: a rank left alone waits in a collective.
"""

from __future__ import annotations

import contextlib
import copy
import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from pgttt import __version__
from pgttt.api import challenge
from pgttt.api.units import UnitSums
from pgttt.budget import BudgetError, ModelShape, estimate, family_for, settings_from_dict
from pgttt.checkpoints.config import ModelConfig
from pgttt.checkpoints.model import GPT, apply_precision, autocast

from .bytes import ByteTables, byte_source, load_byte_tables
from .compliance import ComplianceLog, check_compliance
from .config import EvalConfig
from .data import ByteSource, ValSet, load_val
from .distributed import World
from .errors import EvalCancelled, EvalError
from .phased import PhasedProgress, run_phased
from .phased_compiled import PhasedStep, batch_sizes
from .plan import Plan, merged_spans, plan_windows, share
from .units import UnitLog

ENGINE_VERSION = __version__

# The challenge's eval budget: the full val split (its first 50,000 documents) on 8 GPUs within 600 seconds.
# Its size is per tokenizer family (pgttt.budget.FAMILIES: 40,540,160 SP8192 targets, 47,851,520 CaseOps).
BUDGET_GPUS = challenge.REFERENCE_GPUS
BUDGET_S = challenge.EVAL_BUDGET_S


def dataset_family_hint(valset: ValSet) -> str:
    """What names the val set's family for the full-val projection: a byte sidecar means CaseOps, whatever the
    folder is called; otherwise the shards' paths (``fineweb10B_sp1024/...`` -> sp1024)."""
    if valset.sidecar is not None:
        return "caseops"
    return " ".join(str(f) for f in valset.files)


def project_full_eval(tokens_per_second: float, world_size: int, config: dict[str, Any] | None = None,
                      dataset: str | None = None, model_config: dict[str, Any] | None = None) -> dict[str, Any]:
    """Two projections of this evaluation onto the challenge's full val set on 8 GPUs.

    ``pgttt``: this run's throughput on 8 GPUs of the kind it ran on (linear in GPUs). ``reference``: the record's
    own script on 8xH100 (``pgttt.budget``), which is what the 600 s rule is about, so it decides ``fits_budget``.
    """
    family = family_for(dataset)
    per_gpu = tokens_per_second / world_size
    seconds = family.targets / (per_gpu * BUDGET_GPUS) if per_gpu > 0 else math.inf
    pgttt = {
        "tokens": family.targets, "family": family.name, "gpus": BUDGET_GPUS, "seconds": seconds,
        "tokens_per_second_per_gpu": per_gpu,
        "assumes": "this run's tokens/s per device, on the same kind of device, scaling linearly to 8 "
                   "(optimistic for TTT: smaller per-device training batches run slower per token)",
    }
    reference = None
    if config is not None:
        shape = ModelShape.from_model_config(model_config) if model_config else None
        try:
            reference = estimate(settings_from_dict(config), family=family, shape=shape, budget_s=BUDGET_S).to_dict()
        except BudgetError:
            reference = None  # settings the oracle cannot price: pgttt's projection decides, and says so
    fits = reference["fits_budget"] if reference is not None else seconds <= BUDGET_S
    return {"pgttt": pgttt, "reference": reference, "budget_s": BUDGET_S, "fits_budget": fits,
            "decided_by": "reference" if reference is not None else "pgttt"}


class CancelEvent(Protocol):
    def is_set(self) -> bool: ...


@dataclass(frozen=True)
class Progress:
    phase: str  # "scoring" or "training"
    chunk: int
    chunks_done: int
    num_chunks: int
    tokens_scored: int  # through finished chunks, plus this rank's batches of the current chunk
    tokens_total: int
    loss: float | None  # running values, as of the last finished chunk
    bpb: float | None
    elapsed_s: float
    # The phased protocol's (chunk/chunks count documents there): its documents, phases and an estimate.
    docs_done: int | None = None
    docs_total: int | None = None
    phases_done: int | None = None
    num_phases: int | None = None
    eta_s: float | None = None


ProgressFn = Callable[[Progress], None]


@dataclass
class ChunkTrace:
    index: int
    windows: int
    scored_tokens: int
    scored_bytes: int
    running_loss: float
    running_bpb: float | None
    lr: float | None  # None: not trained on (the last chunk, epochs 0, or shorter than seq_len)
    train_loss: list[float]  # mean training loss of each epoch
    scoring_s: float
    training_s: float


@dataclass
class ProtocolRun:
    loss_sum: float
    tokens: int
    bytes: int
    chunks: list[ChunkTrace]
    compliance: dict[str, Any]
    scoring_s: float
    training_s: float
    units: UnitSums

    @property
    def val_loss(self) -> float:
        return self.loss_sum / self.tokens

    @property
    def val_bpb(self) -> float:
        bpb = bits_per_byte(self.loss_sum, self.tokens, self.bytes)
        if bpb is None:
            raise EvalError(f"the {self.tokens} scored tokens stand for 0 bytes: bits per byte is undefined")
        return bpb


def bits_per_byte(loss_sum: float, tokens: int, nbytes: int) -> float | None:
    """Spec section 2: ``(loss_sum / tokens) / ln 2 * tokens / bytes``; None before any byte is scored."""
    if tokens <= 0 or nbytes <= 0:
        return None
    return loss_sum / tokens / math.log(2.0) * tokens / nbytes


def resolved_shape(config: EvalConfig) -> tuple[int, str]:
    """``seq_len`` and ``precision`` of a resolved config (``EvalConfig.resolved``)."""
    if config.seq_len is None or config.precision is None:
        raise ValueError("the engine needs a resolved EvalConfig (EvalConfig.resolved)")
    return config.seq_len, config.precision


def score_batch(model: GPT, x: Tensor, positions: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
    """Summed cross-entropy (float64) at the masked ``positions`` of each window: logits only where scored."""
    hidden = model.forward_hidden(x, positions)  # the last block runs only at the scored positions
    logits = model.logits_from_hidden(hidden).float()
    nll = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
    return torch.where(mask.flatten(), nll, 0.0).sum(dtype=torch.float64)


class Steps:
    """The protocol's two model calls, compiled or plain; shapes already warmed up are remembered.

    Compiled, every scoring batch is padded to ``batch_seqs`` rows (``static_shapes``), so one graph serves
    every batch. Training batches whose shape was warmed up (``warm_up``) run static graphs; any other
    batch size runs one graph with a dynamic batch dimension, so a new chunk size never compiles. Run 5
    (bench/RESULTS.md) measured the dynamic graph 14-22% slower than static ones.

    With ``cuda_graphs`` (the default) the static training graphs are replayed as CUDA graphs (Inductor's
    ``reduce-overhead`` mode): one launch instead of ~1,000 kernel launches a step. A gang's ranks train
    small shares of each batch, and their steps waited on the CPU without it: on two H200s a job's training
    went from no faster than one GPU to 1.70-1.73x (bench/RESULTS.md, runs 7, 9 and 12). No effect off CUDA.
    """

    def __init__(self, model: GPT, compiled: bool, static_shapes: bool | None = None, *,
                 cuda_graphs: bool = True) -> None:
        self.compiled = compiled
        self.static_shapes = compiled if static_shapes is None else static_shapes
        self.cuda_graphs = cuda_graphs
        self.warmed: set[tuple[Any, ...]] = set()
        # (sequences, seq_len, ids of the adapted parameters) of the training batches with static graphs.
        self.static_batches: set[tuple[int, int, tuple[int, ...]]] = set()

        def score(x: Tensor, positions: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
            return score_batch(model, x, positions, targets, mask)

        def any_batch_loss(x: Tensor, y: Tensor) -> Tensor:
            # A frame of its own, so its dynamic graph is cached apart from model.loss's static ones.
            return model.loss(x, y)

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
                        # again (run_protocol drops the gradients first), so this replay may reuse their memory.
                        torch.compiler.cudagraph_mark_step_begin()
                    return static_loss(x, y)
                # A batch of one sequence is specialised (and warmed up) separately even here.
                torch._dynamo.maybe_mark_dynamic(x, 0)
                torch._dynamo.maybe_mark_dynamic(y, 0)
                return dynamic_loss(x, y)

            self.loss = loss
        else:
            self.score = score
            self.loss = lambda x, y, adapted: model.loss(x, y)


class _Batches:
    """Builds batches on the device from the plan by index arithmetic and one gather each."""

    def __init__(self, plan: Plan, stream: Tensor) -> None:
        device = stream.device
        self.plan, self.stream = plan, stream
        self.starts = torch.from_numpy(plan.starts).to(device)
        self.ends = torch.from_numpy(plan.ends).to(device)
        self.score_from = torch.from_numpy(plan.score_from).to(device)
        self.offsets = torch.arange(plan.seq_len, device=device)

    def scored_positions(self, lo: int, hi: int) -> int:
        """Positions per window the batch gathers: ``stride`` unless a window scores more (window 0)."""
        longest = int((self.plan.ends[lo:hi] - self.plan.score_from[lo:hi]).max())
        return self.plan.stride if longest <= self.plan.stride else self.plan.seq_len

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


def _score(steps: Steps, batches: _Batches, lo: int, hi: int, rows: int, precision: str) -> tuple[Tensor, Tensor]:
    """Summed loss and mask of windows ``lo .. hi-1`` in a batch of ``rows`` rows (gradients off)."""
    x, positions, targets, mask = batches.score(lo, hi, rows, batches.scored_positions(lo, hi))
    with autocast(precision, x.device):
        return steps.score(x, positions, targets, mask), mask


def _loss(steps: Steps, batches: _Batches, first: int, count: int, precision: str,
          adapted: tuple[int, ...]) -> Tensor:
    """Mean training loss of ``count`` consecutive sequences from ``first``; ``adapted``: the ids of the
    parameters being trained (a compiled graph is specific to them)."""
    x, y = batches.train(first, count)
    with autocast(precision, x.device):
        return steps.loss(x, y, adapted)


def warm_up(model: GPT, steps: Steps, config: EvalConfig, world: World | None = None, *,
            static_training: bool = True) -> None:
    """Run every batch shape an evaluation with ``config`` (resolved) uses, through its own batch builders,
    so it never compiles. Each shape runs twice: a guard the first call leaves behind (a cache filled on
    the way) fails on the second, which compiles the graph that real calls then reuse. Training batch
    sizes get static graphs with ``static_training`` (an explicit warm-up); otherwise the dynamic-batch
    graph takes them and nothing new compiles. Weights unchanged."""
    world = world or World.current()
    device = next(model.parameters()).device
    (length, precision), rows = resolved_shape(config), config.batch_seqs
    total = length * (rows + 1)  # enough windows for a batch with window 0 and a full batch without it
    plan = plan_windows(total, length, config.stride, config.chunk_tokens, np.zeros(total, dtype=np.int64))
    batches = _Batches(plan, torch.zeros(total + 1, dtype=torch.long, device=device))
    params = adapted_params(model, config)
    model.requires_grad_(False)
    model.cache_rotary(length, device)
    with torch.no_grad():
        for lo in (0, 1):
            hi = min(lo + rows, plan.num_windows)
            shape = ("score", rows, length, batches.scored_positions(lo, hi))
            if shape not in steps.warmed:
                for _ in range(2):
                    _score(steps, batches, lo, hi, rows if steps.static_shapes else hi - lo, precision)
                steps.warmed.add(shape)
    chunk_seqs = config.chunk_tokens // length if config.ttt_epochs > 0 else 0
    shares = (share(count, world.rank, world.size) for count in {min(rows, chunk_seqs), chunk_seqs % rows} - {0})
    counts = {b - a for a, b in shares} - {0}
    adapted = tuple(id(p) for p in params)

    def train_twice(count: int) -> None:
        with training(model, params):
            for _ in range(2):
                _loss(steps, batches, 0, count, precision, adapted).backward()
                for p in params:  # as run_protocol does before each step (a CUDA graph's replay reuses them)
                    p.grad = None

    if counts and ("train-any", length, adapted) not in steps.warmed:
        # The dynamic-batch graph, at a size no static graph takes: it serves chunk sizes no warm-up saw.
        train_twice(max(2, max(counts) + 1))
        steps.warmed.add(("train-any", length, adapted))
    for count in counts:
        train_shape = (count, length, adapted)
        if train_shape in steps.static_batches or not (static_training or count == 1):
            continue  # the dynamic graph takes it as it is (a batch of one is always specialised)
        steps.static_batches.add(train_shape)  # first, so that these calls compile the static graph
        train_twice(count)


def run_protocol(
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
    ``config``: resolved. Sliding-window evaluation is ``ttt_epochs=0``. One unit per chunk that has windows (for
    a sliding-window evaluation too: the chunk plan is there all the same), first_token its first scored target."""
    length, precision = resolved_shape(config)
    world = world or World.current()
    steps = steps or Steps(model, compiled=False)
    device = next(model.parameters()).device
    stride, batch_seqs, epochs = config.stride, config.batch_seqs, config.ttt_epochs
    total = len(tokens) - 1
    plan = plan_windows(total, length, stride, config.chunk_tokens, tables.target_bytes(tokens))
    if plan.num_windows == 0:
        raise EvalError(
            f"max_tokens={config.max_tokens}: {total} targets leave no window; more than "
            f"seq_len - stride = {length - stride} targets are needed"
        )
    stream = torch.from_numpy(np.asarray(tokens, dtype=np.int64)).to(device)
    batches = _Batches(plan, stream)
    params = adapted_params(model, config)
    adapted = tuple(id(p) for p in params)
    optimizer = make_optimizer(config, params) if params else None
    model.eval().requires_grad_(False)
    model.cache_rotary(length, device)
    log = ComplianceLog()
    units = UnitLog("chunk")
    chunks: list[ChunkTrace] = []
    loss_sum, scored, scored_bytes = 0.0, 0, 0
    scoring_s = training_s = 0.0
    started = time.perf_counter()

    def report(phase: str, chunk: int, extra_tokens: int) -> None:
        if cancel is not None and cancel.is_set():
            raise EvalCancelled(f"cancelled in chunk {chunk + 1} of {plan.num_chunks} ({phase})")
        if progress is not None:
            loss = loss_sum / scored if scored else None
            progress(Progress(phase, chunk, len(chunks), plan.num_chunks, scored + extra_tokens, total, loss,
                              bits_per_byte(loss_sum, scored, scored_bytes), time.perf_counter() - started))

    for c in range(plan.num_chunks):
        w0, w1 = plan.chunk_windows(c)
        if w0 == w1:
            continue  # a chunk with no windows is neither scored nor trained on
        lo, hi = (w0 + i for i in share(w1 - w0, world.rank, world.size))

        # 1. Score the chunk's windows with the current weights, before any update that could see them.
        t0 = time.perf_counter()
        chunk_loss = torch.zeros((), dtype=torch.float64, device=device)
        observed = torch.zeros((), dtype=torch.int64, device=device)
        with torch.no_grad():
            for b in range(lo, hi, batch_seqs):
                report("scoring", c, plan.scored_tokens(lo, b))
                e = min(b + batch_seqs, hi)
                loss, mask = _score(steps, batches, b, e, batch_seqs if steps.static_shapes else e - b, precision)
                chunk_loss += loss
                observed += mask.sum()
        local = [plan.scored_tokens(lo, hi), int(plan.window_bytes[lo:hi].sum())]
        sums = torch.cat((torch.stack((chunk_loss, observed.double())),
                          torch.tensor(local, dtype=torch.float64, device=device)))
        observed_here = int(observed)
        log.score(c, merged_spans(plan.score_from[lo:hi] + 1, plan.ends[lo:hi] + 1), observed_here)
        chunk_loss_sum, _, chunk_tokens, chunk_bytes = world.all_reduce_sum(sums).tolist()
        loss_sum += chunk_loss_sum
        scored += int(chunk_tokens)
        scored_bytes += int(chunk_bytes)
        units.add(c, int(plan.score_from[w0]) + 1, int(chunk_tokens), int(chunk_bytes), chunk_loss_sum)
        t1 = time.perf_counter()

        # 2. Train on the chunk's whole sequences, unless it is the last chunk.
        lr, epoch_losses = None, []
        starts = plan.training_starts(c)
        if optimizer is not None and c < plan.num_chunks - 1 and len(starts):
            lr = config.lr_at(c, plan.num_chunks)
            for group in optimizer.param_groups:
                group["lr"] = lr
            epoch_sums = torch.zeros(epochs, dtype=torch.float32, device=device)  # read once, after the epochs
            with training(model, params):
                for epoch in range(epochs):
                    for j in range(0, len(starts), batch_seqs):
                        report("training", c, 0)
                        count = min(batch_seqs, len(starts) - j)
                        a, b = share(count, world.rank, world.size)
                        optimizer.zero_grad(set_to_none=True)
                        batch_loss = torch.zeros((), dtype=torch.float32, device=device)
                        if b > a:
                            loss = _loss(steps, batches, int(starts[j + a]), b - a, precision, adapted)
                            # This rank's share of the batch's mean: the sum over ranks is the mean over the batch.
                            weighted = loss if b - a == count else loss * ((b - a) / count)
                            weighted.backward()
                            batch_loss = weighted.detach().float()
                            if epoch == 0:
                                log.train(c, [(int(starts[j + a]), int(starts[j + b - 1]) + length + 1)])
                        batch_loss = world.all_reduce_grads(params, batch_loss)
                        torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
                        optimizer.step()
                        epoch_sums[epoch] += batch_loss
            epoch_losses = [v / -(-len(starts) // batch_seqs) for v in epoch_sums.tolist()]
        t2 = time.perf_counter()
        scoring_s += t1 - t0
        training_s += t2 - t1
        chunks.append(ChunkTrace(
            index=c, windows=w1 - w0, scored_tokens=int(chunk_tokens), scored_bytes=int(chunk_bytes),
            running_loss=loss_sum / scored, running_bpb=bits_per_byte(loss_sum, scored, scored_bytes), lr=lr,
            train_loss=epoch_losses, scoring_s=t1 - t0, training_s=t2 - t1,
        ))

    merged = ComplianceLog.merge(world.all_gather(log)) if world.distributed else log
    for p in params:
        p.grad = None
    return ProtocolRun(loss_sum, scored, scored_bytes, chunks, check_compliance(merged, total), scoring_s, training_s,
                       units.sums())  # every rank holds every chunk's all-reduced sums


# ---- the session: pristine weights, working models, results ----------------------------------------


@dataclass
class EvalResult:
    val_loss: float
    val_bpb: float
    loss_sum: float
    tokens_scored: int
    bytes_scored: int
    config: dict[str, Any]  # the resolved EvalConfig: what actually ran
    model_config: dict[str, Any]
    identity: dict[str, Any]  # checkpoint and tokenizer sha256, val fingerprint and files, engine version
    chunks: list[ChunkTrace]
    timings: dict[str, float]  # seconds: load (the session's), data, warmup, scoring, training, eval, total
    tokens_per_second: float  # scored tokens over the evaluation loop's wall time (eval_s)
    peak_gpu_memory_bytes: int | None
    device: str
    world_size: int
    compliance: dict[str, Any]
    # What each unit (a chunk, or a document for doc_masked and phased) scored, in stream order; to_dict gives
    # only its kind, count and identity (the arrays are binary: UnitSums.save writes them beside the JSON).
    units: UnitSums
    # The full val set on 8 GPUs: {"pgttt": this engine's speed, "reference": the record's script on 8xH100
    # (decides fits_budget)}; projected_8gpu_s is pgttt's seconds, reference_8xh100_s the reference's.
    projection: dict[str, Any]
    projected_8gpu_s: float
    reference_8xh100_s: float | None = None
    trained_chunks: int = 0  # chunks trained on after scoring (never the last; 0 with ttt_epochs=0)
    warnings: list[str] = field(default_factory=list)  # e.g. a TTT run that trained on nothing
    # The phased protocol: counts, the phase schedule, the per-batch trace (chunks stays empty).
    protocol: str = "chunked"
    counts: dict[str, int] | None = None
    schedule: dict[str, Any] | None = None
    batches: list[Any] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self, dict_factory=lambda items: {k: v for k, v in items if k != "units"})
        out["units"] = {"kind": self.units.kind, "count": len(self.units), "identity": self.units.identity()}
        return out

    def summary(self) -> str:
        cfg = self.config
        c = self.compliance
        if cfg["protocol"] == "doc_masked":
            mode = f"doc_masked seq_len {cfg['seq_len']} batches of {c['batch_seqs']}"
            check = f"{c['unscored_targets']} of {c['targets']} targets never scored (the records' truncation)"
        else:
            mode = "sliding" if cfg["ttt_epochs"] == 0 else f"ttt {cfg['ttt_epochs']}ep/{cfg['chunk_tokens']}"
            mode += f" seq_len {cfg['seq_len']} stride {cfg['stride']}"
            if cfg["protocol"] == "phased":
                mode = (f"phased {cfg['phased_ttt_num_phases']}x{cfg['phased_ttt_prefix_docs']} docs, LoRA r"
                        f"{cfg['ttt_lora_rank']} chunk {cfg['ttt_chunk_size']} ({cfg['record_defaults']} defaults)")
            ok = c["scored_exactly_once"] and c["score_before_update"]
            check = f"compliance {'ok' if ok else 'VIOLATED'}"
        return (
            f"val_loss {self.val_loss:.8f} val_bpb {self.val_bpb:.8f} | {mode} | {self.tokens_scored} tokens "
            f"{self.bytes_scored} bytes ({self.identity['bytes_from']}) | "
            f"{self.timings['eval_s']:.1f}s {self.tokens_per_second:.0f} tok/s | {self.device} x{self.world_size} "
            f"{cfg['precision']} | {check} | full val: pgttt on 8 such devices "
            f"~{self.projected_8gpu_s:.0f}s, reference on 8xH100 ~{self.reference_8xh100_s or math.nan:.0f}s "
            f"({'fits' if self.projection['fits_budget'] else 'over'} the 600 s budget)"
        )


@dataclass
class _Worker:
    """A working model on one device in one precision, its pristine weights there, and its steps."""

    model: GPT
    pristine: dict[str, Tensor]
    cuda_graphs: bool = True
    lock: threading.Lock = field(default_factory=threading.Lock)
    steps: dict[bool, Steps] = field(default_factory=dict)
    phased_steps: dict[bool, PhasedStep] = field(default_factory=dict)  # by cuda_graphs

    def reset(self) -> None:
        """Copy the pristine weights in place: no re-allocation, so compiled graphs stay valid."""
        with torch.no_grad():
            for name, p in self.model.named_parameters():
                p.copy_(self.pristine[name])
                p.grad = None

    def steps_for(self, compiled: bool) -> Steps:
        if compiled not in self.steps:
            self.steps[compiled] = Steps(self.model, compiled, cuda_graphs=self.cuda_graphs)
        return self.steps[compiled]

    def phased_step(self, cuda_graphs: bool) -> PhasedStep:
        if cuda_graphs not in self.phased_steps:
            self.phased_steps[cuda_graphs] = PhasedStep(cuda_graphs=cuda_graphs)
        return self.phased_steps[cuda_graphs]


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class EvalSession:
    """A checkpoint loaded once: its pristine float32 weights and a working model per (device, precision).

    Every evaluation starts from the pristine weights, so none changes the next one's starting point.
    Evaluations on one working model are serialised by its lock; use separate devices to run in parallel.
    ``cuda_graphs``: replay compiled static training graphs as CUDA graphs (on by default; see ``Steps``).
    """

    def __init__(
        self,
        model: GPT,
        *,
        checkpoint_sha256: str | None = None,
        tokenizer_sha256: str | None = None,
        tokenizer_name: str | None = None,
        source: str | None = None,
        load_s: float = 0.0,
        cuda_graphs: bool = True,
        preset: str | None = None,
    ) -> None:
        self.template = copy.deepcopy(model).cpu().float().eval().requires_grad_(False)
        self.cuda_graphs = cuda_graphs
        self.checkpoint_sha256 = checkpoint_sha256
        self.tokenizer_sha256 = tokenizer_sha256  # what the checkpoint was trained with, when it says
        self.tokenizer_name = tokenizer_name
        self.source = source
        self.load_s = load_s
        self.preset = preset  # the architecture preset it was made as, when known: its record's TTT defaults
        self._workers: dict[tuple[str, str], _Worker] = {}
        self._lock = threading.Lock()
        # The phased protocol's compiled step replayed as CUDA graphs: off until measured (bench/bench_speed.py).
        self.phased_cuda_graphs = False

    @classmethod
    def from_checkpoint(cls, ckpt: Any, *, load_s: float = 0.0, cuda_graphs: bool = True) -> EvalSession:
        """From a ``LoadedCheckpoint`` (``pgttt.checkpoints.loading``)."""
        from pgttt.checkpoints.loading import build_model

        model = build_model(ckpt, precision="fp32", device="cpu")
        tokenizer = ckpt.tokenizer
        return cls(model, checkpoint_sha256=ckpt.sha256, source=str(ckpt.path), load_s=load_s,
                   tokenizer_sha256=None if tokenizer is None else tokenizer.sha256,
                   tokenizer_name=None if tokenizer is None else tokenizer.name, cuda_graphs=cuda_graphs,
                   preset=ckpt.provenance.get("preset"))

    @classmethod
    def load(cls, path: str | Path, *, preset: str | None = None, overrides: Any = None,
             tokenizer: str | Path | None = None, cuda_graphs: bool = True) -> EvalSession:
        from pgttt.checkpoints.loading import load_checkpoint

        t0 = time.perf_counter()
        ckpt = load_checkpoint(path, preset=preset, overrides=overrides, tokenizer=tokenizer)
        session = cls.from_checkpoint(ckpt, cuda_graphs=cuda_graphs)
        session.load_s = time.perf_counter() - t0
        return session

    @property
    def config(self) -> ModelConfig:
        return self.template.config

    def worker(self, device: torch.device, precision: str) -> _Worker:
        key = (str(device), precision)
        with self._lock:
            if key not in self._workers:
                model = apply_precision(copy.deepcopy(self.template).to(device), precision).eval()
                pristine = {n: p.detach().to(device) for n, p in self.template.named_parameters()}
                self._workers[key] = _Worker(model, pristine, self.cuda_graphs)
            return self._workers[key]

    def warmup(self, config: EvalConfig | None = None, *, device: str | torch.device | None = None,
               seq_lens: list[int | None] | None = None, world_sizes: Iterable[int] = (1,)) -> float:
        """Compile every batch shape of ``config`` (at each of ``seq_lens``), so no evaluation compiles;
        training batches get static graphs at the shares of every rank of each of ``world_sizes`` (jobs
        this device may run with others). Returns the seconds spent; nothing happens when compilation is
        off (the default on CPUs)."""
        device = torch.device(device) if device is not None else default_device()
        config = config or EvalConfig()
        t0 = time.perf_counter()
        for seq_len in seq_lens or [config.seq_len]:  # None: the checkpoint's train_seq_len
            cfg = replace(config, seq_len=seq_len).resolved(self.config, device)
            worker = self.worker(device, resolved_shape(cfg)[1])
            with worker.lock:
                for size in world_sizes:
                    for rank in range(size):
                        self._warm(worker, cfg, static_training=True, world=World(rank, size))
        return time.perf_counter() - t0

    def _warm(self, worker: _Worker, cfg: EvalConfig, *, static_training: bool = False,
              world: World | None = None, tokens: np.ndarray | None = None) -> None:
        """Compile what ``cfg`` needs and was not compiled yet; in an evaluation (not ``warmup``), a new
        training batch size takes the dynamic-batch graph instead of a compile of its own. The doc_masked pass
        runs eager (graphs made for windows would not serve it); the phased protocol has its own graphs."""
        if cfg.compile and cfg.protocol == "chunked":
            warm_up(worker.model, worker.steps_for(True), cfg, world, static_training=static_training)
        if cfg.compile and cfg.protocol == "phased":  # every batch size of ``tokens``' queue, if given
            step = worker.phased_step(self.phased_cuda_graphs)
            for rows in [cfg.ttt_batch_size] if tokens is None else batch_sizes(tokens, cfg):
                step.warm_up(worker.model, cfg, rows)

    @staticmethod
    def _run(worker: _Worker, tokens: np.ndarray, source: ByteSource, cfg: EvalConfig, world: World,
             progress: ProgressFn | None, cancel: CancelEvent | None) -> ProtocolRun:
        """The protocol ``cfg.protocol`` on the worker's (reset) model: one function per protocol."""
        if cfg.protocol == "doc_masked":
            from .doc_masked import run_doc_masked  # it imports this module's result types

            return run_doc_masked(worker.model, tokens, source, cfg, world=world, progress=progress, cancel=cancel)
        steps = worker.steps_for(bool(cfg.compile))
        return run_protocol(worker.model, tokens, source, cfg, steps=steps, world=world, progress=progress,
                            cancel=cancel)

    def evaluate(
        self,
        val: Any,
        tokenizer: str | Path | ByteTables,
        config: EvalConfig | None = None,
        *,
        device: str | torch.device | None = None,
        progress: ProgressFn | None = None,
        cancel: CancelEvent | None = None,
    ) -> EvalResult:
        """One evaluation. ``val``: a ``ValSet`` or what ``load_val`` takes (a directory, glob or file); the
        bytes of targets come from its sidecar when it has one (CaseOps), else from ``tokenizer``'s tables."""
        t_start = time.perf_counter()
        device = torch.device(device) if device is not None else default_device()
        cfg = (config or EvalConfig()).resolved(self.config, device, preset=self.preset)
        vocab = self.config.vocab_size
        valset = val if isinstance(val, ValSet) else load_val(val, vocab)
        valset.check_vocab(vocab)
        tables = tokenizer if isinstance(tokenizer, ByteTables) else load_byte_tables(tokenizer, vocab)
        source = byte_source(valset, tables, vocab, self.tokenizer_sha256, self.tokenizer_name)
        seq_len, precision = resolved_shape(cfg)
        tokens = valset.trimmed(seq_len, cfg.max_tokens)
        world = World.current()
        data_s = time.perf_counter() - t_start

        worker = self.worker(device, precision)
        with worker.lock:
            t0 = time.perf_counter()
            self._warm(worker, cfg, tokens=tokens)
            warmup_s = time.perf_counter() - t0
            worker.reset()
            torch.manual_seed(cfg.seed)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            t0 = time.perf_counter()
            phased = None
            if cfg.protocol == "phased":
                step = worker.phased_step(self.phased_cuda_graphs) if cfg.compile else None
                phased = run_phased(worker.model, tokens, source.target_bytes(tokens), cfg, world=world,
                                    progress=None if progress is None else _phased_progress(progress), cancel=cancel,
                                    chunk_step=step)
                run = ProtocolRun(phased.loss_sum, phased.tokens, phased.bytes, [], phased.compliance,
                                  phased.timings["scoring_s"], phased.timings["training_s"], phased.units)
            else:
                run = self._run(worker, tokens, source, cfg, world, progress, cancel)
            eval_s = time.perf_counter() - t0
            peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        tokens_per_second = run.tokens / eval_s if eval_s > 0 else 0.0
        projection = project_full_eval(tokens_per_second, world.size, cfg.to_dict(),
                                       dataset_family_hint(valset), self.config.to_dict())
        trained = sum(1 for c in run.chunks if c.lr is not None)
        warnings = [] if cfg.protocol != "chunked" or cfg.ttt_epochs == 0 or trained else [
            f"ttt_epochs={cfg.ttt_epochs} trained on nothing: of {len(run.chunks)} chunk(s) of chunk_tokens="
            f"{cfg.chunk_tokens}, none was trained on (the last chunk never is, nor one without a whole "
            f"seq_len={cfg.seq_len} sequence), so val_bpb is ttt_epochs=0's; score more tokens than chunk_tokens"
        ]
        return EvalResult(
            val_loss=run.val_loss,
            val_bpb=run.val_bpb,
            loss_sum=run.loss_sum,
            tokens_scored=run.tokens,
            bytes_scored=run.bytes,
            config=cfg.to_dict(),
            model_config=self.config.to_dict(),
            identity={
                "checkpoint_sha256": self.checkpoint_sha256,
                "checkpoint": self.source,
                "tokenizer_sha256": tables.tokenizer_sha256,
                "val_fingerprint": valset.fingerprint,
                "val_files": [str(f) for f in valset.files],
                "val_byte_files": [str(f) for f in valset.sidecar_files],
                "bytes_from": source.kind,  # "sidecar" (CaseOps, frontier spec 5.4) or "tokenizer"
                "engine_version": ENGINE_VERSION,
            },
            chunks=run.chunks,
            timings={
                "load_s": self.load_s,
                "data_s": data_s,
                "warmup_s": warmup_s,
                "scoring_s": run.scoring_s,
                "training_s": run.training_s,
                **({"global_sgd_s": phased.timings["global_sgd_s"]} if phased else {}),
                "eval_s": eval_s,
                "total_s": time.perf_counter() - t_start,
            },
            tokens_per_second=tokens_per_second,
            peak_gpu_memory_bytes=peak,
            device=str(device),
            world_size=world.size,
            compliance=run.compliance,
            units=run.units,
            projection=projection,
            projected_8gpu_s=projection["pgttt"]["seconds"],
            reference_8xh100_s=(projection["reference"] or {}).get("seconds"),
            trained_chunks=trained,
            warnings=warnings,
            protocol=cfg.protocol,
            counts=phased.counts if phased else None,
            schedule=phased.schedule if phased else None,
            batches=phased.batches if phased else [],
        )


def _phased_progress(progress: ProgressFn) -> Callable[[PhasedProgress], None]:
    """The phased loop's progress as ``Progress``: documents for chunks, and its own fields."""
    def forward(p: PhasedProgress) -> None:
        progress(Progress(p.stage, p.docs_done, p.docs_done, p.docs_total, p.tokens_scored, p.tokens_total, None,
                          None, p.elapsed_s, p.docs_done, p.docs_total, p.phases_done, p.num_phases, p.eta_s))
    return forward
