"""EvalSession and the engine's contracts: pristine weights, results, progress, cancellation, compliance."""

from __future__ import annotations

import json
import math
import threading

import numpy as np
import pytest
import torch

from pgttt.checkpoints.config import ModelConfig
from pgttt.checkpoints.model import GPT, init_weights
from pgttt.ttt import EvalCancelled, EvalConfig, EvalError, EvalSession, ValSet, load_val
from pgttt.ttt.chunked import Chunked
from pgttt.ttt.compliance import ComplianceLog, check_compliance
from pgttt.ttt.projection import project_full_eval
from pgttt.ttt.session import ENGINE_VERSION, PROTOCOLS
from tests.helpers.phased import phased, stream, tiny_model
from tests.helpers.ttt import (
    MICRO,
    assert_units_add_up,
    micro_model,
    one_thread,  # noqa: F401 (a fixture)
    random_tables,
    write_shard,
)

pytestmark = pytest.mark.usefixtures("one_thread")
TTT = EvalConfig(seq_len=16, stride=4, ttt_epochs=2, chunk_tokens=48, batch_seqs=2, ttt_lr=0.2)


@pytest.fixture
def val_dir(tmp_path):
    rng = np.random.default_rng(0)
    write_shard(tmp_path / "fineweb_val_000000.bin", rng.integers(0, MICRO.vocab_size, 150))
    write_shard(tmp_path / "fineweb_val_000001.bin", rng.integers(0, MICRO.vocab_size, 150))
    return tmp_path


def comparable(result) -> dict:
    data = result.to_dict()
    data.pop("timings")
    data.pop("tokens_per_second")
    data.pop("projection")
    data.pop("projected_8gpu_s")
    for chunk in data["chunks"]:
        chunk.pop("scoring_s")
        chunk.pop("training_s")
    return data


def test_result_records_what_ran(val_dir, sp1024_tokenizer):
    session = EvalSession(micro_model(), checkpoint_sha256="ab" * 32)
    result = session.evaluate(val_dir, sp1024_tokenizer, TTT, device="cpu")
    data = json.loads(json.dumps(result.to_dict()))  # JSON-ready
    assert data["config"] == {**TTT.to_dict(), "precision": "fp32", "compile": False}
    assert data["identity"]["checkpoint_sha256"] == "ab" * 32
    assert data["identity"]["val_fingerprint"] == load_val(val_dir).fingerprint
    assert len(data["identity"]["tokenizer_sha256"]) == 64
    assert data["identity"]["engine_version"] == ENGINE_VERSION
    assert len(data["identity"]["val_files"]) == 2
    assert data["identity"]["val_byte_files"] == [] and data["identity"]["bytes_from"] == "tokenizer"
    assert data["tokens_scored"] == 288 and data["bytes_scored"] > 0  # 300 tokens trimmed to 18 * 16 + 1
    assert math.isclose(data["val_loss"], data["loss_sum"] / 288)
    assert math.isclose(data["val_bpb"], data["val_loss"] / math.log(2) * 288 / data["bytes_scored"])
    assert data["compliance"]["scored_exactly_once"] and data["compliance"]["score_before_update"]
    assert data["compliance"]["scored_tokens"] == 288 and data["compliance"]["violations"] == []
    assert (data["device"], data["world_size"], data["peak_gpu_memory_bytes"]) == ("cpu", 1, None)
    assert set(data["timings"]) == {"load_s", "data_s", "warmup_s", "scoring_s", "training_s", "eval_s", "total_s"}
    assert data["tokens_per_second"] > 0
    chunks = data["chunks"]
    assert [c["index"] for c in chunks] == list(range(6))  # ceil(288 / 48)
    assert sum(c["scored_tokens"] for c in chunks) == 288
    assert chunks[-1]["running_bpb"] == pytest.approx(data["val_bpb"], rel=1e-12)
    assert [len(c["train_loss"]) for c in chunks] == [2, 2, 2, 2, 2, 0]  # no training after the last chunk
    assert chunks[-1]["lr"] is None and chunks[0]["lr"] == 0.2
    # One unit per chunk, its sums those of the chunk's trace; the JSON names them, the arrays stay apart.
    units = result.units
    assert_units_add_up(units, result.loss_sum, result.tokens_scored, result.bytes_scored)
    assert units.kind == "chunk" and units.tokens.tolist() == [c["scored_tokens"] for c in chunks]
    assert units.bytes.tolist() == [c["scored_bytes"] for c in chunks]
    assert units.first_token[0] == 1 and units.first_token[1] == 48 + 1  # the stream position of target 48
    assert data["units"] == {"kind": "chunk", "count": 6, "identity": units.identity()}
    assert "val_bpb" in result.summary() and "compliance ok" in result.summary()
    projection = data["projection"]
    pgttt, reference = projection["pgttt"], projection["reference"]
    # the full val set of the dataset's family (a folder that names none: SP8192's), not the 288 targets scored
    assert pgttt["tokens"] == 40_540_160
    assert pgttt["seconds"] == pytest.approx(40_540_160 / (8 * data["tokens_per_second"]))
    assert data["projected_8gpu_s"] == pgttt["seconds"] and data["reference_8xh100_s"] == reference["seconds"]
    # the budget is the reference's: the record's script on 8xH100 with these settings, not this engine's speed
    assert projection["decided_by"] == "reference" and projection["fits_budget"] == reference["fits_budget"]
    assert reference["settings"]["ttt_epochs"] == data["config"]["ttt_epochs"] and reference["low"] < reference["high"]


def test_projection_scales_per_device_throughput_to_eight_devices():
    # 2 ranks at 135,000 tok/s together: 67,500 per device, 540,000 on 8, so 75.07 s for 40,540,160 targets.
    projection = project_full_eval(135_000.0, world_size=2)["pgttt"]
    assert projection["seconds"] == pytest.approx(40_540_160 / 540_000)
    assert projection["tokens_per_second_per_gpu"] == 67_500.0
    assert not project_full_eval(8_000.0, world_size=1)["fits_budget"]  # without settings: pgttt's 633 s decides
    caseops = project_full_eval(135_000.0, 2, {"ttt_epochs": 3}, dataset="data/fineweb10B_sp8192_caseops")
    assert caseops["pgttt"]["tokens"] == 47_851_520 and caseops["reference"]["family"] == "caseops"


def test_two_evaluations_in_a_row_start_from_the_same_weights(val_dir, sp1024_tokenizer):
    model = micro_model()
    session = EvalSession(model)
    first = session.evaluate(val_dir, sp1024_tokenizer, TTT, device="cpu")
    second = session.evaluate(val_dir, sp1024_tokenizer, TTT, device="cpu")
    assert comparable(first) == comparable(second)
    # TTT really moved the working model's weights; the caller's model is untouched.
    working = session.worker(torch.device("cpu"), "fp32").model
    assert not torch.equal(working.blocks[0].attn.c_q.weight, model.blocks[0].attn.c_q.weight)
    # A sliding evaluation after TTT equals one on a fresh session.
    sliding = EvalConfig(**{**TTT.to_dict(), "ttt_epochs": 0})
    after = session.evaluate(val_dir, sp1024_tokenizer, sliding, device="cpu")
    fresh = EvalSession(model).evaluate(val_dir, sp1024_tokenizer, sliding, device="cpu")
    assert comparable(after) == comparable(fresh)
    # The same chunks scored: the same units, whatever the weights did to their losses.
    assert first.units.identity() == after.units.identity()
    assert (first.units.loss_sum == second.units.loss_sum).all()
    assert (first.units.loss_sum != after.units.loss_sum).any()
    assert first.val_bpb != after.val_bpb


def test_tokenizer_of_another_checkpoint_is_refused(val_dir, sp1024_tokenizer):
    session = EvalSession(micro_model(), tokenizer_sha256="0" * 64)
    with pytest.raises(EvalError, match="is not the one this checkpoint records"):
        session.evaluate(val_dir, sp1024_tokenizer, TTT, device="cpu")


def test_val_ids_beyond_the_model_vocab_are_refused(tmp_path, sp1024_tokenizer):
    write_shard(tmp_path / "fineweb_val_000000.bin", [1, 2, 3] * 10 + [MICRO.vocab_size])
    with pytest.raises(EvalError, match=f"token id {MICRO.vocab_size} at position 30"):
        EvalSession(micro_model()).evaluate(tmp_path, sp1024_tokenizer, TTT, device="cpu")


def test_adapt_patterns_that_leave_nothing_are_refused():
    val = ValSet.from_tokens(np.random.default_rng(0).integers(0, MICRO.vocab_size, 100))
    with pytest.raises(EvalError, match="no parameter is left to adapt"):
        EvalSession(micro_model()).evaluate(
            val, random_tables(MICRO.vocab_size), EvalConfig(seq_len=16, adapt_exclude=("*",), stride=4), device="cpu"
        )


def test_progress_is_monotonic_and_cancel_stops_within_one_batch(val_dir, sp1024_tokenizer):
    session = EvalSession(micro_model())
    seen = []
    result = session.evaluate(val_dir, sp1024_tokenizer, TTT, device="cpu", progress=seen.append)
    assert {p.phase for p in seen} == {"scoring", "training"}
    for before, after in zip(seen, seen[1:], strict=False):
        assert after.tokens_scored >= before.tokens_scored
        assert after.chunks_done >= before.chunks_done
        assert after.elapsed_s >= before.elapsed_s
    assert all(p.tokens_total == 288 and p.num_chunks == 6 and p.tokens_scored <= 288 for p in seen)
    assert seen[-1].chunks_done == 5 and seen[-1].bpb is not None
    assert seen[0].tokens_scored == 0 and seen[0].loss is None
    assert len(result.chunks) == 6

    cancel = threading.Event()
    batches = []
    model = session.worker(torch.device("cpu"), "fp32").model
    hook = model.tok_emb.register_forward_hook(lambda *_: batches.append(1))

    def stop_at_third(progress):
        if len(seen) == 2:
            cancel.set()
        seen.append(progress)

    seen = []
    try:
        with pytest.raises(EvalCancelled, match="cancelled in chunk 1 of 6"):
            session.evaluate(val_dir, sp1024_tokenizer, TTT, device="cpu", progress=stop_at_third, cancel=cancel)
    finally:
        hook.remove()
    # The batch under way when cancel was set, then nothing: 3 batches, the first in two model calls (window 0
    # runs alone).
    assert len(seen) == 3 and len(batches) == 4


def test_ttt_lowers_bpb_on_a_text_unlike_the_training_text():
    """Pretrain on one synthetic language, evaluate on another: test-time training must help."""
    vocab = 32
    rng = np.random.default_rng(1)

    def language(seed: int, n: int) -> np.ndarray:
        # A sparse first-order Markov chain: each token has 3 likely successors.
        table_rng = np.random.default_rng(seed)
        successors = table_rng.integers(0, vocab, (vocab, 3))
        out = [0]
        for _ in range(n - 1):
            out.append(int(successors[out[-1], rng.integers(0, 3)]))
        return np.array(out, dtype=np.uint16)

    cfg = ModelConfig(**{**MICRO.to_dict(), "vocab_size": vocab, "model_dim": 32, "train_seq_len": 32})
    torch.manual_seed(0)
    model = init_weights(GPT(cfg), 0)
    source = torch.from_numpy(language(10, 20_000).astype(np.int64))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(250):
        starts = torch.randint(0, len(source) - 33, (16,))
        batch = torch.stack([source[s : s + 33] for s in starts])
        opt.zero_grad()
        model.loss(batch[:, :-1], batch[:, 1:]).backward()
        opt.step()

    target = ValSet.from_tokens(language(20, 3000))
    tables = random_tables(vocab, seed=2)
    session = EvalSession(model)
    base = EvalConfig(seq_len=32, stride=16, chunk_tokens=256, batch_seqs=8, ttt_lr=0.05, ttt_momentum=0.9)
    sliding = session.evaluate(target, tables, EvalConfig(**{**base.to_dict(), "ttt_epochs": 0}), device="cpu")
    ttt = session.evaluate(target, tables, EvalConfig(**{**base.to_dict(), "ttt_epochs": 2}), device="cpu")
    in_domain = session.evaluate(
        ValSet.from_tokens(language(10, 3000)), tables, EvalConfig(**{**base.to_dict(), "ttt_epochs": 0}), device="cpu"
    )
    assert in_domain.val_bpb < sliding.val_bpb  # the pretraining learned the source language
    assert ttt.val_bpb < sliding.val_bpb - 0.1, (ttt.val_bpb, sliding.val_bpb)
    assert ttt.compliance["score_before_update"]


# ---- the compliance checker on fabricated logs ----------------------------------------------------


def legal_log() -> ComplianceLog:
    log = ComplianceLog()
    log.score(0, [(1, 11)], 10)
    log.train(0, [(0, 11)])
    log.score(1, [(11, 21)], 10)
    return log


def test_checker_accepts_a_legal_log():
    record = check_compliance(legal_log(), 20)
    assert record["scored_exactly_once"] and record["score_before_update"] and record["violation_count"] == 0
    assert (record["score_spans"], record["train_spans"], record["trained_positions"]) == (2, 1, 11)


def test_checker_catches_training_on_unscored_tokens():
    log = ComplianceLog()
    log.score(0, [(1, 11)], 10)
    log.train(0, [(5, 13)])  # positions 11 and 12 belong to chunk 1, not yet scored
    log.score(1, [(11, 21)], 10)
    record = check_compliance(log, 20)
    assert record["scored_exactly_once"] and not record["score_before_update"]
    assert record["violations"] == ["chunk 0 trained on positions 5..12 before they were all scored"]


def test_checker_catches_training_before_scoring_even_if_scored_later():
    log = ComplianceLog()
    log.train(0, [(0, 5)])
    log.score(0, [(1, 21)], 20)
    assert not check_compliance(log, 20)["score_before_update"]


@pytest.mark.parametrize(
    ("spans", "observed", "message"),
    [
        ([(1, 11), (9, 21)], 22, "positions 9..10 scored more than once (chunk 0)"),
        ([(1, 8), (11, 21)], 17, "positions 8..10 never scored"),
        ([(1, 15)], 14, "positions 15..20 never scored"),
        ([(1, 23)], 22, "positions 21..22 scored beyond the end of the stream"),
        ([(1, 21)], 19, "19 tokens counted by the scoring batches and 20 in scored spans, for 20 targets"),
    ],
)
def test_checker_catches_scoring_faults(spans, observed, message):
    log = ComplianceLog()
    log.score(0, spans, observed)
    record = check_compliance(log, 20)
    assert not record["scored_exactly_once"]
    assert message in record["violations"]


def test_merged_rank_logs_order_scoring_before_training():
    rank0, rank1 = ComplianceLog(), ComplianceLog()
    rank0.score(0, [(1, 6)], 5)
    rank0.train(0, [(0, 11)])  # rank 1's half of chunk 0 is scored before any update (the all-reduce waits)
    rank1.score(0, [(6, 11)], 5)
    rank0.score(1, [(11, 16)], 5)
    rank1.score(1, [(16, 21)], 5)
    record = check_compliance(ComplianceLog.merge([rank0, rank1]), 20)
    assert record["scored_exactly_once"] and record["score_before_update"]


@pytest.mark.parametrize("allowed", [True, False])
def test_a_protocol_warms_up_and_runs_with_its_own_cudnn_attention_choice(val_dir, sp1024_tokenizer, allowed):
    # Compiled graphs bake in the SDPA kernel chosen while they are traced, so the session sets the protocol's
    # choice around its warm-up and its run, and gives the process its own setting back afterwards.
    seen: list[tuple[str, bool]] = []

    class Recording(Chunked):
        cudnn_attention = allowed

        def warm_up(self, *args, **kwargs):
            seen.append(("warm_up", torch.backends.cuda.cudnn_sdp_enabled()))
            return super().warm_up(*args, **kwargs)

        def run(self, *args, **kwargs):
            seen.append(("run", torch.backends.cuda.cudnn_sdp_enabled()))
            return super().run(*args, **kwargs)

    before = torch.backends.cuda.cudnn_sdp_enabled()
    session = EvalSession(micro_model())
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(PROTOCOLS, "chunked", Recording())
        session.evaluate(val_dir, sp1024_tokenizer, TTT, device="cpu")
        session.warmup(TTT, device="cpu")
    assert seen == [("warm_up", allowed), ("run", allowed), ("warm_up", allowed)]
    assert torch.backends.cuda.cudnn_sdp_enabled() == before


def test_a_phased_job_runs_without_cudnn_attention_and_a_chunked_job_with_it(val_dir, sp1024_tokenizer):
    # cuDNN plans every new shape on the host: the phased step's (rows, width) change at every step, chunked TTT's
    # windows have one length. Each job starts from the process setting it must not keep.
    ids, _ = stream(tokens=700, docs=8, seed=5)
    jobs = {
        "phased": (tiny_model(seed=3), ValSet.from_tokens(ids), random_tables(1024, seed=5), phased()),
        "chunked": (micro_model(), val_dir, sp1024_tokenizer, TTT),
    }
    seen: dict[str, bool] = {}
    before = torch.backends.cuda.cudnn_sdp_enabled()
    try:
        with pytest.MonkeyPatch.context() as patch:
            for name, (model, val, tokenizer, config) in jobs.items():
                protocol = PROTOCOLS[name]

                def run(*args, _run=protocol.run, _name=name, **kwargs):
                    seen[_name] = torch.backends.cuda.cudnn_sdp_enabled()
                    return _run(*args, **kwargs)

                patch.setattr(protocol, "run", run)
                torch.backends.cuda.enable_cudnn_sdp(name == "phased")
                EvalSession(model).evaluate(val, tokenizer, config, device="cpu")
    finally:
        torch.backends.cuda.enable_cudnn_sdp(before)
    assert seen == {"phased": False, "chunked": True}
