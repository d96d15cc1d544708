"""Tiny seeded models of every frontier record family, for fast CPU tests."""

from __future__ import annotations

import torch

from pgttt.checkpoints.config import PRESETS, ModelConfig
from pgttt.checkpoints.model import GPT, init_weights

# The frontier presets, one per distinct model (aliases left out).
FAMILIES = ["pr1530", "pr1667", "pr1736", "pr1787", "pr1851", "pr1855"]

TINY = {
    "vocab_size": 64,
    "num_layers": 4,
    "model_dim": 32,
    "num_heads": 4,
    "num_kv_heads": 2,
    "mlp_mult": 2.0,
    "rope_dims": 4,
    "train_seq_len": 16,
    "num_loops": 1,
    "loop_start": 1,
    "loop_end": 2,
    "parallel_start_layer": 2,
    "xsa_last_n": 4,
    "gate_window": 6,
}


def tiny(name: str, **overrides) -> ModelConfig:
    """The family of preset ``name`` (its gates, SmearGate, lanes, RoPE) at a size that runs in milliseconds."""
    return PRESETS[name].with_overrides(TINY | overrides)


def seeded(config: ModelConfig, seed: int = 0) -> GPT:
    """A model whose every parameter is random (zero-initialised gates and projections would hide errors)."""
    model = init_weights(GPT(config), seed=seed).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=gen))
    return model


def random_ids(config: ModelConfig, batch: int, seq: int, seed: int = 0, bos_every: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, config.vocab_size, (batch, seq), generator=gen)
    if bos_every:
        ids[:, ::bos_every] = 1
    return ids
