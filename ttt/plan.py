"""Where every window, chunk, scored span and training sequence lies (spec sections 3-4), in numpy.

Positions are target indices: target ``i`` is ``val[i+1]``, predicted from ``val[:i+1]``. With
``T = len(val) - 1`` and ``context = seq_len - stride``, window ``ws`` reads ``val[ws:we]``,
``we = min(ws + seq_len, T)``, and scores targets ``[ws, we)`` (window 0) or ``[ws + context, we)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Plan:
    total_targets: int  # T
    seq_len: int
    stride: int
    chunk_tokens: int
    num_chunks: int
    starts: np.ndarray  # (W,) window starts ws
    ends: np.ndarray  # (W,) we
    score_from: np.ndarray  # (W,) first scored target of each window
    chunk_of: np.ndarray  # (W,) chunk of each window
    window_bytes: np.ndarray  # (W,) bytes of each window's scored targets
    chunk_bounds: np.ndarray  # (num_chunks + 1,) windows of chunk c are [chunk_bounds[c], chunk_bounds[c+1])

    @property
    def num_windows(self) -> int:
        return len(self.starts)

    def chunk_windows(self, chunk: int) -> tuple[int, int]:
        return int(self.chunk_bounds[chunk]), int(self.chunk_bounds[chunk + 1])

    def scored_tokens(self, lo: int, hi: int) -> int:
        """Targets scored by windows ``lo .. hi-1``."""
        return int((self.ends[lo:hi] - self.score_from[lo:hi]).sum())

    def training_starts(self, chunk: int) -> np.ndarray:
        """Start positions of the chunk's whole training sequences (a partial tail is not trained on)."""
        lo = chunk * self.chunk_tokens
        hi = min((chunk + 1) * self.chunk_tokens, self.total_targets)
        return lo + np.arange(max(hi - lo, 0) // self.seq_len, dtype=np.int64) * self.seq_len


def plan_windows(total_targets: int, seq_len: int, stride: int, chunk_tokens: int, target_bytes: np.ndarray) -> Plan:
    """The plan for ``T = total_targets`` targets; ``target_bytes[i]`` is the byte count of target ``i``."""
    if len(target_bytes) != total_targets:
        raise ValueError(f"target_bytes has {len(target_bytes)} entries for {total_targets} targets")
    context = seq_len - stride
    starts = np.arange(0, total_targets, stride, dtype=np.int64)
    starts = starts[starts + context < total_targets]
    ends = np.minimum(starts + seq_len, total_targets)
    score_from = np.where(starts == 0, 0, starts + context)
    num_chunks = -(-total_targets // chunk_tokens)
    chunk_of = np.minimum(score_from // chunk_tokens, num_chunks - 1)
    cumulative = np.concatenate(([0], np.cumsum(target_bytes, dtype=np.int64)))
    window_bytes = cumulative[ends] - cumulative[score_from]
    chunk_bounds = np.searchsorted(chunk_of, np.arange(num_chunks + 1), side="left")
    return Plan(
        total_targets,
        seq_len,
        stride,
        chunk_tokens,
        num_chunks,
        starts,
        ends,
        score_from,
        chunk_of,
        window_bytes,
        chunk_bounds,
    )


def share(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rank ``rank``'s contiguous share ``[lo, hi)`` of ``n`` items."""
    return n * rank // world_size, n * (rank + 1) // world_size


def merged_spans(starts: np.ndarray, ends: np.ndarray) -> list[tuple[int, int]]:
    """Runs of spans (sorted by start) where each begins exactly where the last ended, as ``(start, end)``."""
    if len(starts) == 0:
        return []
    breaks = np.flatnonzero(starts[1:] != ends[:-1]) + 1
    first = np.concatenate(([0], breaks))
    last = np.concatenate((breaks - 1, [len(starts) - 1]))
    return [(int(starts[a]), int(ends[b])) for a, b in zip(first, last, strict=True)]
