"""The engine against the plain reference (tests/helpers/ttt_reference.py) over many random configurations."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pgttt.ttt.chunked import run_chunked
from pgttt.ttt.chunked_compiled import Steps
from pgttt.ttt.config import EvalConfig
from pgttt.ttt.data import DataError, trim_stream
from pgttt.ttt.errors import EvalError
from tests.helpers.ttt import (
    MICRO,
    assert_units_add_up,
    micro_model,
    one_thread,  # noqa: F401 (a fixture)
    random_tables,
)
from tests.helpers.ttt_reference import reference_eval, trim

pytestmark = pytest.mark.usefixtures("one_thread")
MODEL = micro_model(seed=3)
TABLES = random_tables(MICRO.vocab_size, seed=4)
# The engine takes logits only at scored positions, so its float32 logits come from matmuls of other shapes
# than the reference's full ones: each token's loss may differ by a few float32 roundings (~1.2e-7 relative
# each; a unit of one token differed by 1.15e-7). A protocol mistake (one token mis-scored, a wrong weight)
# moves the sum by 1e-4 or more.
LOSS_RTOL = 4e-7


def run_both(tokens: np.ndarray, cfg: EvalConfig, static_shapes: bool = False):
    """The engine (scoring batches padded to batch_seqs rows, as compiled on a GPU, or not) and the reference."""
    cfg = cfg.resolved(MICRO, "cpu")
    engine_model, reference_model = copy.deepcopy(MODEL), copy.deepcopy(MODEL)
    steps = Steps(engine_model, compiled=False, static_shapes=static_shapes)
    run = run_chunked(engine_model, trim_stream(tokens, cfg.seq_len, cfg.max_tokens), TABLES, cfg, steps=steps)
    ref = reference_eval(
        reference_model,
        trim(tokens.tolist(), cfg.seq_len, cfg.max_tokens),
        TABLES.base_bytes.tolist(),
        TABLES.has_leading_space.tolist(),
        TABLES.is_boundary.tolist(),
        seq_len=cfg.seq_len,
        stride=cfg.stride,
        epochs=cfg.ttt_epochs,
        chunk_tokens=cfg.chunk_tokens,
        lr=cfg.ttt_lr,
        momentum=cfg.ttt_momentum,
        batch_seqs=cfg.batch_seqs,
        grad_clip=cfg.grad_clip,
        lr_schedule=cfg.lr_schedule,
        optimizer=cfg.optimizer,
        adapt_include=cfg.adapt_include,
        adapt_exclude=cfg.adapt_exclude,
    )
    return run, ref, engine_model, reference_model


def assert_same(run, ref, engine_model, reference_model):
    assert run.tokens == ref["tokens"]
    assert run.bytes == ref["bytes"]
    assert math.isclose(run.loss_sum, ref["loss_sum"], rel_tol=LOSS_RTOL)
    if ref["val_bpb"] is not None:
        assert math.isclose(run.val_bpb, ref["val_bpb"], rel_tol=LOSS_RTOL)
    for (name, a), b in zip(engine_model.named_parameters(), reference_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"TTT weights differ: {name}")
    assert run.compliance["scored_exactly_once"] and run.compliance["score_before_update"], run.compliance
    assert_units_add_up(run.units, run.loss_sum, run.tokens, run.bytes)
    assert run.units.kind == "chunk" and len(run.units) == len(run.chunks) == len(ref["units"])
    for name in ("first_token", "tokens", "bytes"):
        assert getattr(run.units, name).tolist() == [u[name] for u in ref["units"]], name
    for mine, theirs in zip(run.units.loss_sum.tolist(), ref["units"], strict=True):
        assert math.isclose(mine, theirs["loss_sum"], rel_tol=LOSS_RTOL, abs_tol=1e-9)


@st.composite
def cases(draw):
    seq_len = draw(st.integers(2, 20))  # beyond MICRO's train_seq_len 16 too (RoPE base scaling)
    n = draw(st.integers(seq_len + 1, 150))
    tokens = np.array(draw(st.lists(st.integers(0, MICRO.vocab_size - 1), min_size=n, max_size=n)), dtype=np.uint16)
    epochs = draw(st.integers(0, 2))
    cfg = EvalConfig(
        seq_len=seq_len,
        stride=draw(st.integers(1, seq_len)),
        ttt_epochs=epochs,
        chunk_tokens=draw(st.integers(1, 90)),
        batch_seqs=draw(st.integers(1, 5)),
        ttt_lr=draw(st.sampled_from([0.003, 0.05, 0.3])),
        ttt_momentum=draw(st.sampled_from([0.0, 0.9])),
        lr_schedule=draw(st.sampled_from(["cosine", "constant"])),
        optimizer=draw(st.sampled_from(["sgd", "sgd", "adamw"])),
        adapt_exclude=draw(st.sampled_from([(), (), ("tok_emb.*",), ("blocks.0.*", "skip_*")])),
        max_tokens=draw(st.one_of(st.none(), st.integers(1, n))),
    )
    return tokens, cfg, draw(st.booleans())


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(cases())
def test_engine_equals_plain_reference(case):
    tokens, cfg, static_shapes = case
    targets = len(trim_stream(tokens, cfg.seq_len, cfg.max_tokens)) - 1
    if targets <= cfg.seq_len - cfg.stride:  # the spec's window rule leaves no window at all
        with pytest.raises(EvalError, match="leave no window"):
            run_both(tokens, cfg)
        return
    assert_same(*run_both(tokens, cfg, static_shapes))


@pytest.mark.parametrize(
    "cfg",
    [
        # A short final window (T not a multiple of stride), several windows per chunk, partial batches.
        EvalConfig(seq_len=16, stride=5, ttt_epochs=2, chunk_tokens=40, batch_seqs=3, ttt_lr=0.1),
        # Chunks smaller than the stride: some hold no window and are skipped entirely.
        EvalConfig(seq_len=12, stride=8, ttt_epochs=1, chunk_tokens=3, batch_seqs=2, ttt_lr=0.1),
        # Chunks shorter than seq_len: scored, never trained on.
        EvalConfig(seq_len=16, stride=4, ttt_epochs=1, chunk_tokens=10, batch_seqs=4, ttt_lr=0.1),
        # stride == seq_len: disjoint windows.
        EvalConfig(seq_len=8, stride=8, ttt_epochs=3, chunk_tokens=24, batch_seqs=1, ttt_lr=0.05),
    ],
)
@pytest.mark.parametrize("static_shapes", [False, True])
def test_engine_equals_plain_reference_on_chosen_edges(cfg, static_shapes):
    tokens = np.random.default_rng(7).integers(0, MICRO.vocab_size, 260).astype(np.uint16)
    run, ref, engine_model, reference_model = run_both(tokens, cfg, static_shapes)
    assert_same(run, ref, engine_model, reference_model)
    if cfg.chunk_tokens == 3:
        assert len(run.chunks) < -(-run.tokens // 3)  # some chunks were skipped
    if cfg.chunk_tokens == 10:
        assert all(c.lr is None for c in run.chunks)


def test_epochs_zero_is_the_sliding_window_number():
    """Chunking with epochs 0 changes nothing: the same tokens, bytes and loss as one chunk, and the reference's."""
    tokens = np.random.default_rng(8).integers(0, MICRO.vocab_size, 300).astype(np.uint16)
    sliding = EvalConfig(seq_len=16, stride=4, ttt_epochs=0, chunk_tokens=10**6, batch_seqs=4)
    one_chunk, ref, _, _ = run_both(tokens, sliding)
    chunked, _, _, _ = run_both(tokens, EvalConfig(**{**sliding.to_dict(), "chunk_tokens": 37}))
    assert len(one_chunk.chunks) == 1 and len(chunked.chunks) > 5
    assert (chunked.tokens, chunked.bytes) == (one_chunk.tokens, one_chunk.bytes) == (ref["tokens"], ref["bytes"])
    assert math.isclose(chunked.loss_sum, one_chunk.loss_sum, rel_tol=LOSS_RTOL)
    assert math.isclose(chunked.val_bpb, ref["val_bpb"], rel_tol=LOSS_RTOL)
    # A zero learning rate trains without changing a weight: the sliding number again.
    frozen, _, model, _ = run_both(
        tokens, EvalConfig(**{**sliding.to_dict(), "chunk_tokens": 37, "ttt_epochs": 2, "ttt_lr": 0.0})
    )
    assert any(c.lr == 0.0 for c in frozen.chunks)
    assert math.isclose(frozen.loss_sum, one_chunk.loss_sum, rel_tol=LOSS_RTOL)
    for a, b in zip(model.parameters(), MODEL.parameters(), strict=True):
        assert torch.equal(a, b)


def test_too_short_stream_is_refused():
    with pytest.raises(DataError, match="too few for seq_len=16"):
        run_both(np.arange(16, dtype=np.uint16), EvalConfig(seq_len=16, stride=4))
