"""``pgttt eval`` on a small model.bin: summary line, JSON, progress on stderr, settings, errors."""

from __future__ import annotations

import io
import json
import sys

import pytest

from pgttt.checkpoints.config import PRESETS
from pgttt.checkpoints.format import save_model_bin, tokenizer_identity
from pgttt.checkpoints.model import GPT, init_weights
from pgttt.checkpoints.quant import default_scheme, quantize_rows
from pgttt.main import main
from tests.conftest import shared_path
from tests.helpers.ttt import one_thread  # noqa: F401 (a fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    tokenizer = shared_path("data", "tokenizers", "fineweb_1024_bpe.model")
    model = init_weights(GPT(PRESETS["tiny"]), seed=0)
    tensors = {n: quantize_rows(p, default_scheme(n, p)) for n, p in model.state_dict().items()}
    path = tmp_path_factory.mktemp("ckpt") / "model.bin"
    save_model_bin(path, PRESETS["tiny"], tensors, tokenizer=tokenizer_identity(tokenizer), provenance={})
    return {"checkpoint": str(path), "tokenizer": str(tokenizer), "val": str(shared_path("data", "gutenberg_sp1024"))}


def args(files: dict[str, str], *extra: str) -> list[str]:
    return [
        "eval",
        "--checkpoint",
        files["checkpoint"],
        "--tokenizer",
        files["tokenizer"],
        "--val",
        files["val"],
        "--max-tokens",
        "1024",
        "--device",
        "cpu",
        *extra,
    ]


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_summary_line_and_progress(files, capsys, monkeypatch):
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)  # the bar is drawn only on a terminal
    assert main(args(files, "--ttt-epochs", "1", "--chunk-tokens", "512", "--stride", "64")) == 0
    out, _ = capsys.readouterr()
    line = out.strip()
    assert "\n" not in line
    assert line.startswith("val_loss ") and " val_bpb " in line and "ttt 1ep/512 seq_len 128 stride 64" in line
    assert "1024 tokens" in line and "compliance ok" in line
    assert "eval" in terminal.getvalue() and "tok" in terminal.getvalue()  # the progress bar


def test_json_records_every_setting_given(files, capsys):
    code = main(
        args(
            files,
            "--json",
            "--quiet",
            "--ttt-epochs",
            "2",
            "--chunk-tokens",
            "384",
            "--ttt-lr",
            "0.01",
            "--ttt-momentum",
            "0.5",
            "--seq-len",
            "64",
            "--stride",
            "32",
            "--batch-seqs",
            "4",
            "--seed",
            "3",
            "--optimizer",
            "adamw",
            "--lr-schedule",
            "constant",
            "--adapt-include",
            "blocks.*",
            "--adapt-exclude",
            "*.mlp.*",
            "--adapt-exclude",
            "*scale",
            "--precision",
            "fp32",
            "--no-compile",
        )
    )
    assert code == 0
    out, err = capsys.readouterr()
    assert err == ""
    result = json.loads(out)
    assert result["config"] == {
        "seq_len": 64,
        "stride": 32,
        "ttt_epochs": 2,
        "chunk_tokens": 384,
        "ttt_lr": 0.01,
        "ttt_momentum": 0.5,
        "batch_seqs": 4,
        "grad_clip": 1.0,
        "lr_schedule": "constant",
        "optimizer": "adamw",
        "adapt_include": ["blocks.*"],
        "adapt_exclude": ["*.mlp.*", "*scale"],
        "max_tokens": 1024,
        "precision": "fp32",
        "seed": 3,
        "compile": False,
        "protocol": "chunked",
        "val_batch_tokens": 524288,
    }
    assert result["tokens_scored"] == 1024
    assert [c["lr"] for c in result["chunks"]] == [0.01, 0.01, None]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--stride", "0"], "pgttt eval: error: stride=0: must be within 1..65536"),
        (["--stride", "200"], "pgttt eval: error: stride=200: must not exceed seq_len=128"),
        (["--adapt-include", "nothing.*"], "pgttt eval: error: adapt_include: pattern 'nothing.*' matches no"),
        (["--preset", "tiny"], "a model.bin carries its own architecture"),
    ],
)
def test_bad_input_is_one_line_exit_2(files, capsys, extra, message):
    assert main(args(files, "--quiet", *extra)) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1 and message in err


def test_missing_val_is_named(files, tmp_path, capsys):
    bad = dict(files, val=str(tmp_path / "nothing"))
    assert main(args(bad, "--quiet")) == 2
    assert f"{tmp_path / 'nothing'}: no such file or directory" in capsys.readouterr().err
