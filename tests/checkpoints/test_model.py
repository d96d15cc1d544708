"""Structure of the GPT module against spec section 5, and the precision policies' dtypes."""

from __future__ import annotations

import torch

from pgttt.checkpoints.config import PRESETS, resolve_config
from pgttt.checkpoints.model import GPT, apply_precision, init_weights


def spec_state_dict_shapes() -> dict[str, tuple[int, ...]]:
    """The record's state dict as spec section 5 lists it."""
    shapes = {"tok_emb.weight": (8192, 512), "skip_weights": (8, 512), "skip_gates": (8, 512)}
    for i in range(11):
        shapes |= {
            f"blocks.{i}.attn_scale": (512,),
            f"blocks.{i}.mlp_scale": (512,),
            f"blocks.{i}.resid_mix": (2, 512),
            f"blocks.{i}.attn.q_gain": (8,),
            f"blocks.{i}.attn.c_q.weight": (512, 512),
            f"blocks.{i}.attn.c_k.weight": (256, 512),
            f"blocks.{i}.attn.c_v.weight": (256, 512),
            f"blocks.{i}.attn.proj.weight": (512, 512),
            f"blocks.{i}.mlp.fc.weight": (2048, 512),
            f"blocks.{i}.mlp.proj.weight": (512, 2048),
        }
    return shapes


def test_record_state_dict_names_and_shapes_match_spec():
    with torch.device("meta"):
        model = GPT(PRESETS["pg-2026-04-09"])
    assert {n: tuple(t.shape) for n, t in model.state_dict().items()} == spec_state_dict_shapes()


def test_untied_and_gateless_configs_change_the_state_dict():
    with torch.device("meta"):
        names = set(GPT(PRESETS["tiny-flat"]).state_dict())
    assert "lm_head.weight" in names and "skip_gates" not in names


def test_layer_schedule_with_recurrence():
    config = PRESETS["pg-2026-04-09"]
    assert config.layer_schedule() == [0, 1, 2, 3, 4, 5, 3, 4, 5, 3, 4, 5, 6, 7, 8, 9, 10]
    encoder, decoder = config.encoder_decoder()
    assert encoder == [0, 1, 2, 3, 4, 5, 3, 4] and decoder == [5, 3, 4, 5, 6, 7, 8, 9, 10]
    assert config.num_skip_weights == 8
    assert resolve_config(None, {"num_loops": 0}).layer_schedule() == list(range(11))


def test_bf16_policy_keeps_only_the_token_embedding_in_bfloat16():
    model = apply_precision(init_weights(GPT(PRESETS["tiny"]), seed=0), "bf16")
    dtypes = {name: p.dtype for name, p in model.named_parameters()}
    assert dtypes.pop("tok_emb.weight") == torch.bfloat16
    assert dtypes and set(dtypes.values()) == {torch.float32}


def test_fp32_policy_is_float32_everywhere():
    model = apply_precision(GPT(PRESETS["tiny"]).to(torch.bfloat16), "fp32")
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_forward_gives_soft_capped_logits():
    config = PRESETS["tiny"]
    model = init_weights(GPT(config), seed=0).eval()
    ids = torch.randint(0, config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    logits = model(ids)
    assert logits.shape == (2, 16, config.vocab_size)
    assert logits.abs().max() <= config.logit_softcap


def test_hidden_states_at_positions_equal_the_full_forward_there():
    # The scoring fast path runs the last block only at the scored positions; the numbers must not move.
    gen = torch.Generator().manual_seed(1)
    for name in ("tiny", "tiny-flat"):
        config = PRESETS[name]
        model = init_weights(GPT(config), seed=1).eval()
        with torch.no_grad():
            for p in model.parameters():  # zero-initialised projections would hide a wrong gather
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
        ids = torch.randint(0, config.vocab_size, (3, 40), generator=gen)
        positions = torch.stack([torch.arange(30, 40), torch.arange(5, 15), torch.randperm(40, generator=gen)[:10]])
        full = model.forward_hidden(ids)
        expected = full.gather(1, positions[..., None].expand(-1, -1, full.size(-1)))
        torch.testing.assert_close(model.forward_hidden(ids, positions), expected, rtol=0, atol=1e-6)
