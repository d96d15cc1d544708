"""Document-masked packed rows (frontier spec 3.10): the segment boundaries of varlen attention.

A packed row of ``n`` tokens holds several documents back to back; attention is causal inside each
segment and never crosses one. Segments start at every BOS (and at 0), and a document longer than
``max_doc_len`` is cut into pieces of at most ``max_doc_len`` tokens counted from its start. This is the
records' ``_build_cu_seqlens`` (used by their training, the diagnostic ``eval_val`` and the global-SGD
phases of TTT), as plain numpy.
"""

from __future__ import annotations

import numpy as np

BOS_ID = 1
CU_BUCKET = 64  # cu_seqlens is padded to a multiple of this many entries (fewer distinct shapes to compile)


def build_cu_seqlens(
    bos_positions: np.ndarray | list[int], n: int, max_doc_len: int = 0, bucket: int = CU_BUCKET
) -> tuple[np.ndarray, int]:
    """``(cu_seqlens, max_seqlen)`` for a packed row of ``n`` tokens whose BOS tokens sit at ``bos_positions``.

    ``cu_seqlens`` (int32) holds the segment starts, then ``n``, then ``n`` again until its length is a
    multiple of ``bucket`` (the padding entries are empty trailing segments). ``max_doc_len`` 0 keeps each
    document whole. ``max_seqlen`` is the longest segment.
    """
    if n <= 0:
        raise ValueError(f"n={n}: a packed row needs at least one token")
    if max_doc_len < 0:
        raise ValueError(f"max_doc_len={max_doc_len}: must be 0 (no cap) or positive")
    if bucket <= 0:
        raise ValueError(f"bucket={bucket}: must be positive")
    bos = np.asarray(bos_positions, dtype=np.int64).reshape(-1)
    if len(bos) and (bos[0] < 0 or bos[-1] >= n or np.any(np.diff(bos) <= 0)):
        raise ValueError(f"bos_positions must be strictly increasing within 0..{n - 1}, got {bos.tolist()[:8]}...")
    if not len(bos) or bos[0] != 0:
        bos = np.concatenate(([0], bos))  # the row starts mid-document: its first piece is a segment too
    ends = np.append(bos[1:], n)
    if max_doc_len > 0:
        pieces = -(-(ends - bos) // max_doc_len)  # pieces per document
        starts = np.repeat(bos, pieces) + max_doc_len * _ranges(pieces)
    else:
        starts = bos
    boundaries = np.append(starts, n)
    cu = np.full(-(-len(boundaries) // bucket) * bucket, n, dtype=np.int32)
    cu[: len(boundaries)] = boundaries
    return cu, int(np.diff(boundaries).max())


def row_cu_seqlens(
    row: np.ndarray, max_doc_len: int = 0, bos_id: int = BOS_ID, bucket: int = CU_BUCKET
) -> tuple[np.ndarray, int]:
    """``build_cu_seqlens`` for the input ids ``row`` of a packed row, its BOS tokens found by id."""
    row = np.asarray(row)
    return build_cu_seqlens(np.flatnonzero(row == bos_id), len(row), max_doc_len, bucket)


def _ranges(counts: np.ndarray) -> np.ndarray:
    """``[0, 1, .., c-1]`` for each count ``c``, concatenated."""
    total = int(counts.sum())
    offsets = np.repeat(np.cumsum(counts) - counts, counts)
    return np.arange(total, dtype=np.int64) - offsets
