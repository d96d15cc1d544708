"""The frontier records' diagnostic pass ``eval_val`` (frontier spec 2.12): document-masked, no TTT.

What the records print as ``diagnostic quantized val_bpb`` (and the end-of-training ``val_bpb``). Not a
sliding window: the trimmed stream of T targets is cut into ``q = T // seq_len`` sequences; rank r of W
takes the contiguous sequences ``[q r // W, q (r+1) // W)``. The batching is the modded-nanogpt
family's: ``VAL_BATCH_TOKENS`` is split over W ranks x ``8 // W`` gradient-accumulation steps, so a batch
holds ``B = VAL_BATCH_TOKENS // (W * (8 // W)) // seq_len`` sequences (32 of 2048 tokens at the records'
524,288; 4 at the ``VAL_BATCH_TOKENS=65536`` of the pr1855 compat case), and each rank's share is
**truncated to a multiple of B** (the records' "TODO: Don't truncate this"): the targets of a rank's last
``share mod B`` sequences, and those past ``q * seq_len``, are never scored. The result says which.

Each batch is one packed row of ``B * seq_len`` tokens, scored once: attention is causal within segments
that start at every BOS (and at the row's start) and are cut every ``seq_len`` tokens from a document's
start (``packing.build_cu_seqlens``); RoPE positions are the row's (frontier spec 3.4); SmearGate resets
at BOS only. The bytes of a target come from the val set's byte source: the CaseOps sidecar (as the
records do), or the tokenizer's tables for other data (where the records' ``eval_val`` cannot run).
``DOC_MASKED`` is the pass as ``EvalSession`` runs it: eager always (graphs made for windows would not serve it).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pgttt.checkpoints.model import GPT, autocast

from .config import EvalConfig
from .data import ByteSource
from .distributed import World
from .errors import EvalCancelled, EvalError
from .packing import BOS_ID, row_cu_seqlens
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

GRAD_ACCUM_RANKS = 8  # the records' grad_accum_steps = 8 // world_size
LOGIT_ROWS = 8192  # positions per output-layer slice: bounds the float32 logits of a long packed row


@dataclass(frozen=True)
class DocMaskedPlan:
    """Which sequences each rank scores, in batches of ``batch_seqs`` (sequence ``s`` = targets
    ``[s * seq_len, (s+1) * seq_len)``)."""

    total_targets: int
    seq_len: int
    batch_seqs: int
    world_size: int
    total_seqs: int
    shares: tuple[tuple[int, int], ...]  # per rank: its sequences [start, end) after the truncation

    def batches(self, rank: int) -> list[tuple[int, int]]:
        """Rank ``rank``'s batches as sequence ranges ``[start, end)``, each ``batch_seqs`` long."""
        start, end = self.shares[rank]
        return [(s, s + self.batch_seqs) for s in range(start, end, self.batch_seqs)]

    @property
    def scored_targets(self) -> int:
        return self.seq_len * sum(end - start for start, end in self.shares)

    def unscored_spans(self) -> list[tuple[int, int]]:
        """Stream positions ``[a, b)`` whose predictions are never scored (target ``i`` is position ``i+1``)."""
        gaps, target = [], 0  # the next target not yet accounted for
        for start, end in self.shares:
            if start * self.seq_len > target:  # the previous rank's truncated tail
                gaps.append((target + 1, start * self.seq_len + 1))
            target = end * self.seq_len
        if target < self.total_targets:  # the last rank's tail, and targets past q * seq_len
            gaps.append((target + 1, self.total_targets + 1))
        return gaps


def plan_doc_masked(total_targets: int, seq_len: int, val_batch_tokens: int, world_size: int) -> DocMaskedPlan:
    """The records' ``eval_val`` batching for ``total_targets`` targets on ``world_size`` ranks."""
    if world_size < 1 or GRAD_ACCUM_RANKS % world_size:
        raise EvalError(
            f"world size {world_size}: the records' eval_val splits VAL_BATCH_TOKENS over world_size x "
            f"(8 // world_size) steps, so it runs on 1, 2, 4 or 8 ranks"
        )
    local_tokens = val_batch_tokens // (world_size * (GRAD_ACCUM_RANKS // world_size))
    if local_tokens < seq_len:
        raise EvalError(
            f"val_batch_tokens={val_batch_tokens}: must give every rank at least one sequence: "
            f"{val_batch_tokens} // 8 = {local_tokens} tokens per batch, seq_len={seq_len}"
        )
    batch_seqs = local_tokens // seq_len
    total_seqs = total_targets // seq_len
    shares = []
    for rank in range(world_size):
        start, end = total_seqs * rank // world_size, total_seqs * (rank + 1) // world_size
        shares.append((start, start + (end - start) // batch_seqs * batch_seqs))
    return DocMaskedPlan(total_targets, seq_len, batch_seqs, world_size, total_seqs, tuple(shares))


def score_packed_row(
    model: GPT, x: torch.Tensor, y: torch.Tensor, cu_seqlens: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy (float64) of one packed row ``x`` (n,) against its targets ``y`` (n,), and the
    per-token losses (float64, n)."""
    hidden = model.forward_hidden(x[None], cu_seqlens=cu_seqlens)[0]
    total = torch.zeros((), dtype=torch.float64, device=x.device)
    losses = []
    for a in range(0, len(x), LOGIT_ROWS):
        logits = model.logits_from_hidden(hidden[a : a + LOGIT_ROWS]).float()
        # Per-token losses summed in float64, as the records sum them.
        losses.append(F.cross_entropy(logits, y[a : a + LOGIT_ROWS], reduction="none").double())
        total += losses[-1].sum()
    return total, torch.cat(losses)


def run_doc_masked(
    model: GPT,
    tokens: np.ndarray,
    tables: ByteSource,
    config: EvalConfig,
    *,
    world: World | None = None,
    progress: ProgressFn | None = None,
    cancel: CancelEvent | None = None,
) -> ProtocolRun:
    """The pass on ``model`` (weights unchanged). ``tokens``: the trimmed val stream (T + 1 ids); ``tables``:
    the byte source; ``config``: resolved. One trace entry per batch of this rank; sums over every rank. One unit
    per document (from a BOS to the next; targets before the first BOS are a unit of their own) that has a scored
    target, its first_token the first of them, every rank's parts added up."""
    seq_len, precision = resolved_shape(config)
    world = world or World.current()
    device = next(model.parameters()).device
    total = len(tokens) - 1
    plan = plan_doc_masked(total, seq_len, config.val_batch_tokens, world.size)
    if plan.scored_targets == 0:
        raise EvalError(
            f"{total} targets make {plan.total_seqs} sequences of {seq_len}, fewer than one batch of "
            f"{plan.batch_seqs} per rank (val_batch_tokens={config.val_batch_tokens}): nothing would be scored"
        )
    target_bytes = tables.target_bytes(tokens)
    batches = plan.batches(world.rank)
    doc_starts = np.flatnonzero(np.asarray(tokens[:-1]) == BOS_ID)  # input i predicts target i (position i + 1)
    units = UnitLog("document")
    model.eval().requires_grad_(False)
    loss_sum, scored, scored_bytes = 0.0, 0, 0
    traces: list[ChunkTrace] = []
    started = time.perf_counter()
    with torch.no_grad():
        for index, (first, last) in enumerate(batches):
            if cancel is not None and cancel.is_set():
                raise EvalCancelled(f"cancelled in batch {index + 1} of {len(batches)}")
            if progress is not None:
                progress(
                    Progress(
                        "scoring",
                        index,
                        index,
                        len(batches),
                        scored,
                        total,
                        loss_sum / scored if scored else None,
                        bits_per_byte(loss_sum, scored, scored_bytes),
                        time.perf_counter() - started,
                    )
                )
            t0 = time.perf_counter()
            a, b = first * seq_len, last * seq_len  # inputs tokens[a:b], targets tokens[a+1:b+1]
            row = np.asarray(tokens[a : b + 1], dtype=np.int64)
            cu, _ = row_cu_seqlens(row[:-1], max_doc_len=seq_len)
            stream = torch.from_numpy(row).to(device)
            with autocast(precision, device):
                total_loss, losses = score_packed_row(model, stream[:-1], stream[1:], torch.from_numpy(cu).to(device))
            batch_loss = float(total_loss)
            batch_bytes = int(target_bytes[a:b].sum())
            add_documents(units, doc_starts, a, losses, target_bytes[a:b])
            loss_sum, scored, scored_bytes = loss_sum + batch_loss, scored + (b - a), scored_bytes + batch_bytes
            traces.append(
                ChunkTrace(
                    index=index,
                    windows=last - first,
                    scored_tokens=b - a,
                    scored_bytes=batch_bytes,
                    running_loss=loss_sum / scored,
                    running_bpb=bits_per_byte(loss_sum, scored, scored_bytes),
                    lr=None,
                    train_loss=[],
                    scoring_s=time.perf_counter() - t0,
                    training_s=0.0,
                )
            )
    sums = torch.tensor([loss_sum, scored, scored_bytes], dtype=torch.float64, device=device)
    loss_sum, tokens_scored, bytes_scored = world.all_reduce_sum(sums).tolist()
    scoring_s = time.perf_counter() - started
    return ProtocolRun(
        loss_sum,
        int(tokens_scored),
        int(bytes_scored),
        traces,
        coverage(plan, int(tokens_scored)),
        scoring_s,
        0.0,
        units.sums(world),
    )


def add_documents(
    units: UnitLog, doc_starts: np.ndarray, first: int, losses: torch.Tensor, target_bytes: np.ndarray
) -> None:
    """The targets ``first .. first + len(losses) - 1`` added to ``units`` per document (key: the index of its
    BOS in ``doc_starts``, -1 before the first)."""
    keys = np.searchsorted(doc_starts, np.arange(first, first + len(losses)), side="right") - 1
    keys, offsets, counts = np.unique(keys, return_index=True, return_counts=True)
    which = torch.from_numpy(np.repeat(np.arange(len(keys)), counts)).to(losses.device)
    doc_loss = torch.zeros(len(keys), dtype=torch.float64, device=losses.device).index_add_(0, which, losses)
    doc_bytes = np.add.reduceat(np.asarray(target_bytes, dtype=np.int64), offsets)
    for key, offset, count, nbytes, loss in zip(keys, offsets, counts, doc_bytes, doc_loss.tolist(), strict=True):
        units.add(int(key), first + int(offset) + 1, int(count), int(nbytes), loss)


def coverage(plan: DocMaskedPlan, observed: int) -> dict[str, object]:
    """The pass's counterpart of the TTT compliance record: what was scored, and what never was."""
    unscored = plan.unscored_spans()
    missing = sum(b - a for a, b in unscored)
    ok = observed == plan.scored_targets == plan.total_targets - missing
    violations = (
        []
        if ok
        else [
            f"{observed} tokens scored, {plan.scored_targets} planned, {plan.total_targets - missing} "
            "by the unscored spans"
        ]
    )
    return {
        "protocol": "doc_masked",
        "scored_exactly_once": ok and missing == 0,  # every target once: only when nothing is truncated
        "score_before_update": True,  # no update happens
        "targets": plan.total_targets,
        "scored_tokens": observed,
        "unscored_targets": missing,
        "unscored_spans": [list(span) for span in unscored],
        "batch_seqs": plan.batch_seqs,
        "batches": sum(len(plan.batches(r)) for r in range(plan.world_size)),
        "sequences": plan.total_seqs,
        "train_spans": 0,
        "trained_positions": 0,
        "note": "the records' eval_val truncates each rank's share to whole batches (frontier spec 2.12): "
        "the unscored spans' predictions are never scored, and which they are depends on the world size",
        "violations": violations,
        "violation_count": len(violations),
    }


class DocMasked:
    """The document-masked pass as ``EvalSession`` runs it (``protocol.Protocol``): nothing to compile or train."""

    name = "doc_masked"
    cudnn_attention = False  # one attention call per document segment, each of its own length

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
        pass

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
        return run_doc_masked(model, tokens, source, config, world=world, progress=progress, cancel=cancel)

    def describe(self, config: dict[str, Any], compliance: dict[str, Any]) -> tuple[str, str]:
        return (
            f"doc_masked seq_len {config['seq_len']} batches of {compliance['batch_seqs']}",
            f"{compliance['unscored_targets']} of {compliance['targets']} targets never scored "
            "(the records' truncation)",
        )

    def warnings(self, config: EvalConfig, run: ProtocolRun) -> list[str]:
        return []


DOC_MASKED = DocMasked()
