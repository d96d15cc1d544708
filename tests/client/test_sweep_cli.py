"""`pgttt sweep` on the command line where no server is needed: bad specs, bad flags, a dead server URL."""

from __future__ import annotations

import socket

import pytest

from pgttt.main import main


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens on it once the socket is closed


@pytest.fixture
def spec_file(tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text("checkpoint: demo\ndataset: demo\ngrid:\n  ttt_epochs: [0, 1]\n")
    return path


def run(capsys, *args) -> tuple[int, str]:
    code = main(["sweep", *map(str, args)])
    return code, capsys.readouterr().err


def test_a_dead_server_url_is_reported_in_one_line(tmp_path, spec_file, capsys):
    url = f"http://127.0.0.1:{closed_port()}"
    code, err = run(capsys, spec_file, "--server", url, "--out", tmp_path / "out", "--retries", "2", "--quiet")
    assert code == 2
    last = err.strip().splitlines()[-1]
    assert last.startswith("pgttt sweep: error: no server can be reached: ")
    assert f"{url}/checkpoints/demo" in last and "cannot connect" in last and "gave up after 2 attempts" in last
    assert "Traceback" not in err


def test_a_bad_spec_names_the_file_and_key(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("checkpoint: demo\ndataset: demo\ngrid:\n  ttt_lr: [0.01, fast]\n")
    code, err = run(capsys, path, "--server", "http://127.0.0.1:1")
    assert code == 2
    assert err == f"pgttt sweep: error: {path}: grid.ttt_lr[1]: ttt_lr must be a finite number, got 'fast'\n"


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--concurrency", "0"], "--concurrency 0: must be at least 1"),
        (["--retries", "0"], "--retries 0: must be at least 1"),
        (["--max-attempts", "0"], "--max-attempts 0: must be at least 1"),
        (["--poll-s", "0"], "--poll-s 0.0: must be a positive number of seconds"),
    ],
)
def test_bad_flags_are_one_line_errors(tmp_path, spec_file, capsys, flags, message):
    code, err = run(capsys, spec_file, "--server", "http://127.0.0.1:1", "--out", tmp_path / "out", *flags)
    assert code == 2 and err == f"pgttt sweep: error: {message}\n"


def test_server_is_required(spec_file, capsys):
    with pytest.raises(SystemExit) as info:
        main(["sweep", str(spec_file)])
    assert info.value.code == 2 and "--server" in capsys.readouterr().err


def test_points_predicted_over_budget_are_marked_or_skipped(tmp_path, capsys):
    spec = tmp_path / "budget.yaml"
    spec.write_text("checkpoint: demo\ndataset: fineweb10B_sp8192\ngrid:\n  ttt_epochs: [3, 12]\n")
    url = f"http://127.0.0.1:{closed_port()}"
    code, err = run(capsys, spec, "--server", url, "--out", tmp_path / "out", "--retries", "1", "--quiet")
    assert code == 2 and "over budget: ttt_epochs=12: reference ~" in err and "ttt_epochs=3:" not in err
    code, err = run(
        capsys,
        spec,
        "--server",
        url,
        "--out",
        tmp_path / "out",
        "--retries",
        "1",
        "--quiet",
        "--skip-over-budget",
        "--budget-s",
        "100",
    )
    assert code == 2 and "skipped: ttt_epochs=3:" in err and "skipped: ttt_epochs=12:" in err
    assert "every point of" in err.strip().splitlines()[-1]
