"""The phased protocol's index arithmetic and spec 2.11's schedule integers, on synthetic document lengths.

50,000 documents of distinct lengths (no ties anywhere), batches of 64: 781 full batches and G_781 of the 16
longest, as in the CaseOps validation set. The integers are the records' logged ones (spec 2.11's table),
checked on the plain reference (tests/helpers/phased_reference.py) and on the engine (ttt/schedule.py, documents.py),
and the two schedules are compared on many settings.
"""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from pgttt.ttt import schedule as engine_schedule
from pgttt.ttt.documents import Doc, chunk_window, find_documents, make_queue, select_documents
from pgttt.ttt.errors import DataError
from pgttt.ttt.lora import AdapterSet, DrawStream, Shapes
from pgttt.ttt.schedule import global_chunks, selected_documents, virtual_rank
from tests.helpers.phased_reference import make_batches, pause_points, phase_boundaries, phase_schedule, queue_order

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


# ---- the engine's own index arithmetic (ttt/schedule.py, documents.py, lora.py) ----------------------------
def synthetic_docs(count: int = 50_000) -> list[Doc]:
    """Documents of distinct lengths in a shuffled stream order (only their lengths matter to the queue)."""
    lengths = np.random.default_rng(0).permutation(count) + 2
    starts = np.concatenate(([0], np.cumsum(lengths - 1)[:-1]))
    return [Doc(i, int(s), int(n)) for i, (s, n) in enumerate(zip(starts, lengths, strict=True))]


@pytest.fixture(scope="module")
def queue():
    return make_queue(synthetic_docs(), 64)


def test_queue_is_the_records(queue):
    assert len(queue) == 782 and [len(b.docs) for b in queue[:2]] == [16, 64]  # G_781 (16 longest) first
    assert [b.index for b in queue[:3]] == [781, 780, 779]
    assert all(a.longest > b.longest for a, b in zip(queue, queue[1:], strict=False))
    assert all(d.length <= e.length for b in queue for d, e in zip(b.docs, b.docs[1:], strict=False))


@pytest.mark.parametrize(
    ("prefix", "phases", "ranks", "completed"),
    [
        (2000, 3, 8, [1104, 1808, 2448]),  # 04-14 ... 04-29 logs (pd at each ttpp: line)
        (2000, 1, 8, [2448]),  # 04-13
        (2500, 3, 8, [1296, 2128, 2960]),  # 1.0611
        (2500, 3, 1, [848, 1680, 2512]),  # one GPU of the reference
    ],
)
def test_documents_completed_at_each_pause(queue, prefix, phases, ranks, completed):
    bounds = engine_schedule.phase_boundaries(50_000, prefix, phases)
    pauses = engine_schedule.pause_points([len(b.docs) for b in queue], bounds, ranks)
    assert [sum(len(b.docs) for b in queue[:k]) for k in pauses] == completed
    for k, b in zip(pauses, bounds, strict=True):
        assert len(selected_documents(queue, k, b)) == b


def test_selection_keeps_the_shortest_scored_documents(queue):
    pauses = engine_schedule.pause_points([len(b.docs) for b in queue], [833, 1666, 2500], 8)
    assert pauses == [21, 34, 47]
    chosen = selected_documents(queue, 21, 833)  # spec 2.8: G_761 ... G_773 plus the first document of G_774
    by_batch = {b.index: b for b in queue}
    expected = [d for i in range(761, 774) for d in by_batch[i].docs] + [by_batch[774].docs[0]]
    assert chosen == expected


def test_virtual_ranks_restart_after_each_pause():
    assert [virtual_rank(q, [5], 3) for q in range(9)] == [0, 1, 2, 0, 1, 0, 1, 2, 0]
    assert engine_schedule.phase_boundaries(2, 2500, 3) == [0, 1, 2]
    assert engine_schedule.phase_boundaries(10, 0, 3) == []
    # The compat case ttt_default: one pause, after the batch.
    assert engine_schedule.pause_points([2], [0, 1, 2], 1) == [1]


def test_global_chunks_lr_schedule():
    m, chunks = global_chunks(2 * 32768 + 1 + 5, 32768, 1e-3, 0, 0.0)
    assert m == 3 and [c.index for c in chunks] == [0, 1]  # the last chunk is skipped
    assert [c.lr for c in chunks] == [1e-3, pytest.approx(5e-4)]
    _, warm = global_chunks(10 * 100 + 1, 100, 1.0, 3, 0.1)
    assert [round(c.lr, 6) for c in warm[:4]] == [0.1, 0.55, 1.0, 1.0]
    assert warm[-1].lr == pytest.approx(0.5 * (1 + math.cos(math.pi * 5 / 6)))


def test_documents_and_windows():
    tokens = np.array([1, 5, 6, 1, 7, 1, 8, 9, 9])
    assert find_documents(tokens) == [Doc(0, 0, 4), Doc(1, 3, 3), Doc(2, 5, 4)]  # each with the next BOS
    with pytest.raises(DataError, match="starts with BOS"):
        find_documents(np.array([5, 1, 6]))
    with pytest.raises(DataError, match="is a BOS: its document has no target"):
        find_documents(np.array([1, 5, 1]))
    for targets in (1, 47, 48, 49, 500):
        covered = []
        for c in range(-(-targets // 48)):
            w = chunk_window(c, targets, 48, 128)
            assert 0 <= w.start and w.length <= 128 and w.chunk_offset + w.chunk_length == w.length
            covered += range(w.start + w.chunk_offset, w.start + w.length)
        assert covered == list(range(targets))
    docs = synthetic_docs(100)
    subset = select_documents(docs, max_docs=50, fraction=0.1, seed=42)
    assert len(subset) == 5 and subset == sorted(subset, key=lambda d: d.index) and subset[-1].index < 50


def test_a_draws_follow_the_compat_rule():
    """torch.manual_seed(SEED), then each set draws lm_head, q x slots, v, k, mlp, o: U(-1/sqrt(512), ...)."""
    shapes = Shapes(model_dim=512, vocab_size=64, kv_dim=256, slots=3, rank=2, sites=("q", "v", "k", "mlp", "o"))
    torch.manual_seed(42)
    bound = 1 / math.sqrt(512)
    record = [torch.empty(bsz, 2, 512).uniform_(-bound, bound) for bsz in (4, 1) for _ in range(1 + 5 * 3)]
    stream = DrawStream(42)
    state = stream.reserve(shapes, 4)  # the reusable set, drawn later from its saved state
    fresh = stream.draw(shapes, 1)  # a batch of another size
    lazy = DrawStream.draw_from(state, shapes, 4)
    for got, want in zip(lazy + fresh, record, strict=True):
        assert torch.equal(got, want)
    adapters = AdapterSet(shapes, lazy, 1.8, torch.device("cpu"))
    assert adapters.delta(0, "q", torch.ones(4, 3, 512)).abs().max() == 0  # B = 0: the plain model
    assert adapters.delta(2, "k", torch.ones(4, 3, 512)).shape == (4, 3, 256)


# ---- the engine's schedule against the reference's -----------------------------------------------------------
def engine_pauses(lengths: list[int], batch: int, prefix: int, phases: int, ranks: int, chunk: int) -> list[dict]:
    starts = np.concatenate(([0], np.cumsum(np.array(lengths) - 1)[:-1]))
    docs = [Doc(i, int(s), n) for i, (s, n) in enumerate(zip(starts, lengths, strict=True))]
    queue = make_queue(docs, batch)
    bounds = engine_schedule.phase_boundaries(len(docs), prefix, phases)
    result = []
    for k, b in zip(engine_schedule.pause_points([len(q.docs) for q in queue], bounds, ranks), bounds, strict=False):
        selected = selected_documents(queue, k, b)
        stream = sum(d.length for d in selected)
        result.append(
            {
                "batches": k,
                "docs_completed": sum(len(q.docs) for q in queue[:k]),
                "selected": [d.index for d in selected],
                "tokens": stream,
                "chunks": global_chunks(stream, chunk, 1.0, 0, 0.0)[0],
            }
        )
    return result


@pytest.mark.parametrize(
    ("prefix", "phases", "ranks", "batches"),
    [(2000, 3, 8, [18, 29, 39]), (2000, 1, 8, [39]), (2500, 3, 8, [21, 34, 47]), (2500, 3, 1, [14, 27, 40])],
)
def test_engine_pauses_are_the_logged_batches(prefix, phases, ranks, batches):
    pauses = engine_pauses(LENGTHS, BATCH, prefix, phases, ranks, GLOBAL_CHUNK)
    assert [p["batches"] for p in pauses] == batches
    assert pauses == [
        {k: v for k, v in p.items() if k not in ("phase", "docs_selected")} for p in schedule(prefix, phases, ranks)
    ]


@pytest.mark.parametrize("seed", range(40))
def test_engine_schedule_equals_the_reference(seed):
    """Random lengths (ties included: the stable sorts decide), batch sizes, prefixes, phases and ranks."""
    rng = random.Random(seed)
    lengths = [rng.randint(2, rng.choice([5, 50, 500])) for _ in range(rng.randint(1, 400))]
    batch, prefix = rng.randint(1, 20), rng.randint(0, len(lengths) + 5)
    phases, ranks, chunk = rng.randint(1, 5), rng.choice([1, 2, 3, 8]), rng.randint(1, 3000)
    mine = [
        {k: v for k, v in p.items() if k not in ("phase", "docs_selected")}
        for p in phase_schedule(lengths, batch, prefix, phases, ranks, chunk)
    ]
    assert engine_pauses(lengths, batch, prefix, phases, ranks, chunk) == mine
