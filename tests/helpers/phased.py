"""A tiny frontier model and a BOS-delimited stream for the phased protocol's tests."""

from __future__ import annotations

import numpy as np
import torch

from pgttt.checkpoints.config import PRESETS
from pgttt.checkpoints.model import GPT, init_weights
from pgttt.ttt.config import EvalConfig

TINY = PRESETS["tiny-frontier"]  # SmearGate, sparse gate, two lanes, loops: every adapter site in use


def tiny_model(seed: int = 0) -> GPT:
    model = init_weights(GPT(TINY), seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return model.eval().requires_grad_(False)


def stream(tokens: int = 1400, docs: int = 14, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Tokens starting with BOS with ``docs`` documents of varied lengths, and per-target bytes."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(2, TINY.vocab_size, tokens)
    ids[rng.choice(np.arange(2, tokens - 2), docs - 1, replace=False)] = 1
    ids[0] = 1
    return ids, rng.integers(0, 5, tokens - 1)


def phased(**knobs) -> EvalConfig:
    base = dict(
        protocol="phased",
        seq_len=128,
        ttt_lora_rank=4,
        ttt_chunk_size=32,
        ttt_eval_seq_len=64,
        ttt_batch_size=3,
        phased_ttt_prefix_docs=8,
        phased_ttt_num_phases=2,
        global_ttt_chunk_tokens=128,
        global_ttt_batch_seqs=1,
        ttt_lora_lr=3e-3,
        global_ttt_lr=3e-2,
        seed=7,
        emulate_ranks=1,
    )
    return EvalConfig(**{**base, **knobs}).resolved(TINY, "cpu")
