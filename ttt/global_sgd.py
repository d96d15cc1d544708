"""One phase's global SGD on all weights over already-scored documents (frontier spec 2.8), per emulated rank.

Stream S (the selected documents' slices, concatenated) is cut into chunks of ``global_ttt_chunk_tokens``
targets; every chunk but the last trains: ``global_ttt_epochs`` passes, each over the chunk's whole
``seq_len`` sequences, which emulated rank v of W takes a share of (``schedule.rank_share``) and packs as
one row with document-masked attention (BOS-split pieces of at most ``seq_len``, spec 3.10). Each step's
gradient is the sum of the W ranks' mean losses over W, clipped, then one SGD step, as the reference's
all-reduce of W ranks gives. Real ranks compute the emulated ranks v = rank mod size and sum gradients.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from pgttt.checkpoints.model import GPT, autocast

from .compliance import ComplianceLog
from .config import EvalConfig
from .distributed import World
from .documents import Doc
from .packing import row_cu_seqlens
from .schedule import global_chunks, rank_share


@dataclass
class PhaseSGD:
    stream_tokens: int
    num_chunks: int  # M (the reference's "tttg: c/M")
    chunks: list[dict] = field(default_factory=list)  # every trained chunk: index, lr, sequences, mean loss


def stream_positions(docs: list[Doc]) -> tuple[np.ndarray, np.ndarray]:
    """S offsets and stream starts of each selected document's slice."""
    lengths = np.array([d.length for d in docs], dtype=np.int64)
    return np.concatenate(([0], np.cumsum(lengths)[:-1])), np.array([d.start for d in docs], dtype=np.int64)


def spans_in_stream(a: int, b: int, offsets: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> list[tuple]:
    """The val-stream positions S[a:b] reads, without each document's own first token (its BOS, a constant
    delimiter that is the previous stream document's target: spec 2.13 (a))."""
    spans = []
    first = int(np.searchsorted(offsets, a, side="right")) - 1
    for i in range(max(first, 0), len(offsets)):
        lo, hi = max(a, int(offsets[i]) + 1), min(b, int(offsets[i] + lengths[i]))
        if int(offsets[i]) >= b:
            break
        if hi > lo:
            spans.append((int(starts[i] + lo - offsets[i]), int(starts[i] + hi - offsets[i])))
    return spans


def global_sgd(
    model: GPT,
    tokens: np.ndarray,
    docs: list[Doc],
    config: EvalConfig,
    *,
    world: World,
    log: ComplianceLog,
    order: int,
    precision: str,
) -> PhaseSGD:
    """Train ``model`` in place on the selected documents ``docs`` (in selection order)."""
    device = next(model.parameters()).device
    length, ranks = config.seq_len, config.emulate_ranks
    # Resolved (EvalConfig.resolved), every record knob is set.
    assert length is not None and config.global_ttt_chunk_tokens is not None and config.global_ttt_lr is not None
    assert config.global_ttt_warmup_chunks is not None and config.global_ttt_warmup_start_lr is not None
    assert config.global_ttt_momentum is not None and config.global_ttt_batch_seqs is not None
    assert config.global_ttt_epochs is not None and config.global_ttt_grad_clip is not None
    stream = (
        np.concatenate([np.asarray(tokens[d.start : d.start + d.length]) for d in docs])
        if docs
        else np.zeros(0, dtype=np.int64)
    )
    offsets, starts = stream_positions(docs) if docs else (np.zeros(0, np.int64), np.zeros(0, np.int64))
    lengths = np.array([d.length for d in docs], dtype=np.int64)
    s = torch.from_numpy(stream.astype(np.int64)).to(device)
    m, chunks = global_chunks(
        len(stream),
        config.global_ttt_chunk_tokens,
        config.global_ttt_lr,
        config.global_ttt_warmup_chunks,
        config.global_ttt_warmup_start_lr,
    )
    result = PhaseSGD(len(stream), m)
    if not config.global_ttt_epochs or not chunks:
        return result
    params = list(model.parameters())
    optimizer = torch.optim.SGD(params, lr=config.global_ttt_lr, momentum=config.global_ttt_momentum)
    mine = [v for v in range(ranks) if v % world.size == world.rank]
    batch = config.global_ttt_batch_seqs
    model.requires_grad_(True)
    model.train()
    try:
        for chunk in chunks:
            count = (chunk.end - chunk.start) // length
            if count <= 0:
                continue
            for group in optimizer.param_groups:
                group["lr"] = chunk.lr
            shares = [rank_share(count, v, ranks) for v in range(ranks)]
            steps = max(-(-(b - a) // batch) for a, b in shares)
            loss_total = torch.zeros((), dtype=torch.float64, device=device)
            for epoch in range(config.global_ttt_epochs):
                for j in range(steps):
                    optimizer.zero_grad(set_to_none=True)
                    step_loss = torch.zeros((), dtype=torch.float32, device=device)
                    for v in mine:
                        a, b = shares[v]
                        lo, hi = a + j * batch, min(a + (j + 1) * batch, b)
                        first, last = chunk.start + lo * length, chunk.start + hi * length + 1
                        if lo >= hi or last > len(stream):
                            continue
                        loss = _loss(model, s[first:last], config, length, precision) / ranks
                        loss.backward()
                        step_loss += loss.detach().float()
                        if epoch == 0:
                            log.train(order, spans_in_stream(first, last, offsets, starts, lengths))
                    step_loss = world.all_reduce_grads(params, step_loss)
                    for p in params:  # a step no emulated rank here had data for still moves by momentum
                        if p.grad is None:
                            p.grad = torch.zeros_like(p)
                    if config.global_ttt_grad_clip > 0:
                        torch.nn.utils.clip_grad_norm_(params, config.global_ttt_grad_clip)
                    optimizer.step()
                    loss_total += step_loss.double()
            result.chunks.append(
                {
                    "index": chunk.index,
                    "lr": chunk.lr,
                    "sequences": count,
                    "loss": float(loss_total) / (steps * config.global_ttt_epochs),
                }
            )
    finally:
        for p in params:
            p.grad = None
        model.requires_grad_(False)
        model.eval()
    return result


def _loss(model: GPT, piece: Tensor, config: EvalConfig, length: int, precision: str) -> Tensor:
    """Mean cross-entropy of one emulated rank's slice (inputs piece[:-1], targets piece[1:])."""
    x, y = piece[:-1], piece[1:]
    with autocast(precision, x.device):
        if config.global_ttt_respect_doc_boundaries:
            cu, _ = row_cu_seqlens(x.cpu().numpy(), length)  # pieces of at most seq_len (spec 3.10)
            return model.loss(x[None], y[None], cu_seqlens=torch.from_numpy(cu).to(x.device))
        return model.loss(x.view(-1, length), y.view(-1, length))
