"""The emulated ranks' A draws made on a thread ahead of the batches (ttt/lanes.py) against drawing them in line,
as the record does: the same tensors for every batch, whatever the sizes, phases and warm start."""

from __future__ import annotations

import threading

import pytest
import torch

from pgttt.ttt import EvalConfig
from pgttt.ttt.lanes import DrawAhead, Lane, plan
from pgttt.ttt.lora import DrawStream, Shapes
from pgttt.ttt.schedule import segments, virtual_rank

SHAPES = Shapes(model_dim=8, vocab_size=16, kv_dim=4, slots=2, rank=2, sites=("q", "v"))


def config(warm_start: bool) -> EvalConfig:
    return EvalConfig(protocol="phased", ttt_batch_size=3, ttt_lora_rank=2, ttt_warm_start_a=warm_start, seed=5)


def in_line(sizes, pauses, lanes, ranks, cfg):
    """The record's order, plainly: every lane builds at the start and after each phase that still scores a
    batch; each batch takes its A when it is taken."""
    streams = {v: DrawStream(cfg.seed) for v in lanes}
    pending, current, out = {}, {}, []
    for v in lanes:
        pending[v] = streams[v].reserve(SHAPES, cfg.ttt_batch_size)
    for seg, (first, last) in enumerate(segments(len(sizes), pauses)):
        for q in range(first, last):
            v = virtual_rank(q, pauses, ranks)
            if v not in lanes:
                continue
            if sizes[q] != cfg.ttt_batch_size:
                out.append(streams[v].draw(SHAPES, sizes[q]))
                continue
            if v in pending:
                current[v] = DrawStream.draw_from(pending.pop(v), SHAPES, sizes[q])
            if not cfg.ttt_warm_start_a:
                current[v] = streams[v].draw(SHAPES, sizes[q])
            out.append(current[v])
        if seg < len(pauses) and pauses[seg] < len(sizes):
            for v in lanes:
                pending[v] = streams[v].reserve(SHAPES, cfg.ttt_batch_size)
    return out


def ahead(sizes, pauses, lanes, ranks, cfg):
    by_lane = {v: Lane(cfg.seed) for v in lanes}
    out = []
    with DrawAhead(by_lane, plan(sizes, pauses, list(lanes), ranks), SHAPES, cfg) as draws:
        for q in range(len(sizes)):
            v = virtual_rank(q, pauses, ranks)
            if v in by_lane:
                adapters = by_lane[v].adapters(draws.next(), SHAPES, cfg, torch.device("cpu"))
                out.append([a.detach().clone() for a in adapters.a])
    return out


@pytest.mark.parametrize("warm_start", [True, False])
@pytest.mark.parametrize(
    ("sizes", "pauses", "lanes"),
    [
        ([2, 3, 3, 3, 3, 3], [2, 4], [0, 1, 2]),  # a short head batch, two phases, every lane
        ([3, 3, 3, 3, 3, 3, 3], [1, 5], [1]),  # one real rank of three: lane 1 skips a segment, owes two builds
        ([3, 3, 1], [], [0, 1]),  # no phase; a batch of another size last
    ],
)
def test_draws_made_ahead_are_the_draws_made_in_line(sizes, pauses, lanes, warm_start):
    cfg = config(warm_start)
    want, got = in_line(sizes, pauses, lanes, 3, cfg), ahead(sizes, pauses, lanes, 3, cfg)
    assert len(got) == len(want) == sum(virtual_rank(q, pauses, 3) in lanes for q in range(len(sizes)))
    for g, w in zip(got, want, strict=True):
        assert all(torch.equal(a, b) for a, b in zip(g, w, strict=True))


def test_builds_wait_for_their_lanes_next_batch():
    # Two lanes, a phase after the first batch: lane 1 takes no batch before it, so it owes two builds.
    work = list(plan([3, 3, 3, 3], [1], [0, 1], 2))
    assert work == [
        ("build", 0),
        ("batch", 0, 3),
        ("build", 0),
        ("batch", 0, 3),
        ("build", 1),
        ("build", 1),
        ("batch", 1, 3),
        ("batch", 0, 3),
    ]


def test_an_error_on_the_thread_is_raised_by_next_and_close_stops_a_thread_a_batch_ahead():
    cfg = config(True)

    def failing():
        yield ("build", 0)
        yield ("batch", 0, 3)
        raise ValueError("no draw")

    with DrawAhead({0: Lane(1)}, failing(), SHAPES, cfg) as draws:
        assert draws.next().first is not None  # the first batch after a build draws its reusable set
        with pytest.raises(ValueError, match="no draw"):
            draws.next()

    with DrawAhead({0: Lane(1)}, iter([("build", 0)]), SHAPES, cfg) as draws:
        with pytest.raises(RuntimeError, match="no more batches"):
            draws.next()

    many = DrawAhead({0: Lane(1)}, iter([("build", 0)] + [("batch", 0, 3)] * 50), SHAPES, cfg)
    many.next()
    many.close()  # the thread waits to hand over the next batch's draws: close must still end it
    assert not any(t.name == "pgttt-lora-draws" and t.is_alive() for t in threading.enumerate())
