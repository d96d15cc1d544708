"""The phased protocol's index arithmetic: documents, windows, the queue, and the canonical schedule (spec 2.11)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pgttt.ttt.documents import Doc, chunk_window, find_documents, make_queue, select_documents
from pgttt.ttt.errors import DataError
from pgttt.ttt.lora import AdapterSet, DrawStream, Shapes
from pgttt.ttt.schedule import global_chunks, pause_points, phase_boundaries, selected_documents, virtual_rank


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
    bounds = phase_boundaries(50_000, prefix, phases)
    pauses = pause_points([len(b.docs) for b in queue], bounds, ranks)
    assert [sum(len(b.docs) for b in queue[:k]) for k in pauses] == completed
    for k, b in zip(pauses, bounds, strict=True):
        assert len(selected_documents(queue, k, b)) == b


def test_selection_keeps_the_shortest_scored_documents(queue):
    pauses = pause_points([len(b.docs) for b in queue], [833, 1666, 2500], 8)
    assert pauses == [21, 34, 47]
    chosen = selected_documents(queue, 21, 833)  # spec 2.8: G_761 ... G_773 plus the first document of G_774
    by_batch = {b.index: b for b in queue}
    expected = [d for i in range(761, 774) for d in by_batch[i].docs] + [by_batch[774].docs[0]]
    assert chosen == expected


def test_virtual_ranks_restart_after_each_pause():
    assert [virtual_rank(q, [5], 3) for q in range(9)] == [0, 1, 2, 0, 1, 0, 1, 2, 0]
    assert phase_boundaries(2, 2500, 3) == [0, 1, 2] and phase_boundaries(10, 0, 3) == []
    assert pause_points([2], [0, 1, 2], 1) == [1]  # the compat case ttt_default: one pause, after the batch


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
