"""The frontier architecture (spec section 3): one formula per knob against a hand computation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pgttt.checkpoints.config import ConfigError, resolve_config
from pgttt.checkpoints.layers import Rotary, exclude_self_value, rms_norm
from pgttt.checkpoints.model import GPT
from tests.helpers.frontier import random_ids, seeded, tiny


# ---- SmearGate (3.2) ----------------------------------------------------------------------------
@pytest.mark.parametrize("bos_mask", [True, False])
def test_smear_gate_formula(bos_mask):
    config = tiny("pr1855", smear_gate_bos_mask=bos_mask)
    model = seeded(config)
    ids = random_ids(config, 2, 10, bos_every=4)  # BOS at 0, 4, 8
    e = model.tok_emb.weight[ids]
    w, lam = model.smear_gate.weight[0], model.smear_lambda[0]
    expected = e.clone()
    for b in range(2):
        for t in range(1, 10):
            g = lam * torch.sigmoid((w * e[b, t, :6]).sum())
            keep = 0.0 if bos_mask and ids[b, t] == 1 else 1.0
            expected[b, t] = e[b, t] + g * e[b, t - 1] * keep
    torch.testing.assert_close(model.embed(ids), rms_norm(expected), rtol=0, atol=1e-6)


# ---- attention output gates (3.3) ---------------------------------------------------------------
def gate_case(name: str, **overrides):
    config = tiny(name, **overrides)
    attn = seeded(config).blocks[1].attn
    gen = torch.Generator().manual_seed(3)
    y = torch.randn(2, 5, 4, 8, generator=gen)
    a, q_raw = torch.randn(2, 5, 32, generator=gen), torch.randn(2, 5, 32, generator=gen)
    return attn, y, a, q_raw


def test_sparse_gate_is_sigmoid_of_scaled_window():
    attn, y, a, q_raw = gate_case("pr1855")
    G = attn.attn_gate_w  # (heads, gate_window)
    g = torch.sigmoid(0.5 * torch.einsum("hw,btw->bth", G, a[..., :6]))
    torch.testing.assert_close(attn.gate_heads(y, a, q_raw), y * g[..., None], rtol=0, atol=1e-6)


def test_dense_gate_is_sigmoid_of_full_input():
    attn, y, a, q_raw = gate_case("pr1736")
    assert attn.attn_gate_w.shape == (4, 32)
    g = 1.0 / (1.0 + torch.exp(-(a @ attn.attn_gate_w.T)))
    torch.testing.assert_close(attn.gate_heads(y, a, q_raw), y * g[..., None], rtol=0, atol=1e-6)


@pytest.mark.parametrize("src", ["proj", "q"])
def test_attn_out_gate_is_twice_sigmoid_of_window(src):
    attn, y, a, q_raw = gate_case("pr1667", attn_out_gate_src=src)
    P = attn.attn_gate_proj.weight
    source = a if src == "proj" else q_raw
    g = 2.0 * torch.sigmoid(source[..., :6] @ P.T)
    torch.testing.assert_close(attn.gate_heads(y, a, q_raw), y * g[..., None], rtol=0, atol=1e-6)


def test_gates_are_mutually_exclusive():
    with pytest.raises(ConfigError, match="mutually exclusive"):
        resolve_config("pr1855", {"gated_attn_enabled": True})


# ---- rotary without scaling (3.4), XSA ----------------------------------------------------------
def test_rope_yarn_off_never_scales_the_base():
    cos, sin = Rotary(16, 10000.0, train_seq_len=8, yarn=False).cos_sin(40, torch.device("cpu"), torch.float32)
    t, k = 37, 3
    angle = t * 10000.0 ** (-2 * k / 16)
    assert cos[0, t, 0, k].item() == pytest.approx(math.cos(angle), abs=1e-6)
    assert sin[0, t, 0, k].item() == pytest.approx(math.sin(angle), abs=1e-6)
    scaled, _ = Rotary(16, 10000.0, train_seq_len=8, yarn=True).cos_sin(40, torch.device("cpu"), torch.float32)
    assert not torch.allclose(scaled, cos)  # the 04-09 model's long-row scaling differs


def test_xsa_removes_the_component_along_the_own_value():
    gen = torch.Generator().manual_seed(0)
    y, v = torch.randn(1, 3, 4, 8, generator=gen), torch.randn(1, 3, 2, 8, generator=gen)
    out = exclude_self_value(y, v)
    for h in range(4):
        vn = v[0, :, h // 2] / v[0, :, h // 2].norm(dim=-1, keepdim=True)
        expected = y[0, :, h] - (y[0, :, h] * vn).sum(-1, keepdim=True) * vn
        torch.testing.assert_close(out[0, :, h], expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize(("n", "layers"), [(20, [0, 1, 2, 3]), (4, [0, 1, 2, 3]), (2, [2, 3]), (0, []), (-3, [])])
def test_xsa_last_n_is_clamped_as_the_script_does(n, layers):
    with torch.device("meta"):
        model = GPT(tiny("pr1855", xsa_last_n=n))
    assert [i for i, b in enumerate(model.blocks) if b.attn.use_xsa] == layers


# ---- lanes (3.5), skips (3.6), loops (3.7) ------------------------------------------------------
def test_two_lane_decoder_mixing_by_hand():
    # 2 layers, no loops: encoder [0], decoder [1] with two lanes from layer 1.
    config = tiny("pr1855", num_layers=2, num_loops=0, parallel_start_layer=1, smear_gate_enabled=False)
    model = seeded(config)
    ids = random_ids(config, 2, 7)
    b0, b1 = model.blocks
    x0 = rms_norm(model.tok_emb.weight[ids])
    x = b0(x0, x0)
    s = model.skip_weights[0] * x
    lane0 = s + torch.sigmoid(model.skip_gates[0]) * (x - s)
    lane1 = x
    m0, m1 = b1.resid_mix
    f = 1 / math.sqrt(2)
    A = b1.attn_scale * b1.attn(rms_norm(m0 * lane0 + m1 * x0) * f)
    M = b1.mlp_scale * b1.mlp(rms_norm(lane1) * f)
    rho, pi = model.parallel_resid_lambdas[1], model.parallel_post_lambdas[1]
    new0 = rho[0] * lane0 + pi[0, 0] * A + pi[1, 0] * M
    new1 = rho[1] * lane1 + pi[0, 1] * A + pi[1, 1] * M
    torch.testing.assert_close(model.forward_hidden(ids), rms_norm(0.5 * (new0 + new1)), rtol=0, atol=1e-5)


def test_skip_gate_formula_by_hand():
    config = tiny("pr1855", num_layers=2, num_loops=0, parallel_start_layer=0, smear_gate_enabled=False)
    model = seeded(config)
    assert model.lane_start is None and model.parallel_post_lambdas.shape == (2, 2, 2)  # held, unused
    ids = random_ids(config, 1, 6)
    x0 = rms_norm(model.tok_emb.weight[ids])
    e0 = model.blocks[0](x0, x0)
    s = model.skip_weights[0] * e0
    x = s + torch.sigmoid(model.skip_gates[0]) * (e0 - s)
    torch.testing.assert_close(model.forward_hidden(ids), rms_norm(model.blocks[1](x, x0)), rtol=0, atol=1e-6)


def test_loops_apply_the_scripts_schedule():
    config = tiny("pr1855", num_layers=6, loop_start=2, loop_end=3, num_loops=2, parallel_start_layer=4)
    model = seeded(config)
    order: list[int] = []
    for i, block in enumerate(model.blocks):
        block.attn.register_forward_hook(lambda m, a, o, i=i: order.append(i))
    model.forward_hidden(random_ids(config, 1, 5))
    assert order == [0, 1, 2, 3, 2, 3, 2, 3, 4, 5] == config.layer_schedule()
    # The scripts' formula for loop_end < loop_start repeats nothing (accepted, as the scripts do).
    assert resolve_config("pr1855", {"loop_start": 5, "loop_end": 2}).layer_schedule() == [0, 1, 2, 3, 4] + list(
        range(3, 11)
    )


@pytest.mark.parametrize("lane", ["mean", "attn", "mlp"])
def test_final_lane(lane):
    model = GPT(tiny("pr1855", parallel_final_lane=lane.upper() if lane == "mlp" else lane))
    a, b = torch.ones(2), torch.full((2,), 3.0)
    assert model.final_lane(a, b).tolist() == {"mean": [2.0, 2.0], "attn": [1.0, 1.0], "mlp": [3.0, 3.0]}[lane]


# ---- the config accepts what the scripts accept, refuses what they cannot run ---------------------
def test_config_clamps_and_bounds():
    assert resolve_config("pr1855", {"num_loops": -1}).layer_schedule() == list(range(11))
    assert resolve_config("pr1855", {"rope_dims": 0}).rotary_dims == 64
    assert GPT(tiny("pr1855", parallel_start_layer=-2)).lane_start is None
    for overrides, key in [
        ({"num_layers": 8000}, "num_layers=8000"),
        ({"model_dim": 1 << 20}, "model_dim"),
        ({"gate_window": 600}, "gate_window=600"),
        ({"parallel_residual_start": 7}, "frontier"),
        ({"family": "2026-04-09"}, "parallel_residual_start"),
        ({"num_loops": 99}, "num_loops"),
        ({"sparse_attn_gate_scale": float("nan")}, "finite"),
        ({"family": "x"}, "family='x'"),
    ]:
        with pytest.raises(ConfigError, match=key):
            resolve_config("pr1855", overrides)
    with pytest.raises(ConfigError, match="parallel_start_layer"):
        resolve_config("pg-2026-04-09", ["parallel_start_layer=8"])
    assert (
        resolve_config(
            "pr1855",
            ["parallel_start_layer=none", "family=2026-04-09", "parallel_final_lane=null", "parallel_residual_start=7"],
        ).num_parameters()
        == 35_944_536 + 13 + 11 * 96
    )


def test_bf16_policy_on_a_frontier_model():
    from pgttt.checkpoints.model import apply_precision

    model = apply_precision(seeded(tiny("pr1855")), "bf16")
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    assert dtypes.pop("tok_emb.weight") == torch.bfloat16 and set(dtypes.values()) == {torch.float32}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(random_ids(model.config, 1, 8))
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()


def test_cross_entropy_loss_matches_logits():
    model = seeded(tiny("pr1851"))
    ids = random_ids(model.config, 2, 9)
    expected = F.cross_entropy(model(ids[:, :-1]).reshape(-1, 64), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(model.loss(ids[:, :-1], ids[:, 1:]), expected)
