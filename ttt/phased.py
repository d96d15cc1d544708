"""The phased protocol (frontier spec 2): per-document LoRA TTT, with phases of global SGD on scored documents.

``run_phased`` runs it on a model in place. Documents are batched by length and the queue runs from the
longest; each batch's documents are scored chunk by chunk, each chunk in one window inside its document,
and after each chunk one LoRA step (per ``ttt_grad_steps``) trains on that chunk. At the canonical pauses
(``schedule``) the base weights take a phase of global SGD on the selected scored documents. The schedule,
the packing and the adapters' A follow ``emulate_ranks`` emulated ranks, so the numbers do not depend on
how many real ranks share the work (real rank r takes the batches of emulated ranks v = r mod size).
``PHASED`` is the protocol as ``EvalSession`` runs it, with the compiled chunk step of ``phased_compiled``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from pgttt.api.units import UnitSums
from pgttt.checkpoints.model import GPT

from .compliance import ComplianceLog, check_compliance, verdict
from .config import EvalConfig
from .data import ByteSource
from .distributed import World
from .documents import Batch, Doc, find_documents, make_queue, num_chunks, select_documents
from .errors import EvalCancelled, EvalError
from .global_sgd import global_sgd
from .lanes import DrawAhead, Lane, plan
from .lora import shapes_for
from .phased_batch import BatchTrace, score_batch
from .phased_compiled import PhasedStep, batch_sizes
from .protocol import CancelEvent, Compiled, Progress, ProgressFn, ProtocolRun
from .schedule import pause_points, phase_boundaries, segments, selected_documents, virtual_rank
from .units import UnitLog


@dataclass(frozen=True)
class PhasedProgress:
    stage: str  # "scoring" or "global_sgd"
    docs_done: int
    docs_total: int
    phases_done: int
    num_phases: int
    tokens_scored: int  # this rank's
    tokens_total: int
    elapsed_s: float
    eta_s: float | None  # from the work done so far, in forward columns (long documents cost more per token)


@dataclass
class PhasedRun:
    loss_sum: float
    tokens: int
    bytes: int
    counts: dict[str, int]
    schedule: dict[str, Any]
    batches: list[BatchTrace]
    compliance: dict[str, Any]
    units: UnitSums  # one per scored document, in stream order, every rank's
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def val_loss(self) -> float:
        return self.loss_sum / self.tokens

    @property
    def val_bpb(self) -> float:
        if self.bytes <= 0:
            raise EvalError(f"the {self.tokens} scored tokens stand for 0 bytes: bits per byte is undefined")
        return self.loss_sum / (math.log(2.0) * self.bytes)


def run_phased(
    model: GPT,
    tokens: np.ndarray,
    target_bytes: np.ndarray,
    config: EvalConfig,
    *,
    world: World | None = None,
    progress: Callable[[PhasedProgress], None] | None = None,
    cancel: Any = None,
    chunk_step: Any = None,
) -> PhasedRun:
    """Spec 2 on ``model`` in place. ``tokens``: the cut val stream; ``target_bytes[i]``: bytes of target i
    (stream position i + 1); ``config``: resolved (``EvalConfig.resolved``); ``chunk_step``: see ``score_batch``."""
    world = world or World.current()
    device = next(model.parameters()).device
    precision = config.precision
    if precision is None or config.seq_len is None or config.ttt_lora_rank is None:
        raise ValueError("run_phased needs a resolved EvalConfig (EvalConfig.resolved)")
    # Resolved, every record knob is set (from the record's row, which has them all).
    assert config.val_doc_fraction is not None and config.ttt_batch_size is not None
    assert config.phased_ttt_prefix_docs is not None and config.phased_ttt_num_phases is not None
    assert config.ttt_k_lora is not None and config.ttt_mlp_lora is not None and config.ttt_o_lora is not None
    assert config.ttt_chunk_size is not None and config.ttt_eval_seq_len is not None
    if len(target_bytes) != len(tokens) - 1:
        raise EvalError(f"{len(target_bytes)} target byte counts for a stream of {len(tokens)} tokens")
    t_start = time.perf_counter()
    docs = select_documents(
        find_documents(tokens), max_docs=config.max_docs, fraction=config.val_doc_fraction, seed=config.seed
    )
    queue = make_queue(docs, config.ttt_batch_size)
    bounds = phase_boundaries(len(docs), config.phased_ttt_prefix_docs, config.phased_ttt_num_phases)
    pauses = pause_points([len(b.docs) for b in queue], bounds, config.emulate_ranks)
    shapes = shapes_for(model, config.ttt_lora_rank, k=config.ttt_k_lora, mlp=config.ttt_mlp_lora, o=config.ttt_o_lora)
    lanes = {v: Lane(config.seed) for v in range(config.emulate_ranks) if v % world.size == world.rank}
    stream = torch.from_numpy(np.asarray(tokens, dtype=np.int64)).to(device)
    nbytes = torch.from_numpy(np.asarray(target_bytes, dtype=np.int64)).to(device)
    cost = [
        sum(
            len(b.docs) * min((c + 1) * config.ttt_chunk_size, config.ttt_eval_seq_len)
            for c in range(max(num_chunks(d, config.ttt_chunk_size) for d in b.docs))
        )
        for b in queue
    ]
    my_cost = sum(c for q, c in enumerate(cost) if virtual_rank(q, pauses, config.emulate_ranks) in lanes)
    model.eval().requires_grad_(False)
    log, units, traces = ComplianceLog(), UnitLog("document"), []
    phases: list[dict[str, Any]] = []
    done_cost = docs_done = scored = 0
    step = 2 * max(num_chunks(d, config.ttt_chunk_size) for d in docs) + 2  # ledger order: batch, chunk, kind
    scoring_s = training_s = global_s = 0.0

    sizes = [len(b.docs) for b in queue]
    work = plan(sizes, pauses, list(lanes), config.emulate_ranks)
    ahead = DrawAhead(lanes, work, shapes, config, pin=device.type == "cuda")

    def report(stage: str) -> None:
        if cancel is not None and cancel.is_set():
            raise EvalCancelled(f"cancelled after {docs_done} of {len(docs)} documents ({stage})")
        if progress is not None:
            elapsed = time.perf_counter() - t_start
            eta = elapsed * (my_cost - done_cost) / done_cost if done_cost else None
            progress(
                PhasedProgress(
                    stage,
                    docs_done,
                    len(docs),
                    len(phases),
                    len(pauses),
                    scored,
                    int(sum(d.targets for d in docs)),
                    elapsed,
                    eta,
                )
            )

    with ahead:  # its thread stops however the loop ends
        for seg, (first, last) in enumerate(segments(len(queue), pauses)):
            for q in range(first, last):
                v = virtual_rank(q, pauses, config.emulate_ranks)
                docs_done += len(queue[q].docs)
                if v not in lanes:
                    continue  # another real rank's batch
                report("scoring")
                adapters = lanes[v].adapters(ahead.next(), shapes, config, device)
                trace = score_batch(
                    model, queue[q], adapters, stream, nbytes, config, log, units, order=q * step, chunk_step=chunk_step
                )
                trace.queue_index, trace.emulated_rank, trace.phases_done = q, v, seg
                traces.append(trace)
                done_cost += cost[q]
                scored += trace.tokens
                scoring_s, training_s = scoring_s + trace.scoring_s, training_s + trace.training_s
            if seg < len(pauses):  # the pause after this segment: phase seg + 1
                report("global_sgd")
                t0 = time.perf_counter()
                selected = selected_documents(queue, pauses[seg], bounds[seg])
                remaining = pauses[seg] < len(queue)  # weights nobody scores with are not trained
                sgd = (
                    global_sgd(
                        model,
                        tokens,
                        selected,
                        config,
                        world=world,
                        log=log,
                        order=pauses[seg] * step - 1,
                        precision=precision,
                    )
                    if remaining
                    else None
                )
                phases.append(
                    {
                        "phase": seg + 1,
                        "boundary": bounds[seg],
                        "batches_completed": pauses[seg],
                        "docs_completed": sum(len(b.docs) for b in queue[: pauses[seg]]),
                        "docs_selected": len(selected),
                        "trained": remaining,
                        "stream_tokens": sgd.stream_tokens if sgd else None,
                        "global_chunks": sgd.num_chunks if sgd else None,
                        "chunks": sgd.chunks if sgd else [],
                        "seconds": time.perf_counter() - t0,
                    }
                )
                global_s += time.perf_counter() - t0
    return _finish(
        world,
        log,
        units,
        traces,
        docs,
        queue,
        bounds,
        pauses,
        phases,
        config,
        {"scoring_s": scoring_s, "training_s": training_s, "global_sgd_s": global_s},
    )


def _finish(
    world: World,
    log: ComplianceLog,
    units: UnitLog,
    traces: list[BatchTrace],
    docs: list[Doc],
    queue: list[Batch],
    bounds: list[int],
    pauses: list[int],
    phases: list[dict[str, Any]],
    config: EvalConfig,
    timings: dict[str, float],
) -> PhasedRun:
    """Every rank's traces and ledger gathered; running values in queue order; the compliance check."""
    assert config.ttt_chunk_size is not None  # resolved (EvalConfig.resolved)
    if world.distributed:
        traces = [t for part in world.all_gather(traces) for t in part]
        log = ComplianceLog.merge(world.all_gather(log))
    traces.sort(key=lambda t: t.queue_index)
    loss_sum, tokens, nbytes = 0.0, 0, 0
    for t in traces:  # fp64 sums in queue order: the same on every rank and for every world size
        loss_sum, tokens, nbytes = loss_sum + t.loss_sum, tokens + t.tokens, nbytes + t.bytes
        t.running_loss = loss_sum / tokens
        t.running_bpb = loss_sum / (math.log(2.0) * nbytes) if nbytes else None
    expected = [(d.start + 1, d.start + d.length) for d in docs]
    compliance = check_compliance(log, sum(d.targets for d in docs), expected)
    compliance["exempt"] = (
        "each document's own first token, its BOS, is read as context by its windows and "
        "by global SGD without being one of its targets (a constant delimiter: spec 2.13 (a))"
    )
    counts = {
        "documents": len(docs),
        "batches": len(queue),
        "chunks": sum(num_chunks(d, config.ttt_chunk_size) for d in docs),  # scored (document, chunk) pairs
        "chunk_steps": sum(t.chunks for t in traces),  # batched forward passes that scored them
        "tokens": tokens,
        "bytes": nbytes,
    }
    schedule = {
        "emulate_ranks": config.emulate_ranks,
        "boundaries": bounds,
        "pauses": pauses,
        "docs_completed": [p["docs_completed"] for p in phases],
        "phases": phases,
    }
    return PhasedRun(loss_sum, tokens, nbytes, counts, schedule, traces, compliance, units.sums(world), timings)


def trace_dicts(run: PhasedRun) -> list[dict[str, Any]]:
    return [asdict(t) for t in run.batches]


class Phased:
    """The phased protocol as ``EvalSession`` runs it (``protocol.Protocol``)."""

    name = "phased"
    cudnn_attention = False  # the (rows, width) of a chunk step change at every step

    @staticmethod
    def compiled_step(compiled: Compiled) -> PhasedStep:
        cuda_graphs = compiled.phased_cuda_graphs
        return compiled.twin(("phased", cuda_graphs), lambda: PhasedStep(cuda_graphs=cuda_graphs))

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
        """Every batch size of ``tokens``' queue (without them, ``ttt_batch_size``); the step has one graph per
        batch size and no fallback, so ``static_training`` and ``fallback`` change nothing."""
        if config.compile:
            step = self.compiled_step(compiled)
            for rows in [config.ttt_batch_size] if tokens is None else batch_sizes(tokens, config):
                step.warm_up(model, config, rows)

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
        step = self.compiled_step(compiled) if config.compile else None
        run = run_phased(
            model,
            tokens,
            source.target_bytes(tokens),
            config,
            world=world,
            progress=None if progress is None else _progress(progress),
            cancel=cancel,
            chunk_step=step,
        )
        return ProtocolRun(
            run.loss_sum,
            run.tokens,
            run.bytes,
            [],
            run.compliance,
            run.timings["scoring_s"],
            run.timings["training_s"],
            run.units,
            other_timings={"global_sgd_s": run.timings["global_sgd_s"]},
            counts=run.counts,
            schedule=run.schedule,
            batches=run.batches,
        )

    def describe(self, config: dict[str, Any], compliance: dict[str, Any]) -> tuple[str, str]:
        mode = (
            f"phased {config['phased_ttt_num_phases']}x{config['phased_ttt_prefix_docs']} docs, LoRA r"
            f"{config['ttt_lora_rank']} chunk {config['ttt_chunk_size']} ({config['record_defaults']} defaults)"
        )
        return mode, verdict(compliance)

    def warnings(self, config: EvalConfig, run: ProtocolRun) -> list[str]:
        return []


def _progress(progress: ProgressFn) -> Callable[[PhasedProgress], None]:
    """The phased loop's progress as ``Progress``: documents for chunks, and its own fields."""

    def forward(p: PhasedProgress) -> None:
        progress(
            Progress(
                p.stage,
                p.docs_done,
                p.docs_done,
                p.docs_total,
                p.tokens_scored,
                p.tokens_total,
                None,
                None,
                p.elapsed_s,
                p.docs_done,
                p.docs_total,
                p.phases_done,
                p.num_phases,
                p.eta_s,
            )
        )

    return forward


PHASED = Phased()
