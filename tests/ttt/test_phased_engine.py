"""run_phased on a tiny frontier model: the plain model's numbers at zero learning rates, the ledger,
determinism, and that adaptation and the emulated schedule change what they should."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from pgttt.ttt.documents import chunk_window, find_documents
from pgttt.ttt.phased import run_phased
from tests.helpers.phased import phased, stream, tiny_model
from tests.helpers.ttt import assert_units_add_up, one_thread  # noqa: F401 (a fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def run(model, config, tokens=None):
    ids, nbytes = stream() if tokens is None else tokens
    return run_phased(copy.deepcopy(model), ids, nbytes, config)


def test_zero_learning_rates_score_every_window_with_the_plain_model(model):
    ids, nbytes = stream()
    cfg = phased(ttt_lora_lr=0.0, global_ttt_lr=0.0, ttt_weight_decay=0.0)
    result = run(model, cfg)
    loss_sum, tokens, total_bytes = 0.0, 0, 0
    with torch.no_grad():
        for doc in find_documents(ids):
            for c in range(-(-doc.targets // 32)):
                w = chunk_window(c, doc.targets, 32, 64)
                a = doc.start + w.start
                x = torch.tensor(ids[a : a + w.length])[None]
                y = torch.tensor(ids[a + 1 : a + w.length + 1])
                nll = F.cross_entropy(model(x)[0].float(), y, reduction="none")[w.chunk_offset :]
                loss_sum += float(nll.double().sum())
                tokens += len(nll)
                total_bytes += int(nbytes[a + w.chunk_offset : a + w.length].sum())
    assert (result.tokens, result.bytes) == (tokens, total_bytes) == (len(ids) - 1, int(nbytes.sum()))
    assert result.loss_sum == pytest.approx(loss_sum, rel=1e-6)
    assert result.val_bpb == pytest.approx(loss_sum / math.log(2) / total_bytes, rel=1e-6)


def test_adaptation_moves_the_number_and_the_ledger_holds(model):
    plain = run(model, phased(ttt_lora_lr=0.0, global_ttt_lr=0.0, ttt_weight_decay=0.0))
    lora_only = run(model, phased(global_ttt_lr=0.0))
    both = run(model, phased())
    assert abs(lora_only.val_bpb - plain.val_bpb) > 1e-4 and abs(both.val_bpb - lora_only.val_bpb) > 1e-4
    assert run(model, phased()).val_bpb == both.val_bpb  # deterministic
    for r in (plain, lora_only, both):
        assert r.compliance["scored_exactly_once"] and r.compliance["score_before_update"], r.compliance
        assert r.compliance["targets"] == r.tokens
    ids, _ = stream()
    assert both.counts == {
        "documents": 14,
        "batches": 5,
        "tokens": 1399,
        "bytes": both.bytes,
        "chunks": sum(-(-d.targets // 32) for d in find_documents(ids)),
        "chunk_steps": sum(b.chunks for b in both.batches),
    }
    phases = both.schedule["phases"]
    assert [p["docs_selected"] for p in phases] == [4, 8] and all(p["chunks"] for p in phases)
    assert both.batches[-1].running_bpb == pytest.approx(both.val_bpb)
    for r in (plain, lora_only, both):  # one unit per document, the same documents whatever was learnt
        assert_units_add_up(r.units, r.loss_sum, r.tokens, r.bytes)
        assert r.units.identity() == both.units.identity() and len(r.units) == 14
    assert both.units.first_token.tolist() == [d.start + 1 for d in find_documents(ids)]
    assert [b.phases_done for b in both.batches] == sorted(b.phases_done for b in both.batches)


def test_emulated_ranks_set_the_schedule(model):
    one, eight = run(model, phased(emulate_ranks=1)), run(model, phased(emulate_ranks=8))
    assert one.schedule["pauses"] == [2, 3]  # 2+3 docs >= 4, then 3 more >= 8
    assert eight.schedule["pauses"] == [5]  # 7 in flight: every batch done before the first pause
    assert one.tokens == eight.tokens and one.val_bpb != eight.val_bpb
    assert [b.emulated_rank for b in eight.batches] == [0, 1, 2, 3, 4]


def test_document_fraction_and_max_docs(model):
    some = run(model, phased(val_doc_fraction=0.5))
    assert some.counts["documents"] == 7 and some.compliance["scored_exactly_once"]
    first = run(model, phased(max_docs=3))
    ids, _ = stream()
    assert first.tokens == sum(d.targets for d in find_documents(ids)[:3])
