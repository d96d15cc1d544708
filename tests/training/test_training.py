"""``pgttt train`` end to end on the CPU: a tiny run writes a model.bin that loads and evaluates, and a
run stopped part-way then resumed reaches bit-identical weights."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from pgttt.checkpoints.loading import load_checkpoint
from pgttt.main import main
from pgttt.training import trainer as trainer_module
from pgttt.training.demo import DEMO_DIR, TOKENIZER_FILE, VAL_FILE
from pgttt.ttt.config import EvalConfig
from pgttt.ttt.data import open_shard, write_shard
from pgttt.ttt.session import EvalSession

# A small model on 64-token sequences: a step takes milliseconds.
SETTINGS = [
    "--preset",
    "tiny",
    "--set",
    "model_dim=32",
    "--set",
    "num_heads=2",
    "--set",
    "num_kv_heads=1",
    "--set",
    "train_seq_len=64",
    "--set",
    "iterations=8",
    "--set",
    "max_wallclock_seconds=0",
    "--set",
    "warmup_steps=1",
    "--set",
    "train_batch_tokens=512",
    "--set",
    "grad_accum_micro_batches=2",
    "--set",
    "enable_looping_at=0.5",
    "--set",
    "muon_momentum_warmup_steps=4",
    "--set",
    "ema_decay=0.6",
    "--set",
    "gptq_calibration_batches=1",
    "--set",
    "train_log_every=2",
    "--eval-max-tokens",
    "1024",
    "--device",
    "cpu",
]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Training data cut from the demo's val shard (its tokenizer's ids), and that val shard."""
    folder = tmp_path_factory.mktemp("data")
    tokens = np.asarray(open_shard(DEMO_DIR / VAL_FILE))
    write_shard(folder / "fineweb_train_000000.bin", tokens[:6000])
    write_shard(folder / "fineweb_train_000001.bin", tokens[6000:12000])
    shutil.copyfile(DEMO_DIR / VAL_FILE, folder / VAL_FILE)
    return folder


def train(data: Path, out: Path, *extra: str) -> int:
    return main(
        ["train", "--data", str(data), "--tokenizer", str(DEMO_DIR / TOKENIZER_FILE), "-o", str(out), *SETTINGS, *extra]
    )


def tensors(path: Path) -> dict[str, torch.Tensor]:
    return {name: qt.dequantize() for name, qt in load_checkpoint(path).tensors.items()}


def test_tiny_run_writes_a_model_bin_that_loads_and_evaluates(data, tmp_path, capsys):
    out = tmp_path / "model.bin"
    assert train(data, out, "--set", "val_loss_every=4", "--set", "gptq_calibration_batches=3") == 0
    log = capsys.readouterr().out
    assert "step 8/8 loss" in log and "depth recurrence on" in log and "warm-up: 1 steps" in log
    assert "GPTQ: Hessians from 3 batches of 512 tokens" in log and "GPTQ: batch 2/3" in log
    assert "step 4: val_loss" in log and "step 8: val_loss" in log and "(1,024 tokens)" in log
    assert "final: val_bpb" in log and "within the challenge's 16,000,000-byte limit" in log

    ckpt = load_checkpoint(out, tokenizer=DEMO_DIR / TOKENIZER_FILE)
    assert ckpt.config.model_dim == 32 and ckpt.config.train_seq_len == 64
    prov = ckpt.provenance
    assert prov["source"] == "pgttt train" and prov["preset"] == "tiny"
    assert prov["train_config"]["iterations"] == 8 and prov["train_config"]["ema_decay"] == 0.6
    outcome = prov["outcome"]
    assert outcome["steps"] == 8 and outcome["tokens"] == 8 * 512
    assert np.isfinite(outcome["final_train_loss"]) and outcome["gptq_seconds"] >= 0
    assert prov["data"]["train_files"] == ["fineweb_train_000000.bin", "fineweb_train_000001.bin"]

    # The recorded post-quantization number is the engine's on this very file.
    result = EvalSession.load(out).evaluate(
        data, DEMO_DIR / TOKENIZER_FILE, EvalConfig(ttt_epochs=0, max_tokens=1024), device="cpu"
    )
    assert result.tokens_scored == outcome["eval_tokens"] == 1024
    assert result.val_bpb == outcome["val_bpb_quantized"]
    # Quantization moves the number, a little.
    assert abs(outcome["val_bpb_quantized"] - outcome["val_bpb"]) < 0.05


def _final_state(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoint.pt", weights_only=True)


def _assert_identical(a, b, where: str = "state") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _assert_identical(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_identical(x, y, f"{where}[{i}]")
    elif where.endswith("train_seconds"):
        pass  # wall-clock time differs, of course
    else:
        assert a == b, where


def test_stopped_then_resumed_run_is_bit_identical(data, tmp_path, monkeypatch):
    whole_dir, run_dir = tmp_path / "whole", tmp_path / "run"
    assert train(data, tmp_path / "whole.bin", "--run-dir", str(whole_dir), "--checkpoint-every", "3") == 0

    out = tmp_path / "resumed.bin"
    advance = trainer_module.Trainer.advance

    def interrupt_at_step_6(self):
        if self.step == 5:
            raise KeyboardInterrupt  # Ctrl-C between checkpoints: steps 4 and 5 are lost
        return advance(self)

    monkeypatch.setattr(trainer_module.Trainer, "advance", interrupt_at_step_6)
    assert train(data, out, "--run-dir", str(run_dir), "--checkpoint-every", "3") == 130
    assert not out.exists() and _final_state(run_dir)["step"] == 3
    monkeypatch.setattr(trainer_module.Trainer, "advance", advance)

    assert train(data, out, "--run-dir", str(run_dir), "--checkpoint-every", "3", "--resume") == 0
    # Weights, EMA, optimizer moments, data position and RNG after step 8: the same bits. The resumed
    # run crossed the switch to depth recurrence (step 4) and skipped the warm-up the first run undid.
    whole, resumed = _final_state(whole_dir), _final_state(run_dir)
    assert whole["step"] == resumed["step"] == 8
    _assert_identical(whole, resumed)
    a, b = tensors(tmp_path / "whole.bin"), tensors(out)
    assert all(torch.equal(a[name], b[name]) for name in a)


def test_resume_refuses_other_settings(data, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert train(data, tmp_path / "a.bin", "--run-dir", str(run_dir), "--checkpoint-every", "4") == 0
    code = train(data, tmp_path / "b.bin", "--run-dir", str(run_dir), "--resume", "--set", "matrix_lr=0.5")
    assert code == 2
    assert "matrix_lr: 0.022 -> 0.5" in capsys.readouterr().err


def test_user_errors_are_one_line(data, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert train(empty, tmp_path / "x.bin") == 2
    assert "no fineweb_train_*.bin files" in capsys.readouterr().err
    assert train(data, tmp_path / "x.bin", "--resume") == 2
    assert "need --run-dir" in capsys.readouterr().err
    assert train(data, tmp_path / "x.bin", "--run-dir", str(tmp_path / "none"), "--resume") == 2
    assert "no training checkpoint to resume from" in capsys.readouterr().err
    assert train(data, tmp_path / "x.bin", "--set", "train_batch_tokens=500") == 2
    assert "train_batch_tokens=500" in capsys.readouterr().err
    assert train(data, tmp_path / "x.bin", "--set", "warmdown_frac=2") == 2
    assert "warmdown_frac=2.0" in capsys.readouterr().err
    assert train(data, tmp_path / "x.bin", "--eval-max-tokens", "0") == 2
    assert "--eval-max-tokens 0: must be at least 1" in capsys.readouterr().err
