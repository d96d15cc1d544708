"""Paired comparisons on a seeded tiny model of the frontier family, the phased protocol's knobs set by a sweep
spec: one setting run twice gives Δ = 0 exactly with an interval of zero width; a deliberately worse LoRA lr gives
an interval above zero."""

from __future__ import annotations

import copy

import pytest

from pgttt.api.compare import Side, compare
from pgttt.api.schemas import EvalRequest
from pgttt.client.sweep_spec import parse_spec
from pgttt.ttt.config import EvalConfig
from pgttt.ttt.phased import run_phased
from tests.helpers.phased import TINY, stream, tiny_model
from tests.helpers.ttt import one_thread  # noqa: F401 (a fixture)

pytestmark = pytest.mark.usefixtures("one_thread")
# The phased protocol at a size that runs in a second (phased_helpers.phased), as a spec's fixed fields.
FIXED = dict(
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
    global_ttt_lr=3e-2,
    seed=7,
    emulate_ranks=1,
)


def test_phased_knobs_in_a_spec_and_their_paired_comparison():
    spec = parse_spec(
        {
            "checkpoint": "tiny",
            "dataset": "stream",
            "fixed": FIXED,
            "grid": {"ttt_lora_lr": [3e-3, 0.5], "ttt_k_lora": [True]},
        }
    )
    good, worse = spec.expand()
    assert (good.fields["ttt_lora_lr"], worse.fields["ttt_lora_lr"]) == (3e-3, 0.5)
    ids, nbytes = stream(tokens=3000, docs=40)
    model = tiny_model()

    def run(fields: dict) -> Side:
        EvalRequest(checkpoint="tiny", dataset="stream", **fields)  # what the server would accept
        config = EvalConfig(**fields).resolved(TINY, "cpu")
        assert (config.ttt_lora_lr, config.ttt_k_lora) == (fields["ttt_lora_lr"], True)
        result = run_phased(copy.deepcopy(model), ids, nbytes, config)
        return Side(str(fields["ttt_lora_lr"]), result.units, checkpoint="tiny", config=fields, val_bpb=result.val_bpb)

    a, again, b = run(good.fields), run(good.fields), run(worse.fields)
    assert a.units.kind == "document" and len(a.units) == 40
    same = compare(a, again)
    assert same.delta_bpb == 0.0 and same.low == 0.0 and same.high == 0.0
    c = compare(a, b)
    assert c.low > 0 and c.delta_bpb == pytest.approx(b.val_bpb - a.val_bpb, rel=1e-9)
    assert c.differs == {"ttt_lora_lr": [3e-3, 0.5]}
