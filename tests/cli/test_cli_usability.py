"""Issue 15's command-line items: settings refused with exit 2 before anything loads, no silent overwrite,
TTT runs that trained on nothing say so, thread count, and progress bars only for a terminal."""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pgttt.app.settings import demo_dir
from pgttt.main import main
from pgttt.runtime import physical_cores, resolve_threads, show_progress
from pgttt.training.demo import DEMO_DIR, TOKENIZER_FILE, VAL_FILE
from pgttt.ttt.data import open_shard, write_shard

DEMO = demo_dir()
DEMO_EVAL = [
    "eval",
    "--checkpoint",
    str(DEMO / "model.bin"),
    "--tokenizer",
    str(DEMO / "tokenizer.model"),
    "--val",
    str(DEMO),
    "--device",
    "cpu",
    "--threads",
    "1",
]


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def serve(tmp_path: Path, *flags: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PGTTT_")}
    env["PGTTT_STATE_DIR"] = str(tmp_path / "state")
    return subprocess.run(
        [sys.executable, "-m", "pgttt.main", "serve", "--log-level", "warning", *flags],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def one_line_error(stderr: str, command: str, fragment: str) -> None:
    assert stderr.count("\n") == 1 and stderr.startswith(f"pgttt {command}: error: "), stderr
    assert fragment in stderr and "Traceback" not in stderr


@pytest.mark.parametrize(
    ("flag", "what"), [("--checkpoint-dir", "nothing-here"), ("--data-dir", "nothing-here"), ("--data-dir", "a-file")]
)
def test_serve_refuses_a_missing_folder(tmp_path, flag, what):
    (tmp_path / "a-file").write_text("x")
    done = serve(tmp_path, flag, str(tmp_path / what), "--port", "0")
    assert done.returncode == 2 and done.stdout == ""
    why = "is not a directory" if what == "a-file" else "no such directory"
    one_line_error(done.stderr, "serve", f"{flag} {tmp_path / what}: {why}")


def test_serve_refuses_a_port_in_use_with_exit_2(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = serve(tmp_path, "--port", str(port))
    assert done.returncode == 2
    one_line_error(done.stderr, "serve", f"--port {port}: cannot listen on 127.0.0.1:{port}: ")


@pytest.mark.parametrize("command", ["eval", "train"])
@pytest.mark.parametrize(
    ("device", "fragment"),
    [
        ("gpu", "--device 'gpu': not a device; use cpu, cuda or cuda:N"),
        ("cuda", "--device 'cuda': "),
        ("cuda:7", "--device 'cuda:7': "),
    ],
)
def test_a_device_this_machine_lacks_is_one_line_exit_2(tmp_path, capsys, command, device, fragment):
    if device.startswith("cuda") and torch.cuda.device_count() > 7:
        pytest.skip("this machine has the GPU")
    argv = (
        DEMO_EVAL[:-4]
        if command == "eval"
        else ["train", "--data", str(DEMO), "--tokenizer", str(DEMO / "tokenizer.model"), "-o", str(tmp_path / "m.bin")]
    )
    assert main([*argv, "--device", device]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    one_line_error(err, command, fragment)
    if device == "cuda" and not torch.cuda.is_available():
        assert "use --device cpu" in err


def test_train_refuses_to_overwrite_without_force(tmp_path, capsys):
    out = tmp_path / "model.bin"
    out.write_bytes(b"precious")
    argv = [
        "train",
        "--data",
        str(tmp_path),
        "--tokenizer",
        str(DEMO / "tokenizer.model"),
        "-o",
        str(out),
        "--preset",
        "tiny",
        "--device",
        "cpu",
    ]
    assert main(argv) == 2
    one_line_error(capsys.readouterr().err, "train", f"{out}: already exists (use --force to overwrite)")
    assert out.read_bytes() == b"precious"
    assert main([*argv, "--force"]) == 2  # past the check: this folder holds no training data
    assert "no fineweb_train_*.bin files" in capsys.readouterr().err


def test_a_ttt_run_that_trained_on_nothing_says_so(capsys):
    # 16,384 tokens with the default 32,768-token chunks: one chunk, the last, never trained on.
    assert main([*DEMO_EVAL, "--ttt-epochs", "1", "--max-tokens", "16384", "--quiet"]) == 0
    out, err = capsys.readouterr()
    assert out.count("\n") == 1 and "ttt 1ep/32768" in out
    assert err.startswith("pgttt eval: warning: ttt_epochs=1 trained on nothing: of 1 chunk(s) of chunk_tokens=32768")
    assert main([*DEMO_EVAL, "--ttt-epochs", "1", "--max-tokens", "16384", "--json"]) == 0
    out, err = capsys.readouterr()
    result = json.loads(out)
    assert result["trained_chunks"] == 0 and len(result["warnings"]) == 1 and err == ""
    sliding = json.loads(
        (main([*DEMO_EVAL, "--ttt-epochs", "0", "--max-tokens", "16384", "--json"]), capsys.readouterr().out)[1]
    )
    assert sliding["val_bpb"] == result["val_bpb"] and sliding["warnings"] == [] and sliding["trained_chunks"] == 0


def test_a_ttt_run_that_trained_says_how_much(capsys):
    assert main([*DEMO_EVAL, "--ttt-epochs", "1", "--chunk-tokens", "1024", "--max-tokens", "4096", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["trained_chunks"] == len(result["chunks"]) - 1 == 3 and result["warnings"] == []


def test_threads_come_from_the_flag_then_the_environment_then_the_cores():
    assert resolve_threads(3, {"PGTTT_THREADS": "5"}) == (3, "--threads")
    assert resolve_threads(None, {"PGTTT_THREADS": "5", "OMP_NUM_THREADS": "4"}) == (5, "PGTTT_THREADS")
    assert resolve_threads(None, {"OMP_NUM_THREADS": "4"}) == (4, "OMP_NUM_THREADS")
    assert resolve_threads(None, {}) == (physical_cores(), "physical cores available")
    assert 1 <= physical_cores() <= len(os.sched_getaffinity(0))


@pytest.mark.parametrize(
    ("flag", "env", "fragment"),
    [
        ("0", {}, "--threads=0: must be at least 1"),
        (None, {"PGTTT_THREADS": "two"}, "PGTTT_THREADS='two': not a whole"),
    ],
)
def test_bad_thread_counts_are_one_line_exit_2(capsys, monkeypatch, restore_threads, flag, env, fragment):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    argv = [a for a in DEMO_EVAL if a not in ("--threads", "1")]
    assert main([*argv, *(["--threads", flag] if flag else []), "--max-tokens", "1024", "--quiet"]) == 2
    one_line_error(capsys.readouterr().err, "eval", fragment)


def test_eval_uses_the_thread_count_given(capsys, monkeypatch, restore_threads):
    monkeypatch.setenv("PGTTT_THREADS", "1")
    argv = [a for a in DEMO_EVAL if a not in ("--threads", "1")]
    torch.set_num_threads(2)
    assert main([*argv, "--ttt-epochs", "0", "--max-tokens", "1024", "--quiet"]) == 0
    assert torch.get_num_threads() == 1


def test_progress_bars_only_on_a_terminal(capsys, monkeypatch):
    assert not show_progress(False, io.StringIO()) and show_progress(False, Terminal())
    assert not show_progress(True, Terminal())
    assert main([*DEMO_EVAL, "--ttt-epochs", "1", "--chunk-tokens", "1024", "--max-tokens", "2048"]) == 0
    assert capsys.readouterr().err == ""  # stderr is not a terminal here
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert main([*DEMO_EVAL, "--ttt-epochs", "1", "--chunk-tokens", "1024", "--max-tokens", "2048"]) == 0
    bar = terminal.getvalue()
    assert "eval" in bar and "2.05k/2.05k" in bar and "<00:00" in bar  # tokens, total and ETA


def test_train_shows_its_warm_up_on_a_terminal(tmp_path, capsys, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    tokens = np.asarray(open_shard(DEMO_DIR / VAL_FILE))
    write_shard(data / "fineweb_train_000000.bin", tokens[:6000])
    shutil.copyfile(DEMO_DIR / VAL_FILE, data / VAL_FILE)
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    argv = [
        "train",
        "--data",
        str(data),
        "--tokenizer",
        str(DEMO_DIR / TOKENIZER_FILE),
        "-o",
        str(tmp_path / "m.bin"),
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
        "iterations=2",
        "--set",
        "max_wallclock_seconds=0",
        "--set",
        "warmup_steps=3",
        "--set",
        "train_batch_tokens=512",
        "--set",
        "enable_looping_at=0.5",
        "--set",
        "gptq_calibration_batches=1",
        "--eval-max-tokens",
        "512",
        "--device",
        "cpu",
        "--threads",
        "1",
    ]
    assert main(argv) == 0
    assert "warm-up" in terminal.getvalue() and "6/6" in terminal.getvalue()  # 3 steps, recurrence off then on
    assert "warm-up: 3 steps run and undone" in capsys.readouterr().out


def test_a_subcommand_whose_module_fails_to_import_fails_loudly(monkeypatch):
    import pgttt.main as cli_main

    monkeypatch.setitem(cli_main.COMMAND_MODULES, "pgttt.no_such_cli", ("nothing",))
    with pytest.raises(ModuleNotFoundError, match="pgttt.no_such_cli"):
        cli_main.build_parser()
    with pytest.raises(ModuleNotFoundError, match="pgttt.no_such_cli"):
        cli_main.main(["nothing"])


def test_a_subcommand_imports_only_its_own_module():
    code = (
        "import sys; from pgttt.main import build_parser; build_parser('inspect'); "
        "print(sorted(m for m in sys.modules if m.startswith(('pgttt.app', 'pgttt.client', 'fastapi'))))"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "[]", run.stdout + run.stderr
