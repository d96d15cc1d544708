"""The compiled fast path (torch.compile, static shapes; the default on CUDA) on the CPU: the plain path's
numbers, and after warm-up an evaluation (TTT, or sliding with the same shapes) compiles nothing."""

from __future__ import annotations

import logging
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch._dynamo.utils import counters

from pgttt.ttt import EvalConfig, EvalSession, ValSet
from tests.helpers.ttt import (
    MICRO,
    micro_model,
    one_thread,  # noqa: F401 (a fixture)
    random_tables,
)

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


def test_compiled_equals_plain_and_a_warm_up_in_two_stages_covers_every_shape(caplog: pytest.LogCaptureFixture):
    val = ValSet.from_tokens(np.random.default_rng(5).integers(0, MICRO.vocab_size, 400))
    tables = random_tables(MICRO.vocab_size, seed=5)
    # 384 targets: window 0's batch (all positions scored), full batches, a short last batch in each chunk
    # (padded); two sequences a chunk, one training batch.
    base = dict(seq_len=16, stride=4, ttt_epochs=2, chunk_tokens=40, batch_seqs=3, ttt_lr=0.05, precision="fp32")
    compiled_config = EvalConfig(**base, compile=True)
    session = EvalSession(micro_model(seed=9))  # fresh: warm-up is the first thing its model runs

    def messages() -> list[str]:
        return [r.getMessage().rsplit(" ", 2)[0] for r in caplog.records]  # less the seconds

    before = counters["stats"]["unique_graphs"]
    # What a server does to be ready sooner: the default config's graphs first, the dynamic-batch graph later.
    with caplog.at_level(logging.INFO, logger="pgttt.ttt.chunked_compiled"):
        warm_s = session.warmup(compiled_config, device="cpu", fallback=False)
    ready = counters["stats"]["unique_graphs"]
    # Each graph's compile is logged with its shape and seconds, so a slow start can be read off the log.
    assert messages() == ["chunked warm-up: scoring 3 x 16 (width 4)", "chunked warm-up: training static (2 x 16)"]
    # One graph per shape: scoring at the stride, training at the warmed batch size. Window 0, scored at every
    # position, runs plain: no graph of its own. A third would mean a graph guards on state that changes after
    # its first call (the rotary tables' cache did).
    assert ready - before == 2
    steps = session.worker(torch.device("cpu"), "fp32").twins[("chunked", True)]
    assert steps.fallback_deferred and not steps.dynamic_batches

    def static_shapes() -> set[tuple[int, int]]:
        return {(count, length) for count, length, _ in steps.static_batches}

    assert static_shapes() == {(2, 16)}
    compiled = session.evaluate(val, tables, compiled_config, device="cpu")
    assert counters["stats"]["unique_graphs"] == ready, "the evaluation compiled after warm-up"
    assert compiled.timings["warmup_s"] < 0.01 < warm_s

    reference = EvalSession(micro_model(seed=9))
    plain = reference.evaluate(val, tables, EvalConfig(**base, compile=False), device="cpu")
    assert (compiled.tokens_scored, compiled.bytes_scored) == (plain.tokens_scored, plain.bytes_scored)
    assert math.isclose(compiled.loss_sum, plain.loss_sum, rel_tol=1e-6)
    assert compiled.compliance == plain.compliance
    # The working models hold each run's TTT weights.
    cpu = torch.device("cpu")
    for a, b in zip(
        session.worker(cpu, "fp32").model.parameters(), reference.worker(cpu, "fp32").model.parameters(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)

    # Another chunk size (3 sequences a chunk, not 2) before the second stage: its batches run plain, and
    # nothing compiles inside the job.
    other = EvalConfig(**{**base, "chunk_tokens": 48}, compile=True)
    plain_other = EvalSession(micro_model(seed=9)).evaluate(val, tables, replace(other, compile=False), device="cpu")
    deferred = session.evaluate(val, tables, other, device="cpu")
    assert counters["stats"]["unique_graphs"] == ready, "a job compiled the deferred graph"
    assert math.isclose(deferred.loss_sum, plain_other.loss_sum, rel_tol=1e-6)

    # The second stage compiles only the dynamic-batch graph, which then takes that size; no static graph is
    # added outside an explicit warm-up.
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="pgttt.ttt.chunked_compiled"):
        session.warmup(compiled_config, device="cpu")
    assert messages() == ["chunked warm-up: training any batch size (3 x 16)"]
    graphs = counters["stats"]["unique_graphs"]
    assert graphs == ready + 1 and not steps.fallback_deferred and steps.dynamic_batches
    served = session.evaluate(val, tables, other, device="cpu")
    assert counters["stats"]["unique_graphs"] == graphs, "the dynamic-batch graph did not serve the other size"
    assert static_shapes() == {(2, 16)}
    assert math.isclose(served.loss_sum, plain_other.loss_sum, rel_tol=1e-6)

    # Scoring graphs do not depend on what TTT adapts: a sliding evaluation reuses them.
    sliding = session.evaluate(val, tables, EvalConfig(**{**base, "ttt_epochs": 0}, compile=True), device="cpu")
    assert counters["stats"]["unique_graphs"] == graphs, "the sliding evaluation compiled"
    assert sliding.val_bpb != compiled.val_bpb


def test_warm_up_covers_the_training_shares_of_gangs():
    # 5 sequences a chunk in batches of 3: one GPU trains on 3 and 2; each of two ranks on 2 and 1, or 1 and 1.
    # (Scoring, the dynamic graph and the 2-sequence one are the test above's: they do not compile again.)
    config = EvalConfig(
        seq_len=16, stride=4, ttt_epochs=1, chunk_tokens=80, batch_seqs=3, precision="fp32", compile=True
    )
    session = EvalSession(micro_model(seed=2))
    session.warmup(config, device="cpu", world_sizes=(1, 2))
    steps = session.worker(torch.device("cpu"), "fp32").twins[("chunked", True)]
    assert {(count, length) for count, length, _ in steps.static_batches} == {(3, 16), (2, 16), (1, 16)}
    graphs = counters["stats"]["unique_graphs"]
    session.evaluate(
        ValSet.from_tokens(np.arange(300) % MICRO.vocab_size),
        random_tables(MICRO.vocab_size, seed=1),
        config,
        device="cpu",
    )
    assert counters["stats"]["unique_graphs"] == graphs


def test_the_cuda_graphs_option_reaches_the_training_graphs_and_leaves_the_numbers_alone():
    # On the CPU Inductor runs reduce-overhead graphs without CUDA graphs: this checks the plumbing (session,
    # worker, steps) and that marking each training step does not change what the protocol computes.
    config = EvalConfig(
        seq_len=16, stride=4, ttt_epochs=2, chunk_tokens=80, batch_seqs=3, precision="fp32", compile=True
    )
    val = ValSet.from_tokens(np.random.default_rng(3).integers(0, MICRO.vocab_size, 300))
    tables = random_tables(MICRO.vocab_size, seed=3)
    session = EvalSession(micro_model(seed=4), cuda_graphs=True)
    session.warmup(config, device="cpu")
    steps = session.worker(torch.device("cpu"), "fp32").twins[("chunked", True)]
    assert steps.cuda_graphs and steps.static_batches
    graphed = session.evaluate(val, tables, config, device="cpu")
    plain = EvalSession(micro_model(seed=4)).evaluate(val, tables, replace(config, compile=False), device="cpu")
    assert math.isclose(graphed.loss_sum, plain.loss_sum, rel_tol=1e-6)
