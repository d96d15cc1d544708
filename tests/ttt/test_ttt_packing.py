"""The varlen segment builder (frontier spec 3.10) on hand-made rows, and against a plain loop."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pgttt.ttt.packing import build_cu_seqlens, row_cu_seqlens


def loop_reference(bos: list[int], n: int, max_doc_len: int, bucket: int = 64) -> tuple[list[int], int]:
    """The spec's words as a loop: documents from each BOS (and 0), cut every max_doc_len tokens."""
    starts_of_docs = bos if bos and bos[0] == 0 else [0, *bos]
    starts = []
    for i, start in enumerate(starts_of_docs):
        end = starts_of_docs[i + 1] if i + 1 < len(starts_of_docs) else n
        step = max_doc_len if max_doc_len > 0 else end - start
        starts.extend(range(start, end, step))
    boundaries = [*starts, n]
    longest = max(b - a for a, b in zip(boundaries, boundaries[1:], strict=False))
    padded = -(-len(boundaries) // bucket) * bucket
    return boundaries + [n] * (padded - len(boundaries)), longest


def test_row_starting_with_bos():
    cu, longest = build_cu_seqlens([0, 5, 9], 12, max_doc_len=2048)
    assert cu.dtype == np.int32 and len(cu) == 64
    assert cu[:4].tolist() == [0, 5, 9, 12]
    assert set(cu[4:].tolist()) == {12}  # padding: empty segments at the row's end
    assert longest == 5


def test_row_not_starting_with_bos_gets_a_segment_from_0():
    # The row begins inside a document: tokens 0..2 are that document's tail, a segment of their own.
    row = np.array([7, 8, 9, 1, 4, 4, 1, 5])
    cu, longest = row_cu_seqlens(row, max_doc_len=2048)
    assert cu[:4].tolist() == [0, 3, 6, 8]
    assert longest == 3


def test_row_without_any_bos_is_one_segment():
    cu, longest = build_cu_seqlens([], 10)
    assert cu[:2].tolist() == [0, 10] and longest == 10


def test_long_document_is_cut_counting_from_its_start():
    # Document at 3 of length 10 with pieces of 4: 3, 7, 11 (the last piece 2 long); then the next one at 13.
    cu, longest = build_cu_seqlens([3, 13], 16, max_doc_len=4)
    assert cu[:7].tolist() == [0, 3, 7, 11, 13, 16, 16]
    assert longest == 4
    # The 0..3 head (not a document start) is cut the same way when it is long.
    cu, _ = build_cu_seqlens([9], 12, max_doc_len=4)
    assert cu[:5].tolist() == [0, 4, 8, 9, 12]


def test_max_doc_len_zero_keeps_documents_whole():
    cu, longest = build_cu_seqlens([0, 3000], 5000, max_doc_len=0)
    assert cu[:3].tolist() == [0, 3000, 5000] and longest == 3000


def test_padding_to_a_multiple_of_64_entries():
    # 63 segments -> 64 boundaries: already a multiple, no padding; 64 segments -> 65 -> 128 entries.
    cu, _ = build_cu_seqlens(np.arange(63), 63)
    assert len(cu) == 64 and cu[-1] == 63 and cu[-2] == 62
    cu, _ = build_cu_seqlens(np.arange(64), 64)
    assert len(cu) == 128 and cu[64:].tolist() == [64] * 64
    cu, _ = build_cu_seqlens([0], 8, bucket=4)
    assert cu.tolist() == [0, 8, 8, 8]


@pytest.mark.parametrize(
    ("bos", "n", "message"),
    [
        ([0, 12], 12, "within 0..11"),
        ([4, 2], 12, "strictly increasing"),
        ([-1], 4, "within 0..3"),
    ],
)
def test_bad_positions_are_refused(bos, n, message):
    with pytest.raises(ValueError, match=message):
        build_cu_seqlens(bos, n)


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="n=0"):
        build_cu_seqlens([], 0)
    with pytest.raises(ValueError, match="max_doc_len=-1"):
        build_cu_seqlens([0], 4, max_doc_len=-1)


@given(st.data())
def test_matches_the_loop(data):
    n = data.draw(st.integers(1, 300))
    bos = sorted(data.draw(st.sets(st.integers(0, n - 1), max_size=40)))
    max_doc_len = data.draw(st.integers(0, 50))
    cu, longest = build_cu_seqlens(bos, n, max_doc_len, bucket=16)
    want_cu, want_longest = loop_reference(bos, n, max_doc_len, bucket=16)
    assert cu.tolist() == want_cu and longest == want_longest
