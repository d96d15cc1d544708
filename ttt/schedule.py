"""The canonical, GPU-count-independent schedule of the phased protocol (frontier spec 2.8, 2.11).

The reference's ranks claim batches first-come-first-served and pause for a phase once the documents
completed reach the phase boundary b_p = floor(D p / P); every other rank first finishes the batch it
holds. Emulating W ranks deterministically: counting completed batches in queue order from the previous
pause, let k be the fewest with cumulative documents >= b_p; the pause then finds K_p = K_{p-1} + k + W - 1
batches completed (the W - 1 others in flight). With W > 1 the queue's head (its longest documents) is
still running at the first pause, so phase 1 counts it last. This reproduces every logged 8-GPU schedule
(1104/1808/2448 documents for D=2000, P=3; 1296/2128/2960 for D=2500), and W = 1 is what one GPU does
(848/1680/2512 for D=2500).

Virtual ranks: the j-th batch claimed after a pause (or the start) belongs to emulated rank j mod W; it
decides whose adapters (warm-started A, A draws) the batch uses. Real ranks only share the work out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .documents import Batch, Doc


def phase_boundaries(num_docs: int, prefix_docs: int, num_phases: int) -> list[int]:
    limit = max(0, min(num_docs, prefix_docs))
    return [limit * (p + 1) // num_phases for p in range(num_phases)] if limit > 0 else []


def pause_points(sizes: list[int], boundaries: list[int], ranks: int) -> list[int]:
    """K_p: queue batches completed at each pause that happens (fewer than the boundaries when the queue
    ends first). ``sizes``: documents per batch in queue order."""
    n, done, pauses = len(sizes), 0, []
    for p, boundary in enumerate(boundaries):
        order = list(range(done, n))
        if p == 0 and ranks > 1 and order:
            order = order[1:] + order[:1]  # the head is the last of the first segment to complete
        counted, k = sum(sizes[:done]), None
        for j, q in enumerate(order, 1):
            counted += sizes[q]
            if counted >= boundary:
                k = j
                break
        if k is None:
            break
        done = min(done + k + ranks - 1, n)
        pauses.append(done)
    return pauses


def segments(num_batches: int, pauses: list[int]) -> list[tuple[int, int]]:
    """Queue ranges [a, b) scored between pauses: before the first, between each, after the last."""
    edges = [0, *pauses, num_batches]
    return [(edges[i], edges[i + 1]) for i in range(len(edges) - 1)]


def virtual_rank(queue_index: int, pauses: list[int], ranks: int) -> int:
    start = max([0, *[k for k in pauses if k <= queue_index]])
    return (queue_index - start) % ranks


def selected_documents(queue: list[Batch], completed: int, boundary: int) -> list[Doc]:
    """Spec 2.8 step 3: the completed batches' documents sorted by (batch number, slot) ascending, the
    first ``boundary`` of them (the shortest scored documents, the most recently scored ones)."""
    entries = sorted((b.index, slot, doc) for b in queue[:completed] for slot, doc in enumerate(b.docs))
    return [doc for _, _, doc in entries[:boundary]]


@dataclass(frozen=True)
class GlobalChunk:
    index: int
    start: int  # in the phase's stream S
    end: int
    lr: float


def global_chunks(
    stream_tokens: int, chunk_tokens: int, lr: float, warmup_chunks: int, warmup_start_lr: float
) -> tuple[int, list[GlobalChunk]]:
    """Spec 2.8: M = ceil((|S| - 1) / K) chunks over |S| - 1 targets; every chunk but the last, with the
    cosine lr (after an optional linear warm-up over the first chunks). Returns M and the trained chunks
    (those with a whole sequence are decided by the caller)."""
    total = stream_tokens - 1
    if total <= 0:
        return 0, []
    m = -(-total // chunk_tokens)
    warm = max(0, min(warmup_chunks, m - 1))
    chunks = []
    for c in range(m - 1):
        if warm > 0 and c < warm:
            rate = warmup_start_lr + (lr - warmup_start_lr) * (c / max(warm - 1, 1))
        else:
            rate = lr * 0.5 * (1.0 + math.cos(math.pi * max(c - warm, 0) / max(m - 1 - warm, 1)))
        chunks.append(GlobalChunk(c, c * chunk_tokens, min((c + 1) * chunk_tokens, total), rate))
    return m, chunks


def rank_share(count: int, rank: int, ranks: int) -> tuple[int, int]:
    """Sequences [floor(q r / W), floor(q (r+1) / W)) of a chunk's q for emulated rank r (spec 2.8)."""
    return count * rank // ranks, count * (rank + 1) // ranks
