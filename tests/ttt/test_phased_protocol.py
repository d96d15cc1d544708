"""The phased engine (ttt/phased.py) against the plain reference (tests/helpers/phased_reference.py) on random configs.

A tiny seeded frontier model (depth recurrence, so LoRA slots are layer applications, not layers; SmearGate,
the sparse attention gate, the two-lane decoder) over short streams of a few documents: chunk sizes, windows
smaller and larger than documents, ranks, phases, prefix sizes, partial and one-document batches, grad steps,
warm-started A or not, alpha, the k/o/mlp adapters, and 1 or 8 emulated ranks.

The engine runs its fp32 policy (no autocast) on a float64 model, every tensor float64 by default: in float32
its batched rows and the reference's one-document rows round differently (~1e-7), and AdamW's
g / (sqrt(v) + 1e-10) amplifies that to 1e-7 .. 1e-3 relative in the loss (10 of 64 configurations), which
would hide protocol mistakes of that size. In float64 the two agree to ~1e-16.
"""

from __future__ import annotations

import copy
import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pgttt.checkpoints.config import preset
from pgttt.ttt.config import EvalConfig
from pgttt.ttt.phased import run_phased
from tests.helpers.phased_reference import (
    chunk_window,
    find_documents,
    phase_schedule,
    reference_phased,
    select_documents,
)
from tests.helpers.ttt import assert_units_add_up, micro_model, one_thread  # noqa: F401 (a fixture)


@pytest.fixture(autouse=True)
def float64():
    """New tensors (the adapters' A draws and B, optimizer state) float64 during each test."""
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(dtype)


pytestmark = pytest.mark.usefixtures("one_thread")

TINY = preset("tiny-frontier").with_overrides(
    {
        "vocab_size": 48,
        "num_layers": 2,
        "model_dim": 16,
        "num_heads": 2,
        "num_kv_heads": 1,
        "rope_dims": 4,
        "train_seq_len": 32,
        "num_loops": 1,
        "loop_start": 0,
        "loop_end": 0,
        "parallel_start_layer": 1,
        "xsa_last_n": 2,
        "gate_window": 4,
    }
)
MODEL = micro_model(seed=5, config=TINY).double()
NUM_CASES = 60
LOSS_RTOL = 1e-9


def stream(rng: random.Random, docs: int, longest: int) -> tuple[np.ndarray, np.ndarray]:
    """BOS-led documents of random lengths (the last one ends the stream), and random bytes per target."""
    tokens: list[int] = []
    for _ in range(docs):
        tokens += [1] + [rng.randrange(2, TINY.vocab_size) for _ in range(rng.randint(1, longest))]
    target_bytes = [rng.randint(0, 4) for _ in range(len(tokens) - 1)]
    return np.array(tokens, dtype=np.uint16), np.array(target_bytes, dtype=np.int64)


def random_case(seed: int) -> tuple[np.ndarray, np.ndarray, EvalConfig]:
    rng = random.Random(seed)
    ranks = rng.choice([1, 8])
    optimizer = rng.choice(["adam", "adam", "adam", "sgd"])
    # A one-token first chunk sees one key: its q and k gradients are zero up to rounding, which AdamW's
    # g / (sqrt(v) + 1e-10) turns into steps of either sign. The two implementations round differently, so
    # that case is left to SGD.
    chunk = rng.choice([1, rng.randint(1, 8)]) if optimizer == "sgd" and ranks == 1 else rng.randint(2, 8)
    # 8 ranks pause only after 8 batches: more, shorter documents in smaller batches, so that documents are
    # still scored after a phase. Short streams keep every case fast (a forward and backward per chunk).
    if ranks == 8:
        batch = rng.choice([1, 1, 1, 2])
        docs = rng.randint(9, 12) if batch == 1 else rng.randint(17, 18)
    else:
        docs, batch = rng.randint(1, 8), rng.choice([1, 2, 2, 2, 3, 4])
    tokens, target_bytes = stream(rng, docs, rng.choice([6, 14, 30]) if chunk > 2 and ranks == 1 else 9)
    rank = rng.randint(1, 4)
    seq_len = rng.randint(2, 6)
    prefix = rng.choice([0, rng.randint(1, docs + 2), rng.randint(1, 4), rng.randint(1, 4)])
    global_chunk = seq_len * rng.randint(1, 2) + rng.randint(0, seq_len - 1)
    if ranks == 8 and rng.random() < 0.5:  # a phase before the last batch, on a stream of several global chunks
        seq_len = rng.randint(2, 3)
        prefix, global_chunk = rng.randint(2, 2 * (-(-docs // batch) - 8)), seq_len + rng.randint(0, 2)
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
        ttt_batch_size=batch,
        ttt_grad_steps=rng.choice([1, 1, 2]),
        ttt_optimizer=optimizer,
        ttt_beta1=rng.choice([0.0, 0.0, 0.9]),
        ttt_beta2=rng.choice([0.99, 0.999]),
        ttt_eps=1e-10,
        ttt_weight_decay=rng.choice([0.0, 0.5, 1.0]),
        ttt_k_lora=rng.random() < 0.7,
        ttt_mlp_lora=rng.random() < 0.7,
        ttt_o_lora=rng.random() < 0.7,
        phased_ttt_prefix_docs=prefix,
        phased_ttt_num_phases=rng.randint(1, 3),
        global_ttt_lr=rng.choice([0.01, 0.05]),
        global_ttt_momentum=rng.choice([0.0, 0.9]),
        global_ttt_epochs=rng.choice([1, 1, 2]),
        global_ttt_chunk_tokens=global_chunk,
        global_ttt_batch_seqs=rng.randint(1, 3),
        global_ttt_grad_clip=rng.choice([0.0, 1.0, 0.05]),
        global_ttt_warmup_start_lr=0.001,
        global_ttt_warmup_chunks=rng.choice([0, 0, 1, 2]),
        global_ttt_respect_doc_boundaries=rng.random() < 0.8,
        val_doc_fraction=rng.choice([1.0, 1.0, 0.6]) if ranks == 1 else 1.0,
        max_docs=rng.choice([None, None, rng.randint(1, docs)]) if ranks == 1 else None,
        emulate_ranks=ranks,
        seed=rng.randint(0, 1000),
    )
    return tokens, target_bytes, cfg.resolved(TINY, "cpu")


def run_reference(tokens, target_bytes, cfg, model=MODEL):
    return reference_phased(copy.deepcopy(model), tokens, target_bytes, cfg)


def test_the_random_cases_cover_the_protocol():
    """What the cases below vary, counted, so that a change of the generator cannot quietly drop a feature."""
    seen: dict[str, int] = {}

    def count(key: str, hit: bool) -> None:
        seen[key] = seen.get(key, 0) + int(hit)

    for seed in range(NUM_CASES):
        tokens, _, cfg = random_case(seed)
        documents = select_documents(find_documents(tokens.tolist()), cfg.val_doc_fraction, cfg.seed, cfg.max_docs)
        lengths = [length for _, length in documents]
        pauses = phase_schedule(
            lengths,
            cfg.ttt_batch_size,
            cfg.phased_ttt_prefix_docs,
            cfg.phased_ttt_num_phases,
            cfg.emulate_ranks,
            cfg.global_ttt_chunk_tokens,
        )
        count("window slides inside a document", max(lengths) - 1 > cfg.ttt_eval_seq_len)
        count("every document inside one window", max(lengths) - 1 <= cfg.ttt_eval_seq_len)
        count("one-document batch", cfg.ttt_batch_size == 1 or len(lengths) % cfg.ttt_batch_size == 1)
        count("partial (tail) batch", len(lengths) % cfg.ttt_batch_size != 0)
        count("phases under 8 ranks", bool(pauses) and cfg.emulate_ranks == 8)
        count("phases under 1 rank", bool(pauses) and cfg.emulate_ranks == 1)
        count("two or more pauses", len(pauses) >= 2)
        trains = any(p["chunks"] >= 2 and p["batches"] < -(-len(lengths) // cfg.ttt_batch_size) for p in pauses)
        count(f"global SGD before more scoring, {cfg.emulate_ranks} rank(s)", trains)
        count("no phases", not pauses)
        count("grad steps 2", cfg.ttt_grad_steps == 2)
        count("warm-started A", cfg.ttt_warm_start_a)
        count("A re-drawn", not cfg.ttt_warm_start_a)
        count("scale alpha / r != 1", cfg.lora_scale != 1.0)
        count("rank > 1", cfg.ttt_lora_rank > 1)
        for site in ("k", "mlp", "o"):
            count(f"no {site} adapter", not getattr(cfg, f"ttt_{site}_lora"))
        count("sgd", cfg.ttt_optimizer == "sgd")
        count("adam beta1 > 0", cfg.ttt_optimizer == "adam" and cfg.ttt_beta1 > 0)
        count("chunk of 1", cfg.ttt_chunk_size == 1)
        count("dense global rows", not cfg.global_ttt_respect_doc_boundaries)
        count("global warm-up", cfg.global_ttt_warmup_chunks > 0 and bool(pauses))
        count("global clip", cfg.global_ttt_grad_clip > 0 and bool(pauses))
        count("val_doc_fraction", cfg.val_doc_fraction < 1)
        count("max_docs", cfg.max_docs is not None)
    assert min(seen.values()) >= 3, seen
    assert seen["phases under 8 ranks"] >= 8 and seen["phases under 1 rank"] >= 8, seen


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
    frozen = EvalConfig(
        **{
            **cfg.to_dict(),
            "ttt_lora_lr": 0.0,
            "global_ttt_lr": 0.0,
            "global_ttt_warmup_start_lr": 0.0,
            "phased_ttt_prefix_docs": 3,
            "val_doc_fraction": 1.0,
            "max_docs": None,
        }
    )
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


# ---- the engine against the reference -----------------------------------------------------------------------
def run_both(seed: int):
    tokens, target_bytes, cfg = random_case(seed)
    engine_model, reference_model = copy.deepcopy(MODEL), copy.deepcopy(MODEL)
    run = run_phased(engine_model, tokens, target_bytes, cfg)
    units: dict = {}
    reference = reference_phased(reference_model, tokens, target_bytes, cfg, units)
    return cfg, run, reference, units, engine_model, reference_model


def assert_same_units(run, units: dict) -> None:
    """One unit per document, in stream order, each the reference's."""
    assert_units_add_up(run.units, run.loss_sum, run.tokens, run.bytes)
    assert run.units.kind == "document" and run.units.first_token.tolist() == sorted(units)
    assert run.units.tokens.tolist() == [units[k][0] for k in sorted(units)]
    assert run.units.bytes.tolist() == [units[k][1] for k in sorted(units)]
    for mine, key in zip(run.units.loss_sum.tolist(), sorted(units), strict=True):
        assert math.isclose(mine, units[key][2], rel_tol=LOSS_RTOL, abs_tol=1e-9), key


@pytest.mark.parametrize("seed", range(NUM_CASES))
def test_engine_equals_plain_reference(seed):
    cfg, run, (loss_sum, count, nbytes, schedule), units, engine_model, reference_model = run_both(seed)
    assert (run.tokens, run.bytes) == (count, nbytes)
    assert math.isclose(run.loss_sum, loss_sum, rel_tol=LOSS_RTOL), (run.loss_sum, loss_sum)
    assert_same_units(run, units)
    assert run.schedule["pauses"] == [p["batches"] for p in schedule]
    assert run.schedule["docs_completed"] == [p["docs_completed"] for p in schedule]
    for phase, mine in zip(run.schedule["phases"], schedule, strict=True):
        assert phase["docs_selected"] == mine["docs_selected"]
        if phase["trained"]:
            assert (phase["stream_tokens"], phase["global_chunks"]) == (mine["tokens"], mine["chunks"])
            assert [c["lr"] for c in phase["chunks"]] == pytest.approx(mine["lr"], rel=1e-12)
    if all(phase["trained"] for phase in run.schedule["phases"]):  # the engine skips a phase nobody scores after
        for (name, a), b in zip(engine_model.named_parameters(), reference_model.parameters(), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, msg=f"weights after the phases differ: {name}")
    assert run.compliance["scored_exactly_once"] and run.compliance["score_before_update"], run.compliance


@pytest.mark.parametrize(("beta1", "phases"), [(0.0, 0), (0.9, 0), (0.9, 1)])
def test_engine_equals_reference_when_kept_a_saw_zero_gradient_steps(beta1, phases):
    """Warm-started A of a slot whose document ended before its batch's longest: AdamW went on decaying it (and,
    with beta1 > 0, moving it) at every later step of that batch, and the slot's next document starts from it."""
    rng = random.Random(7)
    tokens: list[int] = []
    for length in (10, 1, 16, 6, 20, 5, 11, 15):  # batches of 2 by length, every one with uneven chunk counts
        tokens += [1] + [rng.randrange(2, TINY.vocab_size) for _ in range(length)]
    target_bytes = np.array([rng.randint(0, 4) for _ in range(len(tokens) - 1)])
    cfg = EvalConfig(
        protocol="phased",
        seq_len=4,
        stride=4,
        ttt_lora_rank=2,
        ttt_lora_lr=0.05,
        ttt_lora_alpha=4.0,
        ttt_warm_start_a=True,
        ttt_chunk_size=3,
        ttt_eval_seq_len=7,
        ttt_batch_size=2,
        ttt_grad_steps=1,
        ttt_optimizer="adam",
        ttt_beta1=beta1,
        ttt_beta2=0.99,
        ttt_eps=1e-10,
        ttt_weight_decay=2.0,
        ttt_k_lora=True,
        ttt_mlp_lora=True,
        ttt_o_lora=True,
        phased_ttt_prefix_docs=2 * phases,
        phased_ttt_num_phases=max(phases, 1),
        global_ttt_lr=0.01,
        global_ttt_momentum=0.9,
        global_ttt_epochs=1,
        global_ttt_chunk_tokens=5,
        global_ttt_batch_seqs=1,
        global_ttt_grad_clip=1.0,
        global_ttt_warmup_start_lr=0.0,
        global_ttt_warmup_chunks=0,
        global_ttt_respect_doc_boundaries=True,
        val_doc_fraction=1.0,
        emulate_ranks=1,
        seed=3,
    ).resolved(TINY, "cpu")
    tokens_np = np.array(tokens, dtype=np.uint16)
    run = run_phased(copy.deepcopy(MODEL), tokens_np, target_bytes, cfg)
    units: dict = {}
    loss_sum, count, nbytes, schedule = reference_phased(copy.deepcopy(MODEL), tokens_np, target_bytes, cfg, units)
    assert (run.tokens, run.bytes) == (count, nbytes)
    assert_same_units(run, units)
    assert math.isclose(run.loss_sum, loss_sum, rel_tol=LOSS_RTOL), (run.loss_sum, loss_sum)
    assert run.schedule["pauses"] == [p["batches"] for p in schedule] and len(schedule) == phases
