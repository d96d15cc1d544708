"""The phased engine (ttt/phased.py) against the plain reference (tests/phased_reference.py) on random configs.

A tiny seeded frontier model (depth recurrence, so LoRA slots are layer applications, not layers; SmearGate,
the sparse attention gate, the two-lane decoder), in float32, over short streams of a few documents: chunk
sizes, windows smaller and larger than documents, ranks, phases, prefix sizes, partial and one-document
batches, grad steps, warm-started A or not, alpha, the k/o/mlp adapters, and 1 or 8 emulated ranks.
"""

from __future__ import annotations

import copy
import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from phased_reference import chunk_window, find_documents, reference_phased
from ttt_helpers import micro_model, one_thread  # noqa: F401 (a fixture)

from pgttt.checkpoints.config import preset
from pgttt.ttt.config import EvalConfig

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = preset("tiny-frontier").with_overrides({
    "vocab_size": 48, "num_layers": 2, "model_dim": 16, "num_heads": 2, "num_kv_heads": 1, "rope_dims": 4,
    "train_seq_len": 32, "num_loops": 1, "loop_start": 0, "loop_end": 0, "parallel_start_layer": 1,
    "xsa_last_n": 2, "gate_window": 4,
})
MODEL = micro_model(seed=5, config=TINY)
NUM_CASES = 64


def stream(rng: random.Random, docs: int, longest: int) -> tuple[np.ndarray, np.ndarray]:
    """BOS-led documents of random lengths (the last one ends the stream), and random bytes per target."""
    tokens: list[int] = []
    for _ in range(docs):
        tokens += [1] + [rng.randrange(2, TINY.vocab_size) for _ in range(rng.randint(1, longest))]
    target_bytes = [rng.randint(0, 4) for _ in range(len(tokens) - 1)]
    return np.array(tokens, dtype=np.uint16), np.array(target_bytes, dtype=np.int64)


def random_case(seed: int) -> tuple[np.ndarray, np.ndarray, EvalConfig]:
    rng = random.Random(seed)
    docs = rng.randint(1, 6)
    chunk = rng.randint(1, 8)
    # Short streams keep the case fast: one forward and backward per chunk of every document.
    tokens, target_bytes = stream(rng, docs, rng.choice([6, 14, 30]) if chunk > 2 else 6)
    rank = rng.randint(1, 4)
    seq_len = rng.randint(3, 12)
    cfg = EvalConfig(
        protocol="phased",
        seq_len=seq_len,
        stride=seq_len,
        ttt_lora_rank=rank,
        ttt_lora_lr=rng.choice([0.003, 0.03, 0.1]),
        ttt_lora_alpha=rng.choice([float(rank), 2.5 * rank, 1.0]),
        ttt_warm_start_a=rng.random() < 0.6,
        ttt_chunk_size=chunk,
        ttt_eval_seq_len=chunk + rng.choice([0, 1, rng.randint(2, 30)]),
        ttt_batch_size=rng.randint(1, 4),
        ttt_grad_steps=rng.randint(1, 2),
        ttt_optimizer=rng.choice(["adam", "adam", "adam", "sgd"]),
        ttt_beta1=rng.choice([0.0, 0.0, 0.9]),
        ttt_beta2=rng.choice([0.99, 0.999]),
        ttt_eps=1e-10,
        ttt_weight_decay=rng.choice([0.0, 0.5, 1.0]),
        ttt_k_lora=rng.random() < 0.7,
        ttt_mlp_lora=rng.random() < 0.7,
        ttt_o_lora=rng.random() < 0.7,
        phased_ttt_prefix_docs=rng.choice([0, rng.randint(1, docs + 2)]),
        phased_ttt_num_phases=rng.randint(1, 3),
        global_ttt_lr=rng.choice([0.01, 0.05]),
        global_ttt_momentum=rng.choice([0.0, 0.9]),
        global_ttt_epochs=rng.randint(1, 2),
        global_ttt_chunk_tokens=seq_len * rng.randint(1, 4) + rng.randint(0, seq_len - 1),
        global_ttt_batch_seqs=rng.randint(1, 3),
        global_ttt_grad_clip=rng.choice([0.0, 1.0, 0.05]),
        global_ttt_warmup_start_lr=0.001,
        global_ttt_warmup_chunks=rng.choice([0, 0, 1, 2]),
        global_ttt_respect_doc_boundaries=rng.random() < 0.8,
        val_doc_fraction=rng.choice([1.0, 1.0, 1.0, 0.6]),
        max_docs=rng.choice([None, None, None, rng.randint(1, docs)]),
        emulate_ranks=rng.choice([1, 8]),
        seed=rng.randint(0, 1000),
    )
    return tokens, target_bytes, cfg.resolved(TINY, "cpu")


def run_reference(tokens, target_bytes, cfg, model=MODEL):
    return reference_phased(copy.deepcopy(model), tokens, target_bytes, cfg)


# ---- the reference alone ------------------------------------------------------------------------------------
def test_reference_counts_every_target_once_and_its_bytes():
    tokens, target_bytes, cfg = random_case(1000)
    loss, count, nbytes, _ = run_reference(tokens, target_bytes, cfg)
    documents = find_documents(tokens.tolist())
    assert count == sum(length - 1 for _, length in documents) == len(tokens) - 1
    assert nbytes == int(target_bytes.sum())
    assert math.isfinite(loss) and loss > 0


def test_reference_without_learning_is_plain_windows():
    """Both learning rates 0 (and no weight decay): every chunk is scored by the base model in its own window."""
    tokens, target_bytes, cfg = random_case(1001)
    frozen = EvalConfig(**{**cfg.to_dict(), "ttt_lora_lr": 0.0, "global_ttt_lr": 0.0, "global_ttt_warmup_start_lr": 0.0,
                           "phased_ttt_prefix_docs": 3, "val_doc_fraction": 1.0, "max_docs": None})
    loss, _, _, schedule = run_reference(tokens, target_bytes, frozen)
    assert schedule  # the phases ran, and changed nothing
    plain = 0.0
    ids = tokens.tolist()
    with torch.no_grad():
        for start, length in find_documents(ids):
            for c in range(-(-(length - 1) // frozen.ttt_chunk_size)):
                w, c_start, c_end = chunk_window(c, length - 1, frozen.ttt_chunk_size, frozen.ttt_eval_seq_len)
                logits = MODEL(torch.tensor([ids[start + w : start + c_end]]))[0].float()
                targets = torch.tensor(ids[start + w + 1 : start + c_end + 1])
                nll = F.cross_entropy(logits, targets, reduction="none")
                plain += sum(nll[c_start - w :].tolist())
    assert math.isclose(loss, plain, rel_tol=1e-12)
