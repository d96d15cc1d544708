"""`pgttt import` and `pgttt inspect` through pgttt.main.main: output, exit codes, one-line errors."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime

import pytest
import torch

from pgttt import __version__
from pgttt.checkpoints.config import PRESETS
from pgttt.checkpoints.format import read_model_bin, save_model_bin, tokenizer_identity
from pgttt.main import main
from tests.checkpoints.test_ptz import challenge_layout, float16_artifact, pack, tiny_tensors

TINY_PARAMS = PRESETS["tiny"].num_parameters()


@pytest.fixture
def artifact(tmp_path):
    path = tmp_path / "final_model.int6.ptz"
    path.write_bytes(pack(challenge_layout(tiny_tensors())))
    return path


def run(capsys, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(err: str, command: str, fragment: str) -> None:
    assert err.startswith(f"pgttt {command}: error: ") and fragment in err
    assert err.count("\n") == 1 and "Traceback" not in err


# ---- import -----------------------------------------------------------------------------------
def test_import_writes_a_model_bin_with_provenance(capsys, tmp_path, artifact, sp1024_tokenizer):
    out = tmp_path / "model.bin"
    code, stdout, err = run(capsys, "import", artifact, "--preset", "tiny", "--tokenizer", sp1024_tokenizer, "-o", out)
    assert (code, err) == (0, "")
    assert f"{TINY_PARAMS:,} parameters in 43 tensors" in stdout and f"wrote {out}" in stdout
    mb = read_model_bin(out)
    assert mb.config == PRESETS["tiny"] and mb.tokenizer == tokenizer_identity(sp1024_tokenizer)
    prov = mb.provenance
    assert prov["source"] == "import" and prov["artifact"] == artifact.name
    assert prov["artifact_sha256"] == hashlib.sha256(artifact.read_bytes()).hexdigest()
    assert (prov["preset"], prov["overrides"], prov["pgttt_version"]) == ("tiny", {}, __version__)
    assert (prov["compression"], prov["shuffle_stride"]) == ("brotli", 2)
    assert abs((datetime.now(UTC) - datetime.fromisoformat(prov["imported_at"])).total_seconds()) < 60
    for name, qt in tiny_tensors().items():
        assert torch.equal(mb.tensors[name].q, qt.q), name


def test_import_with_overrides(capsys, tmp_path, sp1024_tokenizer):
    config = PRESETS["tiny"].with_overrides({"num_layers": 3, "xsa_last_n": 3})
    artifact = tmp_path / "a.ptz"
    artifact.write_bytes(float16_artifact(config))
    out = tmp_path / "model.bin"
    code, stdout, _ = run(
        capsys,
        "import",
        artifact,
        "--preset",
        "tiny",
        "--set",
        "num_layers=3",
        "--set",
        "xsa_last_n=3",
        "--tokenizer",
        sp1024_tokenizer,
        "-o",
        out,
    )
    assert code == 0 and "with num_layers=3 xsa_last_n=3" in stdout
    mb = read_model_bin(out)
    assert mb.config == config and mb.provenance["overrides"] == {"num_layers": 3, "xsa_last_n": 3}


def test_import_refuses_to_overwrite_without_force(capsys, tmp_path, artifact, sp1024_tokenizer):
    out = tmp_path / "model.bin"
    out.write_bytes(b"precious")
    args = ["import", artifact, "--preset", "tiny", "--tokenizer", sp1024_tokenizer, "-o", out]
    code, _, err = run(capsys, *args)
    assert code == 2 and out.read_bytes() == b"precious"
    assert_one_line_error(err, "import", "already exists (use --force to overwrite)")
    assert run(capsys, *args, "--force")[0] == 0
    assert read_model_bin(out).config == PRESETS["tiny"]


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["--preset", "tiny", "--tokenizer", "{big}"], "has 8192 tokens, more than the model's vocab_size=1024"),
        (["--preset", "tiny-flat", "--tokenizer", "{small}"], "missing keys: lm_head.weight"),
        (["--preset", "tiny", "--set", "num_layers=x", "--tokenizer", "{small}"], "'x' is not a valid int"),
        (["--preset", "tiny", "--tokenizer", "{artifact}"], "not a SentencePiece model"),
    ],
    ids=["tokenizer vocab too big", "wrong preset", "bad override", "not a tokenizer"],
)
def test_import_errors_are_one_line(capsys, tmp_path, artifact, sp1024_tokenizer, sp8192_tokenizer, argv, fragment):
    names = {"big": sp8192_tokenizer, "small": sp1024_tokenizer, "artifact": artifact}
    argv = [a.format(**names) for a in argv]
    out = tmp_path / "model.bin"
    code, _, err = run(capsys, "import", artifact, *argv, "-o", out)
    assert code == 2 and not out.exists()
    assert_one_line_error(err, "import", fragment)


def test_import_requires_preset_tokenizer_and_output(capsys, artifact, sp1024_tokenizer):
    code, _, err = run(capsys, "import", artifact, "--tokenizer", sp1024_tokenizer, "-o", "x.bin")
    assert code == 2
    assert_one_line_error(err, "import", "give its training log (--log train_seed42.log) or a preset")
    for missing in ("--tokenizer", "-o"):
        argv = {"--preset": "tiny", "--tokenizer": str(sp1024_tokenizer), "-o": "x.bin"}
        del argv[missing]
        with pytest.raises(SystemExit) as info:
            main(["import", str(artifact), *[x for kv in argv.items() for x in kv]])
        assert info.value.code == 2
        assert missing in capsys.readouterr().err


# ---- inspect ----------------------------------------------------------------------------------
@pytest.fixture
def model_bin(tmp_path, sp1024_tokenizer):
    path = tmp_path / "model.bin"
    save_model_bin(
        path,
        PRESETS["tiny"],
        tiny_tensors(),
        tokenizer=tokenizer_identity(sp1024_tokenizer),
        provenance={"source": "train", "steps": 10},
    )
    return path


def test_inspect_text(capsys, model_bin):
    code, out, err = run(capsys, "inspect", model_bin)
    size = model_bin.stat().st_size
    assert (code, err) == (0, "")
    assert "kind          model.bin" in out and "architecture  preset tiny" in out
    assert f"parameters    {TINY_PARAMS:,}" in out
    assert "int8             1 tensors       65,536 params       67,584 bytes raw" in out
    assert "lqer          none" in out
    assert "tokenizer     fineweb_1024_bpe.model (vocab 1024" in out
    assert '"steps": 10' in out
    assert (
        f"{size:,} artifact + 0 code (--code-bytes not given: code counted as 0) = {size:,} bytes; "
        f"limit 16,000,000: within the limit by {16_000_000 - size:,}"
    ) in out


def test_inspect_json_and_the_size_limit(capsys, model_bin):
    size = model_bin.stat().st_size
    code, out, _ = run(capsys, "inspect", model_bin, "--json", "--code-bytes", 16_000_000 - size)
    report = json.loads(out)
    assert code == 0 and report["parameters"] == TINY_PARAMS and report["kind"] == "model.bin"
    assert report["config"] == PRESETS["tiny"].to_dict() and report["provenance"]["steps"] == 10
    assert report["size_check"] == {
        "artifact_bytes": size,
        "code_bytes": 16_000_000 - size,
        "code_bytes_given": True,
        "code_bytes_rule": "given (--code-bytes)",
        "total_bytes": 16_000_000,
        "limit_bytes": 16_000_000,
        "within_limit": True,
    }
    code, out, _ = run(capsys, "inspect", model_bin, "--json", "--code-bytes", 16_000_001 - size)
    assert json.loads(out)["size_check"]["within_limit"] is False
    code, out, _ = run(capsys, "inspect", model_bin, "--code-bytes", 16_000_001 - size)
    assert "OVER the limit by 1" in out


def test_inspect_ptz_needs_preset_and_reports_custom_configs(capsys, artifact):
    code, _, err = run(capsys, "inspect", artifact)
    assert code == 2
    assert_one_line_error(err, "inspect", "carries no hyperparameters: give its training log")
    code, out, _ = run(capsys, "inspect", artifact, "--preset", "tiny", "--json")
    report = json.loads(out)
    assert code == 0 and report["kind"] == "ptz" and report["preset"] == "tiny" and report["tokenizer"] is None
    assert report["provenance"]["compression"] == "brotli"


@pytest.mark.parametrize(
    ("damage", "fragment"),
    [
        (lambda p: p.write_bytes(p.read_bytes()[:-100]), "truncated"),
        (lambda p: p.write_bytes(p.read_bytes()[:200] + b"\xff" + p.read_bytes()[201:]), "checksum mismatch"),
        (lambda p: p.unlink() or p.mkdir(), "is a directory"),
        (lambda p: p.unlink(), "no such file"),
    ],
    ids=["truncated", "corrupt", "directory", "missing"],
)
def test_inspect_bad_file_is_one_line_error(capsys, model_bin, damage, fragment):
    damage(model_bin)
    code, out, err = run(capsys, "inspect", model_bin)
    assert code == 2 and out == ""
    assert_one_line_error(err, "inspect", fragment)


def test_inspect_model_bin_with_preset_is_refused(capsys, model_bin):
    code, _, err = run(capsys, "inspect", model_bin, "--preset", "tiny")
    assert code == 2
    assert_one_line_error(err, "inspect", "a preset, log or overrides are not allowed")


def test_inspect_rejects_negative_code_bytes(capsys, model_bin):
    with pytest.raises(SystemExit) as info:
        main(["inspect", str(model_bin), "--code-bytes", "-5"])
    assert info.value.code == 2 and "-5 is negative" in capsys.readouterr().err
