"""The phased protocol's compiled chunk step (ttt/phased_compiled.py) on the CPU, on a tiny frontier model: the
plain step's numbers, and after warm-up an evaluation compiles nothing. Traced with the "aot_eager" backend
(Dynamo's graphs, guards and AOTAutograd's backward, no generated code: Inductor takes minutes on a CPU)."""

from __future__ import annotations

import copy
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch._dynamo.utils import counters
from torch._functorch._aot_autograd.autograd_cache import BypassAOTAutogradCache, check_cacheable

from pgttt.ttt import EvalSession, ValSet
from pgttt.ttt.lora import AdapterSet, shapes_for
from pgttt.ttt.phased import run_phased
from pgttt.ttt.phased_compiled import PhasedStep, batch_sizes, bucket, per_token_loss, step_widths
from tests.helpers.phased import phased, stream, tiny_model
from tests.helpers.ttt import one_thread, random_tables  # noqa: F401 (a fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_bucket_pads_to_powers_of_two_and_never_across_a_rotary_limit():
    assert [bucket(w) for w in (1, 24, 32, 33, 48, 2016, 2048)] == [1, 32, 32, 64, 64, 2048, 2048]
    assert [bucket(w, rotary_limit=1000) for w in (24, 600, 1000, 1200)] == [32, 1000, 1000, 1200]
    assert [bucket(w, smallest=256) for w in (24, 256, 257)] == [256, 256, 512]
    assert step_widths(phased(ttt_chunk_size=24, ttt_eval_seq_len=64)) == [24, 48, 64]


def test_compiled_step_equals_plain_and_compiles_nothing_after_warm_up():
    # Chunks of 24 in windows of 32: widths 24 and 32, one graph; 12 documents in 4 batches of 3, two phases
    # (new adapter sets after each: no graph may guard on a set's identity; the global SGD between them runs
    # the model eagerly on longer rows, which must leave nothing a graph guards on).
    ids, nbytes = stream(tokens=900, docs=12, seed=3)
    config = phased(ttt_chunk_size=24, ttt_eval_seq_len=32)
    model = tiny_model(seed=2)
    plain_model = copy.deepcopy(model)
    plain = run_phased(plain_model, ids, nbytes, config)

    step = PhasedStep(backend="aot_eager", smallest_width=1)
    fast = copy.deepcopy(model)
    before = counters["stats"]["unique_graphs"]
    step.warm_up(fast, config)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs - before == 1 and len(step.ready) == 1 and not step.failed
    compiled = run_phased(fast, ids, nbytes, config, chunk_step=step)
    assert counters["stats"]["unique_graphs"] == graphs, "the evaluation compiled after warm-up"

    assert (compiled.tokens, compiled.bytes, compiled.counts) == (plain.tokens, plain.bytes, plain.counts)
    assert len(plain.schedule["phases"]) == 2 and compiled.schedule["pauses"] == plain.schedule["pauses"]
    for a, b in zip(compiled.batches, plain.batches, strict=True):
        assert math.isclose(a.loss_sum, b.loss_sum, rel_tol=1e-6)
    assert math.isclose(compiled.val_bpb, plain.val_bpb, rel_tol=1e-7)
    assert compiled.compliance == plain.compliance
    for p, q in zip(fast.parameters(), plain_model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)  # the global SGD saw the same documents


def test_one_dynamic_graph_runs_every_width_and_batch_unpadded_and_static_graphs_one_per_bucket():
    # Chunks of 8 in windows of 32: the steps' widths are 8, 16, 24 and 32.
    config = phased(ttt_chunk_size=8, ttt_eval_seq_len=32)
    model = tiny_model(seed=4)
    shapes = shapes_for(model, 4, k=config.ttt_k_lora, mlp=config.ttt_mlp_lora, o=config.ttt_o_lora)

    def loss_and_grads(fn, rows, width):
        """The step's losses and adapter gradients on random ids and adapters of warm_up's shapes and scale
        (new tensors each call, as every batch has: Dynamo marks a tensor, not a shape)."""
        gen = torch.Generator().manual_seed(7)
        a = [torch.randn(rows, 4, shapes.model_dim, generator=gen) for _ in shapes.draws()]
        adapters = AdapterSet(shapes, a, config.lora_scale, torch.device("cpu"))
        with torch.no_grad():
            for b in adapters.b:
                b.normal_(generator=gen)  # B = 0 would hide A's gradient and the adapters' share of the loss
        ids, targets = (
            torch.randint(2, 500, (rows, width), generator=gen),
            torch.randint(2, 500, (rows, 8), generator=gen),
        )
        positions = torch.arange(width - 8, width).expand(rows, 8)
        with torch.enable_grad():
            loss = fn(model, ids, positions, targets, adapters, "fp32")
            loss.sum().backward()
        return loss.detach(), [t.grad for t in adapters.parameters()]

    cases = {True: (1, [8, 16, 24, 32] * 2), False: (3, [8, 16, 32, 32])}  # static: buckets 8, 16 and 32
    for dynamic, (graphs_wanted, widths_run) in cases.items():
        step = PhasedStep(backend="aot_eager", smallest_width=1, dynamic=dynamic)
        seen = []
        compiled_fn = step.compiled
        step.compiled = lambda model, x, *rest, fn=compiled_fn, seen=seen: seen.append(x.size(1)) or fn(model, x, *rest)
        before = counters["stats"]["unique_graphs"]
        step.warm_up(model, config, rows=3)
        assert counters["stats"]["unique_graphs"] - before == graphs_wanted and not step.failed
        seen.clear()
        for rows in (3, 2) if dynamic else (3,):  # the dynamic graph's rows are dynamic too
            for width in step_widths(config):
                loss, grads = loss_and_grads(step, rows, width)
                want, want_grads = loss_and_grads(per_token_loss, rows, width)
                torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-5)
                for g, w in zip(grads, want_grads, strict=True):  # fp32 sums in another order, some cancelling
                    torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4 * w.abs().max().item())
        assert counters["stats"]["unique_graphs"] - before == graphs_wanted, f"dynamic={dynamic}: a step compiled"
        assert seen == widths_run  # dynamic: each step at its own width; static: padded to its bucket


def test_a_shape_that_does_not_compile_runs_the_plain_step():
    def broken(graph, example_inputs):
        raise RuntimeError("no code for this graph")

    ids, nbytes = stream(tokens=300, docs=3, seed=4)
    config = phased(
        ttt_chunk_size=32, ttt_eval_seq_len=32, ttt_batch_size=3, phased_ttt_prefix_docs=0, phased_ttt_num_phases=1
    )
    model = tiny_model(seed=1)
    step = PhasedStep(backend=broken, smallest_width=1)
    run = run_phased(copy.deepcopy(model), ids, nbytes, config, chunk_step=step)
    assert len(step.failed) == 1 and not step.ready
    assert "no code for this graph" in next(iter(step.failed.values()))
    plain = run_phased(copy.deepcopy(model), ids, nbytes, config)
    assert np.isclose(run.val_bpb, plain.val_bpb, rtol=1e-7)


def test_the_compiled_step_is_a_graph_aotautograd_caches():
    # A restarted server loads its graphs from the compile cache only if AOTAutograd will cache them: an op it
    # does not know in the traced model (an sdpa_kernel block did this on CUDA, run 22) makes it compile anew.
    verdicts: list[str | None] = []

    def checking(graph, example_inputs):
        try:
            check_cacheable(graph)
            verdicts.append(None)
        except BypassAOTAutogradCache as exc:
            verdicts.append(str(exc))
        return graph.forward

    step = PhasedStep(backend=checking, smallest_width=1)
    step.warm_up(tiny_model(seed=1), phased(ttt_chunk_size=24, ttt_eval_seq_len=32))
    assert step.ready and not step.failed
    assert verdicts and verdicts == [None] * len(verdicts), verdicts


def test_the_session_warms_every_batch_size_of_its_job_then_compiles_nothing():
    ids, _ = stream(tokens=700, docs=8, seed=5)
    val, tables = ValSet.from_tokens(ids), random_tables(1024, seed=5)
    config = replace(phased(ttt_chunk_size=24, ttt_eval_seq_len=32, phased_ttt_prefix_docs=4), compile=True)
    session = EvalSession(tiny_model(seed=3))
    step = PhasedStep(backend="aot_eager", smallest_width=1)
    session.worker(torch.device("cpu"), "fp32").twins[("phased", False)] = step  # the session's step, traced only
    first = session.evaluate(val, tables, config, device="cpu")
    sizes = batch_sizes(val.trimmed(config.seq_len, None), config)
    assert len(sizes) == 2 and 1 not in sizes  # 3 documents, and the last batch's: one graph for both
    assert len(step.ready) == 1 and not step.failed
    graphs = counters["stats"]["unique_graphs"]
    again = session.evaluate(val, tables, config, device="cpu")
    assert counters["stats"]["unique_graphs"] == graphs, "a second job compiled"
    assert again.val_bpb == first.val_bpb  # both from the pristine weights
    assert again.timings["warmup_s"] < first.timings["warmup_s"]
    plain = session.evaluate(val, tables, replace(config, compile=False), device="cpu")
    assert math.isclose(plain.val_bpb, first.val_bpb, rel_tol=1e-7)
    session.evaluate(val, tables, config, device="cpu")  # the plain job left nothing a graph guards on
    assert counters["stats"]["unique_graphs"] == graphs, "a job after a plain one compiled"
