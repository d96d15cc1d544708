"""The challenge's own numbers: the compat artifact's cpu_fp32 cases (../shared/compat/expected.json).

The first 8,193 tokens of the trimmed val shard (max_tokens 8192), precision fp32, tolerance from the
file. The sliding case goes through ``pgttt eval``; the TTT cases through the API on one session.
"""

from __future__ import annotations

import json

import pytest

from pgttt.main import main
from pgttt.ttt import EvalConfig, EvalSession
from tests.conftest import shared_path


@pytest.fixture(scope="module")
def expected() -> dict:
    return json.loads(shared_path("compat", "expected.json").read_text())


@pytest.fixture(scope="module")
def data(expected) -> dict:
    return {
        "artifact": shared_path("compat", expected["artifact"]),
        "tokenizer": shared_path("data", "tokenizers", "fineweb_8192_bpe.model"),
        "val": shared_path("data", "gutenberg_sp8192"),
    }


def case(expected: dict, kind: str, epochs: int | None = None) -> dict:
    return next(c for c in expected["cpu_fp32"]["cases"] if c["kind"] == kind and c.get("epochs") == epochs)


def test_sliding_case_through_pgttt_eval(expected, data, capsys):
    c = case(expected, "sliding")
    code = main(
        [
            "eval",
            "--checkpoint",
            str(data["artifact"]),
            "--preset",
            expected["architecture"]["preset"],
            "--tokenizer",
            str(data["tokenizer"]),
            "--val",
            str(data["val"]),
            "--ttt-epochs",
            "0",
            "--seq-len",
            str(c["seq_len"]),
            "--stride",
            str(c["stride"]),
            "--max-tokens",
            str(c["prefix_tokens"]),
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
    assert result["tokens_scored"] == c["prefix_tokens"]
    assert result["identity"]["checkpoint_sha256"] == expected["artifact_sha256"]
    assert abs(result["val_bpb"] - c["val_bpb"]) <= expected["cpu_fp32"]["tolerance_bpb"]
    assert result["val_loss"] == pytest.approx(c["val_loss"], abs=1e-4)
    assert result["compliance"]["scored_exactly_once"]


@pytest.fixture(scope="module")
def session(expected, data) -> EvalSession:
    return EvalSession.load(data["artifact"], preset=expected["architecture"]["preset"], tokenizer=data["tokenizer"])


@pytest.mark.slow
@pytest.mark.parametrize("epochs", [1, 2])
def test_ttt_cases(expected, data, session, epochs):
    c = case(expected, "ttt", epochs)
    config = EvalConfig(
        seq_len=c["seq_len"],
        stride=c["stride"],
        ttt_epochs=c["epochs"],
        chunk_tokens=c["chunk_tokens"],
        ttt_lr=c["lr"],
        ttt_momentum=c["momentum"],
        batch_seqs=c["batch_seqs"],
        max_tokens=c["prefix_tokens"],
        precision="fp32",
    )
    result = session.evaluate(data["val"], data["tokenizer"], config, device="cpu")
    assert result.tokens_scored == c["prefix_tokens"]
    assert abs(result.val_bpb - c["val_bpb"]) <= expected["cpu_fp32"]["tolerance_bpb"]
    assert result.val_loss == pytest.approx(c["val_loss"], abs=1e-4)
    assert result.compliance["scored_exactly_once"] and result.compliance["score_before_update"]
    assert [chunk.lr for chunk in result.chunks] == [c["lr"], None]  # two chunks; cosine starts at lr
