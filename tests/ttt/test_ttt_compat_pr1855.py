"""The 1.0611 record's own ``eval_val`` (its "diagnostic quantized", frontier spec 2.12) on its compat
artifact: case ``eval_val_16k`` of ``compat/pr1855/expected.json``, fp32 on the CPU, through
``pgttt eval --protocol doc_masked`` on the CaseOps val set with its byte sidecar.

The model.bin comes from the session-scoped ``pr1855_checkpoint`` fixture (tests/conftest.py): the
artifact's lrzip decoding costs 2-3 minutes of CPU, paid once per test session.
"""

from __future__ import annotations

import json

import pytest

from pgttt.main import main
from tests.conftest import caseops_tokenizer_path, shared_path

pytestmark = pytest.mark.slow


def compat_case(name: str) -> tuple[dict, float]:
    expected = json.loads(shared_path("compat", "pr1855", "expected.json").read_text())["cpu_fp32"]
    return next(c for c in expected["cases"] if c["case"] == name), expected["tolerance_bpb"]


def test_eval_val_16k(pr1855_checkpoint, capsys):
    case, tolerance = compat_case("eval_val_16k")
    code = main(
        [
            "eval",
            "--checkpoint",
            str(pr1855_checkpoint),
            "--tokenizer",
            str(caseops_tokenizer_path()),
            "--val",
            str(shared_path("data", "gutenberg_caseops")),
            "--protocol",
            "doc_masked",
            # The case's prefix of prefix_tokens tokens is the stream cut to max_tokens + 1.
            "--max-tokens",
            str(case["prefix_tokens"] - 1),
            "--val-batch-tokens",
            case["env"]["VAL_BATCH_TOKENS"],
            "--precision",
            "fp32",
            "--device",
            "cpu",
            "--json",
            "--quiet",
        ]
    )
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["config"]["seq_len"] == 2048 and result["identity"]["bytes_from"] == "sidecar"
    assert (result["tokens_scored"], result["bytes_scored"]) == (case["scored_tokens"], case["scored_bytes"])
    # "2 batches of 4 x 2048 packed tokens", nothing truncated.
    compliance = result["compliance"]
    assert (compliance["batches"], compliance["batch_seqs"], compliance["unscored_targets"]) == (2, 4, 0)
    assert abs(result["val_bpb"] - case["val_bpb"]) <= tolerance, (result["val_bpb"], case["val_bpb"])
    assert result["val_loss"] == pytest.approx(case["val_loss"], abs=tolerance)
