"""One batch of the phased protocol (frontier spec 2.5): each document's chunks scored in their windows, a
LoRA step after each chunk; ``run_phased`` (``phased``) runs the queue of batches and the global phases."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from pgttt.checkpoints.model import GPT

from .compliance import ComplianceLog
from .config import EvalConfig
from .documents import Batch, chunk_window, num_chunks
from .lora import AdapterSet, lora_optimizer
from .phased_compiled import per_token_loss
from .units import UnitLog


@dataclass
class BatchTrace:
    queue_index: int
    batch: int  # orig_batch_idx (ascending-length order)
    docs: int
    min_len: int
    max_len: int
    chunks: int
    emulated_rank: int
    phases_done: int  # global phases whose weights scored this batch
    loss_sum: float
    tokens: int
    bytes: int
    running_loss: float = 0.0  # in queue order over every rank's batches, filled at the end
    running_bpb: float | None = None
    scoring_s: float = 0.0
    training_s: float = 0.0


def score_batch(
    model: GPT,
    batch: Batch,
    adapters: AdapterSet,
    stream: Tensor,
    nbytes: Tensor,
    config: EvalConfig,
    log: ComplianceLog,
    units: UnitLog,
    *,
    order: int,
    chunk_step: Any = None,
) -> BatchTrace:
    """Spec 2.5 for one batch: for each chunk step c, score every document's chunk c in its window, then
    one LoRA step (``ttt_grad_steps``) on the chunk's mean loss of the documents that have a later chunk.
    Each document's sums go to ``units`` (keyed by its index in the stream). ``chunk_step``: a twin of
    ``phased_compiled.per_token_loss`` with an ``optimizer`` for ``lora_optimizer`` and a ``first_row``
    (``phased_compiled.PhasedStep``); None: the plain ones.

    A batch's documents are in ascending length, so those it has finished are its first rows: a step runs
    from the first row still scoring (or from the row ``chunk_step.first_row`` says). A finished document's
    row scores nothing and its loss is weighted 0, so its adapters' gradient is exactly 0 either way; the
    optimizer still steps every slot (AdamW's decay and momentum move a finished slot's A, which a
    warm-started set keeps), so the numbers are those of running every row."""
    loss_fn = per_token_loss if chunk_step is None else chunk_step
    device, docs = stream.device, batch.docs
    size, window, bsz = config.ttt_chunk_size, config.ttt_eval_seq_len, len(docs)
    # Resolved (EvalConfig.resolved), every record knob is set.
    assert size is not None and window is not None and config.precision is not None
    assert config.ttt_grad_steps is not None and config.ttt_optimizer is not None and config.ttt_lora_lr is not None
    assert config.ttt_beta1 is not None and config.ttt_beta2 is not None and config.ttt_eps is not None
    assert config.ttt_weight_decay is not None
    chunks = [num_chunks(d, size) for d in docs]
    make_optimizer = lora_optimizer if chunk_step is None else chunk_step.optimizer
    optimizer = make_optimizer(
        adapters.parameters(),
        kind=config.ttt_optimizer,
        lr=config.ttt_lora_lr,
        beta1=config.ttt_beta1,
        beta2=config.ttt_beta2,
        eps=config.ttt_eps,
        weight_decay=config.ttt_weight_decay,
    )
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss, tokens, bytes
    doc_sums = torch.zeros(3, bsz, dtype=torch.float64, device=device)  # the same per document
    scoring_s = training_s = 0.0
    for c in range(max(chunks)):
        t0 = time.perf_counter()
        width = min((c + 1) * size, window)  # the longest window of this step; rows are left-aligned
        offset = c * size - max(0, (c + 1) * size - window)  # a full chunk's first column
        starts, lengths, lo, hi = [], [], [], []
        for d, n in zip(docs, chunks, strict=True):
            w = chunk_window(c, d.targets, size, window) if c < n else None
            starts.append(d.start + w.start if w else 0)
            lengths.append(w.length if w else 0)
            lo.append(w.chunk_offset if w else 0)
            hi.append(w.chunk_offset + w.chunk_length if w else 0)
        trained = [int(c < n - 1) for n in chunks]
        finished = next((i for i, n in enumerate(chunks) if n > c), bsz)  # the first rows, done scoring
        first = finished if chunk_step is None else chunk_step.first_row(model, finished, bsz)
        # One copy to the device, from pinned memory: the host does not wait for the device's earlier work.
        rows = torch.tensor([starts[first:], lengths[first:], lo[first:], hi[first:], trained[first:]])
        rows = rows.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else rows
        cols = torch.arange(width, device=device)
        index = rows[0, :, None] + cols
        valid = cols < rows[1, :, None]
        scored = valid & (cols >= rows[2, :, None])
        scored &= cols < rows[3, :, None]
        x = torch.where(valid, stream[index.clamp(max=len(stream) - 2)], 0)
        y = torch.where(valid, stream[index.clamp(max=len(stream) - 2) + 1], 0)
        # Every row's scored and trained columns lie in the window's last `size` columns (a full chunk's, and a
        # last chunk's within them): the output layer and the last block run there only, the same numbers.
        at = torch.arange(offset, offset + size, device=device)
        positions, y, scored, index = at.expand(bsz - first, size), y[:, at], scored[:, at], index[:, at]
        train, trains, live = rows[4].bool(), any(trained), adapters.rows_from(first)
        with torch.set_grad_enabled(trains):
            per_token = loss_fn(model, x, positions, y, live, config.precision)
        with torch.no_grad():
            mask = scored.double()
            parts = (per_token.double() * mask, mask, nbytes[index.clamp(max=len(nbytes) - 1)].double() * mask)
            sums += torch.stack([part.sum() for part in parts])
            doc_sums[:, first:] += torch.stack([part.sum(dim=1) for part in parts])
        log.score(
            order + 2 * c,
            [
                (d.start + c * size + 1, d.start + c * size + 1 + (h - lw))
                for d, lw, h, n in zip(docs, lo, hi, chunks, strict=True)
                if c < n
            ],
            0,
        )
        t1 = time.perf_counter()
        if trains:
            for g in range(config.ttt_grad_steps):
                if g > 0:
                    per_token = loss_fn(model, x, positions, y, live, config.precision)
                per_doc = per_token.mean(dim=-1)
                optimizer.zero_grad(set_to_none=True)
                (per_doc * train.float()).sum().backward()
                optimizer.step()
            log.train(
                order + 2 * c + 1,
                [
                    (d.start + max(s - d.start, 1), d.start + (c + 1) * size + 1)
                    for d, s, n in zip(docs, starts, chunks, strict=True)
                    if c < n - 1
                ],
            )
        scoring_s += t1 - t0
        training_s += time.perf_counter() - t1
    loss_sum, tokens, nb = sums.tolist()
    log.observed_scored += int(tokens)
    for d, doc_loss, doc_tokens, doc_bytes in zip(docs, *doc_sums.tolist(), strict=True):
        units.add(d.index, d.start + 1, int(doc_tokens), int(doc_bytes), doc_loss)
    return BatchTrace(
        0,
        batch.index,
        bsz,
        min(d.length for d in docs),
        max(d.length for d in docs),
        max(chunks),
        0,
        0,
        loss_sum,
        int(tokens),
        int(nb),
        scoring_s=scoring_s,
        training_s=training_s,
    )
