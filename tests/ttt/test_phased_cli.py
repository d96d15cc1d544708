"""``pgttt eval --protocol phased`` on a small frontier model.bin: the flags reach the config, the result
carries the schedule and trace, and bad knobs are refused naming the field."""

from __future__ import annotations

import json

import pytest

from pgttt.checkpoints.format import save_model_bin, tokenizer_identity
from pgttt.checkpoints.quant import default_scheme, quantize_rows
from pgttt.main import main
from tests.conftest import shared_path
from tests.helpers.phased import TINY, tiny_model
from tests.helpers.ttt import one_thread  # noqa: F401 (a fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> list[str]:
    tokenizer = shared_path("data", "tokenizers", "fineweb_1024_bpe.model")
    tensors = {n: quantize_rows(p, default_scheme(n, p)) for n, p in tiny_model().state_dict().items()}
    path = tmp_path_factory.mktemp("ckpt") / "model.bin"
    save_model_bin(path, TINY, tensors, tokenizer=tokenizer_identity(tokenizer), provenance={})
    return [
        "eval",
        "--checkpoint",
        str(path),
        "--tokenizer",
        str(tokenizer),
        "--val",
        str(shared_path("data", "gutenberg_sp1024")),
        "--device",
        "cpu",
        "--quiet",
        "--protocol",
        "phased",
    ]


def test_phased_json(files, capsys):
    knobs = [
        "--max-docs",
        "3",
        "--ttt-lora-rank",
        "2",
        "--ttt-chunk-size",
        "64",
        "--ttt-eval-seq-len",
        "128",
        "--ttt-batch-size",
        "2",
        "--phased-ttt-prefix-docs",
        "1",
        "--phased-ttt-num-phases",
        "1",
        "--global-ttt-chunk-tokens",
        "256",
        "--emulate-ranks",
        "1",
        "--ttt-warm-start-a",
        "0",
        "--record-defaults",
        "pr1610",
    ]
    assert main([*files, "--json", *knobs]) == 0
    result = json.loads(capsys.readouterr().out)
    cfg = result["config"]
    assert (cfg["protocol"], cfg["max_docs"], cfg["ttt_lora_rank"], cfg["ttt_warm_start_a"]) == ("phased", 3, 2, False)
    assert cfg["record_defaults"] == "pr1610" and cfg["global_ttt_epochs"] == 3  # 04-13's value, not given
    assert "ttt_lora_rank" not in cfg["defaults_filled"] and "global_ttt_lr" in cfg["defaults_filled"]
    # Queue: the longest document alone, then the other two; the pause after the first trains on it.
    assert result["counts"]["documents"] == 3 and result["schedule"]["pauses"] == [1]
    phase = result["schedule"]["phases"][0]
    assert phase["docs_selected"] == 1 and phase["trained"] and [c["lr"] for c in phase["chunks"]][0] == 0.005
    assert [b["docs"] for b in result["batches"]] == [1, 2] and result["batches"][1]["phases_done"] == 1
    assert result["compliance"]["scored_exactly_once"] and result["compliance"]["score_before_update"]
    assert result["tokens_scored"] == result["counts"]["tokens"] and "global_sgd_s" in result["timings"]


def test_bad_knob_is_refused(files, capsys):
    assert main([*files, "--ttt-chunk-size", "4096"]) != 0
    assert "ttt_chunk_size=4096: must not exceed ttt_eval_seq_len=2048" in capsys.readouterr().err
