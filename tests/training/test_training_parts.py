"""The training job's parts on their own: recipe config, Muon, the sequence loader, GPTQ."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pgttt.checkpoints.config import resolve_config
from pgttt.checkpoints.model import GPT, init_weights
from pgttt.checkpoints.quant import default_scheme, quantize_rows
from pgttt.training.config import TrainConfig, TrainConfigError, resolve_run_config
from pgttt.training.gptq import collect_hessians, gptq_quantize, quantize_model, row_clip
from pgttt.training.loader import LoaderError, SequenceLoader, check_batch_shape, micro_batches
from pgttt.training.muon import Muon, newton_schulz

# ---- TrainConfig ------------------------------------------------------------------------------


def test_set_splits_between_architecture_and_recipe():
    model, train = resolve_run_config("tiny", ["num_layers=5", "matrix_lr=0.05", "muon_wd_attn=0.2", "ema_decay=0.9"])
    assert model.num_layers == 5 and model.model_dim == 64
    assert train.matrix_lr == 0.05 and train.ema_decay == 0.9
    assert train.wd_for("attn") == 0.2 and train.wd_for("mlp") == 0.115


def test_split_weight_decay_defaults_and_none_falls_back_to_muon_wd():
    train = TrainConfig()
    assert (train.wd_for("attn"), train.wd_for("mlp")) == (0.095, 0.115)
    _, train = resolve_run_config(None, ["muon_wd=0.05", "muon_wd_mlp=none"])
    assert (train.wd_for("attn"), train.wd_for("mlp")) == (0.05, 0.05)


@pytest.mark.parametrize(
    "override, message",
    [
        ("matrix_lr=fast", "matrix_lr"),
        ("warmdown_frac=1.5", "warmdown_frac=1.5"),
        ("ema_decay=1", "ema_decay=1.0"),
        ("iterations=0", "iterations=0"),
        ("muon_wd=none", "muon_wd"),
        ("no_such_key=1", "no_such_key"),
        ("muon_row_normalize=maybe", "muon_row_normalize"),
        ("max_wallclock_seconds=10", "leaves no training time after gptq_reserve_seconds=12.0"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(TrainConfigError, match=message):
        resolve_run_config("tiny", [override])


def test_round_trip_through_dict():
    train = TrainConfig(iterations=7, muon_wd_attn=0.3)
    assert TrainConfig.from_dict(train.to_dict()) == train
    with pytest.raises(TrainConfigError, match="bogus"):
        TrainConfig.from_dict({**train.to_dict(), "bogus": 1})


# ---- Muon -------------------------------------------------------------------------------------


def test_newton_schulz_orthogonalizes():
    g = torch.randn(64, 24, generator=torch.Generator().manual_seed(0))
    x = newton_schulz(g, steps=5)
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    sv = torch.linalg.svdvals(x)
    # The quintic's fixed point band is roughly 0.7..1.2, not exactly 1 (by design: speed over precision).
    assert sv.min() > 0.5 and sv.max() < 1.3
    polar = u @ vh
    assert torch.nn.functional.cosine_similarity(x.flatten(), polar.flatten(), dim=0) > 0.95


def test_muon_step_matches_its_definition():
    torch.manual_seed(0)
    w0 = torch.randn(32, 16)
    grads = [torch.randn(32, 16) for _ in range(2)]
    p = torch.nn.Parameter(w0.clone())
    opt = Muon([p], lr=0.1, momentum=0.9, backend_steps=5, row_normalize=True, weight_decay=0.5)
    expected, buf = w0.clone(), torch.zeros(32, 16)
    for g in grads:
        p.grad = g.clone()
        opt.step()
        buf = 0.9 * buf + g
        update = g + 0.9 * buf
        update = update / update.norm(dim=-1, keepdim=True)
        update = newton_schulz(update, 5) * (32 / 16) ** 0.5
        expected = expected * (1 - 0.1 * 0.5) - 0.1 * update
    torch.testing.assert_close(p.detach(), expected, rtol=1e-5, atol=1e-6)


def test_muon_refuses_vectors():
    with pytest.raises(ValueError, match="matrices only"):
        Muon([torch.nn.Parameter(torch.zeros(4))], lr=0.1, momentum=0.9, backend_steps=5)


# ---- loader -----------------------------------------------------------------------------------


def _shards():
    return [np.arange(a, b, dtype=np.uint16) for a, b in ((0, 41), (100, 131), (200, 203))]


def test_loader_visits_every_sequence_once_per_epoch():
    loader = SequenceLoader(_shards(), seq_len=4, seed=3)
    assert loader.num_sequences == 10 + 7 + 0
    first = loader.next_indices(17)
    assert sorted(first.tolist()) == list(range(17))
    rows = loader.sequences(first)
    assert rows.shape == (17, 5)
    # Each row is 5 consecutive tokens of one shard, starting at a multiple of seq_len.
    assert torch.all(rows[:, 1:] - rows[:, :-1] == 1)
    assert sorted(int(r[0]) for r in rows) == [0, 4, 8, 12, 16, 20, 24, 28, 32, 36, 100, 104, 108, 112, 116, 120, 124]
    assert loader.state_dict() == {"epoch": 1, "index": 0}
    assert not np.array_equal(loader.next_indices(17), first)  # a new permutation each epoch


def test_loader_state_resumes_the_same_stream():
    a = SequenceLoader(_shards(), seq_len=4, seed=1)
    a.next_indices(12)
    state = a.state_dict()
    expected = a.next_indices(30)
    b = SequenceLoader(_shards(), seq_len=4, seed=1)
    b.load_state_dict(state)
    assert np.array_equal(b.next_indices(30), expected)
    with pytest.raises(LoaderError, match="index=99"):
        b.load_state_dict({"epoch": 0, "index": 99})


def test_global_batch_does_not_depend_on_world_size():
    one = micro_batches(SequenceLoader(_shards(), 4, seed=2), batch_tokens=32, num_micro=4, rank=0, world_size=1)
    parts = [micro_batches(SequenceLoader(_shards(), 4, seed=2), 32, 4, rank=r, world_size=2) for r in range(2)]
    assert len(one) == 4 and all(b.shape == (2, 5) for b in one)
    assert torch.equal(torch.cat(one), torch.cat([parts[0][0], parts[1][0], parts[0][1], parts[1][1]]))


def test_batch_shape_errors():
    with pytest.raises(LoaderError, match="multiple of the 3 ranks"):
        check_batch_shape(4096, 64, 8, 3)
    with pytest.raises(LoaderError, match="train_batch_tokens=1000"):
        check_batch_shape(1000, 64, 8, 1)
    with pytest.raises(LoaderError, match="no sequence"):
        SequenceLoader([np.zeros(3, dtype=np.uint16)], seq_len=4, seed=0)


# ---- GPTQ -------------------------------------------------------------------------------------


def _correlated_inputs(n: int, d: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    mixing = torch.randn(d, d, generator=gen) * torch.logspace(0, -2, d)[:, None]
    return torch.randn(n, d, generator=gen) @ mixing + 0.01 * torch.randn(n, d, generator=gen)


@pytest.mark.parametrize("scheme, sigmas", [("int6", 3.0), ("int8", 6.0)])
def test_gptq_beats_rounding_in_the_activation_weighted_norm(scheme, sigmas):
    x = _correlated_inputs(4096, 96, seed=0)
    w = torch.randn(80, 96, generator=torch.Generator().manual_seed(1)) * 0.05
    clip = row_clip(w, sigmas)
    gptq = gptq_quantize(w, x.T @ x, scheme, clip, block_size=32)
    rtn = quantize_rows(w, scheme, clip)
    gptq.check("w")
    assert torch.equal(gptq.scale, rtn.scale)  # same clip, same scales: only the rounding differs

    def err(qt):
        return ((w - qt.dequantize()) @ x.T).norm().item()

    assert err(gptq) < 0.8 * err(rtn), (err(gptq), err(rtn))


def test_gptq_handles_dead_inputs_and_block_edges():
    x = _correlated_inputs(512, 40, seed=2)
    x[:, 7] = 0.0  # an input feature that never fires
    w = torch.randn(16, 40, generator=torch.Generator().manual_seed(3))
    qt = gptq_quantize(w, x.T @ x, "int6", row_clip(w, 3.0), block_size=16)
    assert qt.shape == (16, 40) and torch.all(qt.q[:, 7] == 0)


def _quantizable_tiny():
    # Wide enough that the MLP matrices and the tied embedding pass the 65,536-element threshold.
    config = resolve_config("tiny", {"model_dim": 128, "mlp_mult": 5.0})
    return init_weights(GPT(config), seed=0)


def test_hessians_cover_every_quantized_weight():
    model = _quantizable_tiny()
    ids = torch.randint(0, 1024, (2, 16), generator=torch.Generator().manual_seed(0))
    hessians, rows = collect_hessians(model, [ids, ids], precision="fp32")
    state = model.state_dict()
    quantized = {n for n, t in state.items() if default_scheme(n, t) != "float16"}
    assert set(hessians) == quantized and "tok_emb.weight" in quantized and rows == 64
    with torch.no_grad():
        hidden = model.forward_hidden(ids).reshape(-1, 128)
    torch.testing.assert_close(hessians["tok_emb.weight"], 2 * hidden.T @ hidden, rtol=1e-5, atol=1e-4)
    fc = hessians["blocks.0.mlp.fc.weight"]
    torch.testing.assert_close(fc, fc.T)
    assert torch.linalg.eigvalsh(fc.double()).min() > -1e-3


def test_quantize_model_uses_the_challenge_schemes():
    model = _quantizable_tiny()
    ids = torch.randint(0, 1024, (2, 16), generator=torch.Generator().manual_seed(0))
    hessians, _ = collect_hessians(model, [ids], precision="fp32")
    state = model.state_dict()
    out = quantize_model(state, hessians, matrix_clip_sigmas=12.85, embed_clip_sigmas=20.0)
    assert list(out) == list(state)
    for name, qt in out.items():
        qt.check(name)
        assert qt.scheme == default_scheme(name, state[name]) and qt.shape == tuple(state[name].shape)
    assert out["tok_emb.weight"].scheme == "int8" and out["blocks.0.mlp.fc.weight"].scheme == "int6"
    # A passthrough tensor is the float16 weight.
    assert torch.equal(out["blocks.0.attn.c_q.weight"].q, state["blocks.0.attn.c_q.weight"].half())
