"""Frontier models end to end: every family runs forward and backward and round-trips through model.bin;
scored positions, document-masked (varlen) rows and the adapter hooks of per-document TTT."""

from __future__ import annotations

import pytest
import torch

from pgttt.checkpoints.format import TokenizerIdentity, read_model_bin, save_model_bin
from pgttt.checkpoints.loading import build_model, load_checkpoint
from pgttt.checkpoints.quant import quantize_rows
from tests.helpers.frontier import FAMILIES, random_ids, seeded, tiny


@pytest.mark.parametrize("name", FAMILIES)
def test_family_runs_forward_backward_and_round_trips_model_bin(tmp_path, name):
    config = tiny(name)
    model = seeded(config).train()
    ids = random_ids(config, 2, 12, bos_every=5)
    model.loss(ids[:, :-1], ids[:, 1:]).backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert grads["blocks.3.attn.q_gain"].abs().sum() > 0
    if config.smear_gate_enabled:
        assert grads["smear_gate.weight"].abs().sum() > 0 and grads["smear_lambda"].abs().sum() > 0

    tensors = {
        n: quantize_rows(t.detach(), "int6" if t.ndim == 2 and min(t.shape) >= 16 else "float16")
        for n, t in model.state_dict().items()
    }
    path = tmp_path / "model.bin"
    tok = TokenizerIdentity(sha256="cd" * 32, vocab_size=config.vocab_size, name="t.model")
    save_model_bin(path, config, tensors, tokenizer=tok, provenance={"source": "test"})
    mb = read_model_bin(path)
    assert mb.config == config and list(mb.tensors) == list(tensors)
    for n, qt in tensors.items():
        assert torch.equal(mb.tensors[n].q, qt.q) and (qt.scale is None or torch.equal(mb.tensors[n].scale, qt.scale))
    loaded = build_model(load_checkpoint(path), precision="fp32", device="cpu")
    reference = seeded(config)
    reference.load_state_dict({n: qt.dequantize() for n, qt in tensors.items()})
    with torch.no_grad():
        assert torch.equal(loaded(ids), reference.eval()(ids))


@pytest.mark.parametrize("name", FAMILIES)
def test_hidden_states_at_positions_equal_the_full_forward(name):
    config = tiny(name)
    model = seeded(config, seed=2)
    ids = random_ids(config, 3, 20, seed=1, bos_every=7)
    positions = torch.stack([torch.arange(10, 20), torch.arange(0, 10), torch.randperm(20)[:10]])
    full = model.forward_hidden(ids)
    expected = full.gather(1, positions[..., None].expand(-1, -1, full.size(-1)))
    torch.testing.assert_close(model.forward_hidden(ids, positions), expected, rtol=0, atol=1e-5)


# ---- document-masked rows (spec 3.10) -----------------------------------------------------------------
@pytest.mark.parametrize("name", ["pr1530", "pr1855", "pr1736"])
def test_packed_row_equals_each_document_alone(name):
    # RoPE positions are the packed row's, but attention scores depend on position differences only, so
    # each segment of a packed row scores as it does alone. SmearGate's BOS mask (or no SmearGate) keeps
    # documents apart; documents start with BOS.
    config = tiny(name, smear_gate_bos_mask=True)
    model = seeded(config, seed=3)
    docs = [random_ids(config, 1, n, seed=n) for n in (5, 9, 6)]
    for d in docs:
        d[0, 0] = 1
    row = torch.cat(docs, dim=1)
    cu = torch.tensor([0, 5, 14, 20, 20, 20], dtype=torch.int32)  # padded with the row length, as the records do
    packed = model(row, cu_seqlens=cu)
    alone = torch.cat([model(d) for d in docs], dim=1)
    torch.testing.assert_close(packed, alone, rtol=0, atol=2e-5)
    assert not torch.allclose(model(row)[:, 5:], alone[:, 5:], atol=1e-3)  # unmasked attention crosses documents
    positions = torch.tensor([[3, 5, 13, 19]])
    hidden = model.forward_hidden(row, positions, cu_seqlens=cu)
    torch.testing.assert_close(hidden, model.forward_hidden(row, cu_seqlens=cu)[:, positions[0]], rtol=0, atol=1e-5)


def test_smear_is_not_reset_at_a_piece_cut():
    # A 2048-token piece cut inside one document: attention restarts, SmearGate (no BOS there) does not.
    config = tiny("pr1855")
    model = seeded(config, seed=4)
    row = random_ids(config, 1, 10, seed=5)
    cut = torch.tensor([0, 4, 10], dtype=torch.int32)
    hidden = model.forward_hidden(row, cu_seqlens=cut)
    second_alone = model.forward_hidden(row[:, 4:])
    assert not torch.allclose(hidden[:, 4], second_alone[:, 0], atol=1e-4)  # token 4 still smears token 3
    model.smear_lambda.data.zero_()
    torch.testing.assert_close(
        model.forward_hidden(row, cu_seqlens=cut)[:, 4:], model.forward_hidden(row[:, 4:]), rtol=0, atol=2e-5
    )


# ---- adapters (spec 2.6) --------------------------------------------------------------------------
class LinearAdapters:
    """Adapters adding fixed linear maps: delta(slot, site, u) = u @ maps[slot, site].T."""

    def __init__(self, maps: dict, head: torch.Tensor | None = None) -> None:
        self.maps, self.head_map, self.calls = maps, head, []

    def delta(self, slot, site, inp):
        self.calls.append((slot, site))
        w = self.maps.get((slot, site))
        return None if w is None else inp @ w.T

    def head(self, h):
        return None if self.head_map is None else h @ self.head_map.T


def test_adapters_equal_hand_changed_weights():
    # No loops, so slot i is layer i. q/k/v and the head adapter are weight changes; o and mlp add a map of
    # the layer's normalised input to its attention / MLP output, done here with forward hooks.
    config = tiny("pr1855", num_loops=0, tie_embeddings=False)
    model = seeded(config, seed=6)
    gen = torch.Generator().manual_seed(7)
    d, kv = 32, 16
    shapes = {"q": (d, d), "k": (kv, d), "v": (kv, d), "o": (d, d), "mlp": (d, d)}
    maps = {
        (slot, site): 0.1 * torch.randn(shape, generator=gen) for slot in range(4) for site, shape in shapes.items()
    }
    head = 0.1 * torch.randn(64, d, generator=gen)
    ids = random_ids(config, 2, 9, bos_every=4)
    with torch.no_grad():
        adapted = model(ids, adapters=LinearAdapters(maps, head))
        changed = seeded(config, seed=6)
        for i, block in enumerate(changed.blocks):
            for site, linear in (("q", block.attn.c_q), ("k", block.attn.c_k), ("v", block.attn.c_v)):
                linear.weight += maps[i, site]
            block.attn.register_forward_hook(lambda m, args, out, i=i: out + args[0] @ maps[i, "o"].T)
            block.mlp.register_forward_hook(lambda m, args, out, i=i: out + args[0] @ maps[i, "mlp"].T)
        changed.lm_head.weight += head
        torch.testing.assert_close(adapted, changed(ids), rtol=0, atol=1e-5)
        assert not torch.allclose(adapted, model(ids), atol=1e-3)


def test_adapter_slots_follow_the_looped_schedule():
    config = tiny("pr1855")  # 4 layers, loop 1-2 twice: 6 applications
    model = seeded(config)
    stub = LinearAdapters({})
    plain = model(random_ids(config, 1, 6))
    torch.testing.assert_close(model(random_ids(config, 1, 6), adapters=stub), plain, rtol=0, atol=0)
    slots = len(config.layer_schedule())
    assert slots == 6
    assert stub.calls == [(s, site) for s in range(slots) for site in ("q", "k", "v", "o", "mlp")]
    # A map on one slot only changes what that slot computes: the second application of layer 1 (slot 3).
    gen = torch.Generator().manual_seed(8)
    only = LinearAdapters({(3, "mlp"): torch.randn(32, 32, generator=gen)})
    seen: list[torch.Tensor] = []
    model.blocks[1].mlp.register_forward_hook(lambda m, a, out: seen.append(out))
    ids = random_ids(config, 1, 6)
    model(ids)
    model(ids, adapters=only)
    assert len(seen) == 4  # layer 1 runs at slots 1 and 3, twice
    assert torch.equal(seen[0], seen[2]) and not torch.allclose(seen[1], seen[3])


def test_cu_seqlens_must_cover_the_row():
    model = seeded(tiny("pr1530"))
    ids = random_ids(model.config, 1, 8)
    for bad in ([0, 5], [1, 8], [0, 6, 4, 8]):
        with pytest.raises(ValueError, match="cu_seqlens"):
            model(ids, cu_seqlens=torch.tensor(bad))
