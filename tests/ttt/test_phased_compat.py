"""``pgttt eval --protocol phased`` against the 1.0611 record's own evaluator (../shared/compat/pr1855).

The record ran each case at world size 1 with the LoRA A rule of that folder's README, so these run
with ``--emulate-ranks 1`` and every setting its ``env`` lists, on the imported artifact in fp32 on the
CPU. ``ttt_small`` and ``ttt_default`` must reproduce within ``tolerance_bpb``; the diagnostics (other A
draws, zero learning rates) must land on their own numbers and away from ``ttt_small``'s.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import shared_path

# The record's environment variables a case may set, as pgttt eval flags (the rest are pr1855's defaults).
FLAGS = {
    "SEED": "--seed",
    "TTT_BATCH_SIZE": "--ttt-batch-size",
    "TTT_CHUNK_SIZE": "--ttt-chunk-size",
    "TTT_EVAL_SEQ_LEN": "--ttt-eval-seq-len",
    "TTT_LORA_LR": "--ttt-lora-lr",
    "TTT_LORA_RANK": "--ttt-lora-rank",
    "TTT_BETA2": "--ttt-beta2",
    "TTT_WEIGHT_DECAY": "--ttt-weight-decay",
    "PHASED_TTT_PREFIX_DOCS": "--phased-ttt-prefix-docs",
    "PHASED_TTT_NUM_PHASES": "--phased-ttt-num-phases",
    "GLOBAL_TTT_CHUNK_TOKENS": "--global-ttt-chunk-tokens",
    "GLOBAL_TTT_LR": "--global-ttt-lr",
    "GLOBAL_TTT_MOMENTUM": "--global-ttt-momentum",
}
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def expected() -> dict:
    data = json.loads(shared_path("compat", "pr1855", "expected.json").read_text())
    return {"tolerance": data["cpu_fp32"]["tolerance_bpb"], **{c["case"]: c for c in data["cpu_fp32"]["cases"]}}


@pytest.fixture(scope="module")
def evaluated(pr1855_checkpoint, expected):
    """``evaluated(case)``: the case through ``pgttt eval --json`` in a process of its own, as a user runs it
    (once per module, so ``-k`` runs only the cases it selects)."""
    tokenizer = shared_path("data", "tokenizers", "fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model")
    results: dict[str, dict] = {}

    def run(name: str) -> dict:
        if name not in results:
            case = expected[name]
            flags = [arg for env, flag in FLAGS.items() if env in case["env"] for arg in (flag, case["env"][env])]
            done = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "pgttt.main",
                    "eval",
                    "--checkpoint",
                    str(pr1855_checkpoint),
                    "--protocol",
                    "phased",
                    "--emulate-ranks",
                    "1",
                    "--tokenizer",
                    str(tokenizer),
                    "--val",
                    str(shared_path("data", "gutenberg_caseops")),
                    "--max-tokens",
                    str(case["prefix_tokens"] - 1),
                    "--device",
                    "cpu",
                    "--precision",
                    "fp32",
                    "--json",
                    "--quiet",
                    *flags,
                ],
                capture_output=True,
                text=True,
                timeout=3600,
                env={**os.environ, "OMP_NUM_THREADS": "2"},
            )
            assert done.returncode == 0, done.stderr[-4000:]
            results[name] = json.loads(done.stdout)
        return results[name]

    return run


@pytest.mark.parametrize("name", ["ttt_small", "ttt_default"])
def test_reproduces_the_records_evaluator(evaluated, expected, name):
    result, case = evaluated(name), expected[name]
    assert (result["tokens_scored"], result["bytes_scored"]) == (case["scored_tokens"], case["scored_bytes"])
    assert result["counts"]["documents"] == case["docs"]
    assert abs(result["val_bpb"] - case["val_bpb"]) <= expected["tolerance"], (result["val_bpb"], case["val_bpb"])
    assert result["val_loss"] == pytest.approx(case["val_loss"], abs=3 * expected["tolerance"])
    assert result["compliance"]["scored_exactly_once"] and result["compliance"]["score_before_update"]


def test_ttt_small_schedule_is_the_readmes(evaluated):
    schedule = evaluated("ttt_small")["schedule"]  # G4 alone, G3; phase 1 on 2 docs; G2; phase 2 on 4 docs
    assert schedule["pauses"] == [2, 3]
    assert [p["docs_selected"] for p in schedule["phases"]] == [2, 4]
    assert [[c["lr"] for c in p["chunks"]] for p in schedule["phases"]] == [[0.01], [0.01, pytest.approx(0.005)]]
    default = evaluated("ttt_default")["schedule"]  # boundaries [0, 1, 2]: one pause, nothing selected
    assert default["boundaries"] == [0, 1, 2] and [p["docs_selected"] for p in default["phases"]] == [0]


@pytest.mark.parametrize("name", ["ttt_small_seed0", "ttt_small_nolr"])
def test_diagnostics_move_as_recorded(evaluated, expected, name):
    got, tolerance = evaluated(name)["val_bpb"], expected["tolerance"]
    assert abs(got - expected[name]["val_bpb"]) <= tolerance
    assert abs(got - expected["ttt_small"]["val_bpb"]) > tolerance  # the tolerance tells these apart
