"""The records' document-masked ``eval_val`` (frontier spec 2.12): its batching and truncation, and its
scores against a plain twin that runs every segment of every packed row as a row of its own."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pgttt.checkpoints.config import PRESETS
from pgttt.checkpoints.format import save_model_bin, tokenizer_identity
from pgttt.checkpoints.model import GPT, init_weights
from pgttt.checkpoints.quant import default_scheme, quantize_rows
from pgttt.main import main
from pgttt.ttt import EvalConfig, EvalError, EvalSession, ValSet
from pgttt.ttt.doc_masked import plan_doc_masked, run_doc_masked
from tests.conftest import shared_path
from tests.helpers.frontier import seeded, tiny
from tests.helpers.ttt import assert_units_add_up, one_thread, random_tables  # noqa: F401 (a fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_compat_case_batching():
    # eval_val_16k: 16,384 targets, VAL_BATCH_TOKENS=65536 on one rank = 8 steps of 8,192 tokens:
    # "2 batches of 4 x 2048 packed tokens", nothing truncated.
    plan = plan_doc_masked(16_384, 2048, 65_536, 1)
    assert plan.batch_seqs == 4 and plan.batches(0) == [(0, 4), (4, 8)]
    assert plan.scored_targets == 16_384 and plan.unscored_spans() == []


def test_the_records_batching_on_eight_ranks_truncates_each_share():
    # CaseOps val, 8 ranks, VAL_BATCH_TOKENS=524288: rows of 32 x 2048. 23,365 sequences; each rank's
    # 2,920 or 2,921 are cut to 91 batches = 2,912 sequences, so 69 sequences are never scored.
    plan = plan_doc_masked(47_851_520, 2048, 524_288, 8)
    assert plan.batch_seqs == 32 and plan.total_seqs == 23_365
    assert all(end - start == 2912 for start, end in plan.shares)
    assert plan.scored_targets == 8 * 2912 * 2048 == 47_710_208
    gaps = plan.unscored_spans()
    assert len(gaps) == 8 and sum(b - a for a, b in gaps) == 69 * 2048
    assert gaps[0] == (2912 * 2048 + 1, 2920 * 2048 + 1)  # rank 0's tail, as stream positions
    assert gaps[-1][1] == 47_851_521
    # One rank: 23,360 of them; the last 5 sequences stay unscored.
    plan = plan_doc_masked(47_851_520, 2048, 524_288, 1)
    assert plan.batch_seqs == 32 and plan.unscored_spans() == [(23_360 * 2048 + 1, 47_851_521)]


def test_targets_past_the_last_whole_sequence_are_unscored():
    plan = plan_doc_masked(5000, 1024, 8 * 1024 * 2, 1)  # 4 sequences, batches of 2
    assert plan.batches(0) == [(0, 2), (2, 4)] and plan.unscored_spans() == [(4097, 5001)]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((4096, 16, 256, 3), "world size 3"),
        ((4096, 2048, 8192, 1), "val_batch_tokens=8192: must give every rank at least one sequence"),
    ],
)
def test_impossible_batching_is_refused(args, message):
    with pytest.raises(EvalError, match=message):
        plan_doc_masked(*args)


def segments(row: np.ndarray, seq_len: int) -> list[tuple[int, int]]:
    """Document pieces of a packed row, by the spec's words: from each BOS (and 0), cut every seq_len."""
    starts = [0] + [i for i in range(1, len(row)) if row[i] == 1]
    pieces = []
    for s, e in zip(starts, [*starts[1:], len(row)], strict=True):
        pieces.extend((a, min(a + seq_len, e)) for a in range(s, e, seq_len))
    return pieces


def twin(
    model, tokens: np.ndarray, entries: np.ndarray, seq_len: int, batch_seqs: int, units: dict
) -> tuple[float, int, int]:
    """Every segment of every packed row scored as a row of its own (RoPE is relative and SmearGate is
    reset at BOS, so only the attention mask can differ; piece cuts only matter without SmearGate). ``units``
    gets each document's [first scored position, tokens, bytes, loss] under the position of its BOS."""
    total = len(tokens) - 1
    seqs = total // seq_len // batch_seqs * batch_seqs  # one rank
    loss, count, nbytes = 0.0, 0, 0
    for first in range(0, seqs, batch_seqs):
        a, b = first * seq_len, (first + batch_seqs) * seq_len
        row = tokens[a : b + 1]
        for s, e in segments(row[:-1], seq_len):
            x = torch.tensor(row[s:e], dtype=torch.long)[None]
            y = torch.tensor(row[s + 1 : e + 1], dtype=torch.long)
            with torch.no_grad():
                piece = float(F.cross_entropy(model(x)[0].float(), y, reduction="sum"))
            piece_bytes = int(entries[a + s + 1 : a + e + 1].sum())
            loss, count, nbytes = loss + piece, count + e - s, nbytes + piece_bytes
            bos = max([i for i in range(a + s + 1) if tokens[i] == 1], default=-1)
            unit = units.setdefault(bos, [a + s + 1, 0, 0, 0.0])
            unit[1:] = [unit[1] + e - s, unit[2] + piece_bytes, unit[3] + piece]
    return loss, count, nbytes


def stream(seed: int, total: int, longest: int) -> tuple[np.ndarray, np.ndarray]:
    """Documents of 2..longest tokens (BOS + ids), and a sidecar (0 at BOS)."""
    rng = np.random.default_rng(seed)
    tokens = []
    while len(tokens) < total:
        tokens += [1, *rng.integers(2, 64, int(rng.integers(1, longest))).tolist()]
    tokens = np.array(tokens[:total])
    return tokens, np.where(tokens == 1, 0, rng.integers(1, 5, total))


@pytest.mark.parametrize(("preset", "longest"), [("pr1855", 14), ("pr1787", 40)])
def test_scores_equal_each_segment_alone(preset, longest):
    # pr1855: SmearGate with the BOS mask, documents shorter than a sequence (rows start mid-document);
    # pr1787: no SmearGate, documents up to 40 tokens, so pieces are cut every 16 from a document's start.
    model = seeded(tiny(preset))
    tokens, entries = stream(0, 16 * 5 + 8, longest)  # 87 targets: 5 sequences of 16, batches of 2
    config = EvalConfig(protocol="doc_masked", seq_len=16, val_batch_tokens=8 * 16 * 2).resolved(model.config, "cpu")
    val = ValSet.from_tokens(tokens, entries)
    run = run_doc_masked(model, val.trimmed(16), val.byte_source(random_tables(64)), config)
    units: dict = {}
    loss, count, nbytes = twin(model, tokens, entries, 16, 2, units)
    assert (run.tokens, run.bytes) == (count, nbytes) == (64, int(entries[1:65].sum()))
    assert run.loss_sum == pytest.approx(loss, rel=1e-6)  # (a dense row, or no piece cuts: 1e-2 apart)
    assert_units_add_up(run.units, run.loss_sum, run.tokens, run.bytes)
    expected = [units[bos] for bos in sorted(units)]
    assert run.units.kind == "document" and len(run.units) == len(expected) > 2
    assert run.units.first_token.tolist() == [u[0] for u in expected]
    assert run.units.tokens.tolist() == [u[1] for u in expected]
    assert run.units.bytes.tolist() == [u[2] for u in expected]
    assert run.units.loss_sum.tolist() == pytest.approx([u[3] for u in expected], rel=1e-6)
    assert [c.scored_tokens for c in run.chunks] == [32, 32] and [c.windows for c in run.chunks] == [2, 2]
    assert run.compliance["unscored_spans"] == [[65, 81]]  # sequence 4, cut by the truncation to whole batches
    assert run.compliance["unscored_targets"] == 16 and not run.compliance["scored_exactly_once"]
    assert run.compliance["violations"] == []


def test_through_the_session_with_sidecar_and_lut_bytes():
    model = seeded(tiny("pr1855"))
    tokens, entries = stream(1, 16 * 4 + 1, 14)
    config = EvalConfig(protocol="doc_masked", seq_len=16, val_batch_tokens=8 * 16 * 2)
    session = EvalSession(model)
    tables = random_tables(64)
    side = session.evaluate(ValSet.from_tokens(tokens, entries), tables, config, device="cpu")
    lut = session.evaluate(ValSet.from_tokens(tokens), tables, config, device="cpu")
    assert side.loss_sum == lut.loss_sum and side.tokens_scored == lut.tokens_scored == 64
    assert side.bytes_scored == int(entries[1:].sum())
    assert lut.bytes_scored == int(tables.target_bytes(tokens).sum())
    assert side.compliance["scored_exactly_once"] and side.compliance["unscored_targets"] == 0
    assert_units_add_up(side.units, side.loss_sum, side.tokens_scored, side.bytes_scored)
    assert side.units.identity() != lut.units.identity()  # the same documents, other byte counts
    assert (side.units.first_token == lut.units.first_token).all() and side.units.kind == "document"
    assert side.to_dict()["units"] == {"kind": "document", "count": len(side.units), "identity": side.units.identity()}
    assert side.config["protocol"] == "doc_masked" and side.identity["bytes_from"] == "sidecar"
    assert "doc_masked" in side.summary() and "0 of 64 targets never scored" in side.summary()
    # The session's model is untouched: the next evaluation from the same weights gives the same number.
    again = session.evaluate(ValSet.from_tokens(tokens, entries), tables, config, device="cpu")
    assert again.loss_sum == side.loss_sum


def test_nothing_to_score_is_refused():
    model = seeded(tiny("pr1855"))
    tokens, _ = stream(2, 16 + 1, 14)  # one sequence, batches of two
    config = EvalConfig(protocol="doc_masked", seq_len=16, val_batch_tokens=8 * 16 * 2)
    with pytest.raises(EvalError, match="fewer than one batch of 2 per rank"):
        EvalSession(model).evaluate(ValSet.from_tokens(tokens), random_tables(64), config, device="cpu")


def test_pgttt_eval_doc_masked(tmp_path, capsys):
    tokenizer = shared_path("data", "tokenizers", "fineweb_1024_bpe.model")
    config = PRESETS["tiny-frontier"]
    model = init_weights(GPT(config), seed=0)
    tensors = {n: quantize_rows(p, default_scheme(n, p)) for n, p in model.state_dict().items()}
    path = tmp_path / "model.bin"
    save_model_bin(path, config, tensors, tokenizer=tokenizer_identity(tokenizer), provenance={})
    code = main(
        [
            "eval",
            "--checkpoint",
            str(path),
            "--tokenizer",
            str(tokenizer),
            "--device",
            "cpu",
            "--val",
            str(shared_path("data", "gutenberg_sp1024")),
            "--protocol",
            "doc_masked",
            "--max-tokens",
            "1000",
            "--val-batch-tokens",
            str(8 * 128 * 3),
            "--json",
            "--quiet",
        ]
    )
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    # 1,000 targets: 7 sequences of 128, batches of 3: 2 batches, 1 sequence and the last 104 targets unscored.
    assert result["config"]["protocol"] == "doc_masked" and result["tokens_scored"] == 768
    assert [c["scored_tokens"] for c in result["chunks"]] == [384, 384]
    assert result["compliance"]["unscored_spans"] == [[769, 1001]]
    assert result["identity"]["bytes_from"] == "tokenizer"
