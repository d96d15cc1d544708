"""Spec 2.11's schedule integers (pauses, batches completed, selections, global-SGD chunks) on synthetic lengths.

50,000 documents of distinct lengths (no ties anywhere), batches of 64: 781 full batches and G_781 of the 16
longest, as in the CaseOps validation set. The integers are the records' logged ones (spec 2.11's table).
"""

from __future__ import annotations

import random

import pytest
from phased_reference import make_batches, pause_points, phase_boundaries, phase_schedule, queue_order

NUM_DOCS, BATCH = 50_000, 64
LENGTHS = random.Random(18).sample(range(2, 400_000), NUM_DOCS)  # distinct, in a shuffled stream order
GLOBAL_CHUNK = 32_768


def schedule(prefix_docs: int, phases: int, ranks: int) -> list[dict]:
    return phase_schedule(LENGTHS, BATCH, prefix_docs, phases, ranks, GLOBAL_CHUNK)


@pytest.mark.parametrize(
    ("prefix_docs", "phases", "ranks", "docs_completed", "batches"),
    [
        (2000, 3, 8, [1104, 1808, 2448], [18, 29, 39]),  # SP8192 04-14 and CaseOps 04-18 ... 04-29
        (2000, 1, 8, [2448], [39]),  # 04-13
        (2500, 3, 8, [1296, 2128, 2960], [21, 34, 47]),  # 1.0611
        (2500, 3, 1, [848, 1680, 2512], [14, 27, 40]),  # what one GPU of the reference does
    ],
)
def test_pauses_match_the_logged_schedule(prefix_docs, phases, ranks, docs_completed, batches):
    pauses = schedule(prefix_docs, phases, ranks)
    assert [p["docs_completed"] for p in pauses] == docs_completed
    assert [p["batches"] for p in pauses] == batches
    boundaries = phase_boundaries(prefix_docs, NUM_DOCS, phases)
    assert [p["docs_selected"] for p in pauses] == boundaries


def test_boundaries_and_the_one_rank_rule():
    assert phase_boundaries(2500, NUM_DOCS, 3) == [833, 1666, 2500]
    assert phase_boundaries(2000, NUM_DOCS, 3) == [666, 1333, 2000]
    # One rank pauses after exactly the first batch that crosses each boundary: 16 + 64 (k - 1) >= b_p.
    for pause, boundary in zip(schedule(2500, 3, 1), [833, 1666, 2500], strict=True):
        completed = pause["docs_completed"]
        assert completed >= boundary > completed - BATCH


def test_selections_are_the_spec_batches():
    """Spec 2.8: phase 1 = G_761..G_773 + the first document of G_774; phase 2 = G_748..G_773 + 2; phase 3 =
    G_735..G_773 + 4; the ~460 longest documents are never selected. M_p = ceil((|S| - 1) / 32768)."""
    batches = make_batches(LENGTHS, BATCH)
    assert len(batches) == 782 and len(batches[781]) == 16
    assert queue_order(batches, LENGTHS)[:3] == [781, 780, 779]
    pauses = schedule(2500, 3, 8)
    for pause, first, extra in zip(pauses, [761, 748, 735], [1, 2, 4], strict=True):
        expected = [i for g in range(first, 774) for i in batches[g]] + batches[774][:extra]
        assert pause["selected"] == expected
        stream = sum(LENGTHS[i] for i in expected)
        assert pause["tokens"] == stream
        assert pause["chunks"] == (stream - 1 + GLOBAL_CHUNK - 1) // GLOBAL_CHUNK
    never = {i for g in range(775, 782) for i in batches[g]} | set(batches[774][4:])
    assert len(never) == 460
    assert never.isdisjoint(i for pause in pauses for i in pause["selected"])


def test_global_chunk_count_formula_on_a_hand_sized_selection():
    """M = ceil((|S| - 1) / K): one stream of 2 documents, every join case of the division."""
    lengths = [10, 20, 30, 41]  # G_0 = [10, 20], G_1 = [30, 41]; queue G_1, G_0
    for chunk, expected in [(70, 1), (69, 2), (35, 2), (34, 3), (1, 70)]:
        (pause,) = phase_schedule(lengths, 2, 2, 1, 1, chunk)
        assert pause["selected"] == [2, 3] and pause["tokens"] == 71
        assert pause["chunks"] == expected


def test_edges_of_the_rule():
    sizes = [16, 64, 64, 64]
    # No prefix: no phases at all.
    assert phase_boundaries(0, 100, 3) == []
    # The prefix is clipped to the documents there are; fewer phases than 1 count as 1 (the record's max(1, P)).
    assert phase_boundaries(10_000, 208, 2) == [104, 208]
    assert phase_boundaries(100, 208, 0) == [100]
    # A boundary of 0 still waits for one batch; with 8 ranks the first batch is in flight at the first pause.
    assert pause_points(sizes, [0, 0], 1) == [1, 2]
    assert pause_points(sizes, [0], 8) == [4]
    assert pause_points(sizes + [64] * 10, [0, 50], 3) == [3, 6]
    # The first batch is not counted at the first pause with several ranks: 64 >= 20 after batch 1, + 2 in flight.
    assert pause_points(sizes + [64] * 10, [20], 3) == [3]
    assert pause_points(sizes + [64] * 10, [20], 1) == [2]
    # Not reachable without the first batch: the pause comes when everything has completed.
    assert pause_points(sizes, [200], 2) == [4]
    # A pause needs a batch to finish: none is left after the last, so later phases never come.
    assert pause_points(sizes, [208, 208], 1) == [4]
    assert pause_points(sizes, [100, 150, 208], 8) == [4]
