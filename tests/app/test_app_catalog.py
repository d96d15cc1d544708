"""What the service finds and serves: checkpoint and dataset discovery, request paths kept inside the
configured folders, and the settings from flags and PGTTT_* variables."""

from __future__ import annotations

import json
import shutil

import pytest

from pgttt.app.catalog import Catalog, PathError, safe_path
from pgttt.app.cli import settings_from_args
from pgttt.app.settings import Settings, SettingsError
from pgttt.main import build_parser, main
from tests.helpers.app import DEMO, write_model_bin, write_ptz
from tests.helpers.ttt import write_shard

TOKENIZER = next(DEMO.glob("*.model"))


def dataset_folder(path, tokenizer=True):
    path.mkdir(parents=True)
    write_shard(path / "fineweb_val_000000.bin", list(range(1, 300)))
    write_shard(path / "fineweb_val_000001.bin", list(range(1, 100)))
    if tokenizer:
        shutil.copy(TOKENIZER, path / "tok.model")
    return path


def test_checkpoint_discovery_names_kinds_and_problems(tmp_path):
    root, other = tmp_path / "ckpts", tmp_path / "more"
    write_model_bin(root / "runs" / "abc" / "model.bin")
    write_model_bin(root / "plain.bin", seed=1)
    write_shard(root / "fineweb_val_000000.bin", [1, 2, 3])  # a token shard, not a checkpoint: ignored
    write_ptz(root / "record.ptz")
    (root / "record.ptz.json").write_text(json.dumps({"preset": "tiny", "overrides": {}}))
    write_ptz(root / "bare.ptz")  # no sidecar
    write_ptz(root / "odd.ptz")
    (root / "odd.ptz.json").write_text(json.dumps({"preset": "tiny", "layers": 3}))
    write_model_bin(root / ".hidden" / "model.bin")
    write_model_bin(tmp_path / "elsewhere.bin")
    (root / "link.bin").symlink_to(tmp_path / "elsewhere.bin")  # leaves the folder: not served
    write_model_bin(other / "abc" / "model.bin", seed=2)  # the name "abc" is taken by the first folder

    catalog = Catalog([root, other], [])
    catalog.discover()
    assert sorted(catalog.checkpoints) == ["abc", "plain", "record"]
    assert catalog.checkpoints["abc"].spec.path == str(root / "runs" / "abc" / "model.bin")
    assert catalog.checkpoints["record"].info.kind == "ptz" and catalog.checkpoints["plain"].info.kind == "model.bin"
    problems = "\n".join(catalog.problems)
    assert "bare.ptz" in problems and "bare.ptz.json" in problems
    assert "odd.ptz.json" in problems and "layers" in problems
    assert "is taken by" in problems and str(other / "abc" / "model.bin") in problems
    entry = catalog.checkpoints["plain"].to_api(["cpu"])
    assert entry["fits_16mb"] is True and entry["devices"] == ["cpu"] and entry["tokenizer"] is None


def test_dataset_discovery_finds_tokenizers_three_ways(tmp_path):
    data = tmp_path / "data"
    dataset_folder(data / "inside")
    manifest = dataset_folder(data / "manifest", tokenizer=False)
    shutil.copy(TOKENIZER, tmp_path / "shared.model")
    (manifest / "dataset.json").write_text(json.dumps({"tokenizer": "../../shared.model"}))
    # The challenge's layout: data/datasets/fineweb10B_sp1024/ beside data/tokenizers/fineweb_1024_bpe.model.
    dataset_folder(data / "datasets" / "fineweb10B_sp1024", tokenizer=False)
    (data / "tokenizers").mkdir()
    shutil.copy(TOKENIZER, data / "tokenizers" / "fineweb_1024_bpe.model")
    two = dataset_folder(data / "two")
    shutil.copy(TOKENIZER, two / "again.model")
    dataset_folder(data / "none_sp77", tokenizer=False)

    catalog = Catalog([], [data])
    catalog.discover()
    assert sorted(catalog.datasets) == ["fineweb10B_sp1024", "inside", "manifest"]
    assert catalog.datasets["fineweb10B_sp1024"].spec.tokenizer == str(data / "tokenizers" / "fineweb_1024_bpe.model")
    assert catalog.datasets["manifest"].spec.tokenizer == str(tmp_path / "shared.model")
    api = catalog.datasets["inside"].to_api()
    assert api["val_files"] == ["fineweb_val_000000.bin", "fineweb_val_000001.bin"] and api["val_tokens"] == 398
    assert api["fingerprint"] == catalog.datasets["manifest"].info.fingerprint  # same shards, same fingerprint
    problems = "\n".join(catalog.problems)
    assert "2 tokenizers" in problems and "dataset.json" in problems
    assert "none_sp77" in problems and "fineweb_{V}_bpe.model" in problems


def test_request_paths_stay_inside_the_folders(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    write_model_bin(a / "one.bin")
    write_model_bin(b / "sub" / "two.bin")
    write_model_bin(tmp_path / "secret.bin")
    (a / "out.bin").symlink_to(tmp_path / "secret.bin")
    (a / "dir").symlink_to(tmp_path)
    roots = [a, b]
    assert safe_path("one.bin", roots, "path") == (a / "one.bin").resolve()
    assert safe_path("sub/two.bin", roots, "path") == (b / "sub" / "two.bin").resolve()
    assert safe_path(str(b / "sub" / "two.bin"), roots, "path") == (b / "sub" / "two.bin").resolve()
    for raw, why in [
        ("../secret.bin", "'..'"),
        ("sub/../../secret.bin", "'..'"),
        (str(tmp_path / "secret.bin"), "outside"),
        ("out.bin", "outside"),
        ("dir/secret.bin", "outside"),
        ("missing.bin", "not a file"),
        ("sub", "not a file"),
        ("", "non-empty"),
    ]:
        with pytest.raises(PathError, match=why) as info:
            safe_path(raw, roots, "path")
        assert str(info.value).startswith("path: ")


def test_settings_from_the_environment_and_flags(tmp_path, monkeypatch):
    for name in ("x", "y", "c1", "c2"):  # pgttt serve refuses folders that do not exist
        (tmp_path / name).mkdir()
    monkeypatch.setenv("PGTTT_DEVICES", "cpu,cpu")
    monkeypatch.setenv("PGTTT_CHECKPOINT_DIRS", f"{tmp_path}/x, {tmp_path}/y")
    monkeypatch.setenv("PGTTT_QUEUE_LIMIT", "7")
    monkeypatch.setenv("PGTTT_STATE_DIR", str(tmp_path / "state"))
    s = Settings()
    assert s.devices == ["cpu", "cpu"] and s.resolved_devices() == ["cpu", "cpu"]
    assert s.checkpoint_dirs == [tmp_path / "x", tmp_path / "y"] and s.queue_limit == 7
    assert s.database_path == tmp_path / "state" / "jobs.sqlite" and s.data_dirs[0].name == "demo"
    assert s.compile_cache_dir == tmp_path / "state" / "compile-cache"
    args = build_parser("serve").parse_args(
        [
            "serve",
            "--devices",
            "cpu",
            "--queue-limit",
            "3",
            "--no-warmup",
            "--checkpoint-dir",
            f"{tmp_path}/c1",
            "--checkpoint-dir",
            f"{tmp_path}/c2",
        ]
    )
    s = settings_from_args(args)
    assert s.devices == ["cpu"] and s.queue_limit == 3 and s.warmup is False  # flags win over the environment
    assert s.checkpoint_dirs == [tmp_path / "c1", tmp_path / "c2"]
    assert s.cuda_graphs is True  # on unless turned off
    monkeypatch.setenv("PGTTT_CUDA_GRAPHS", "0")
    assert Settings().cuda_graphs is False
    assert settings_from_args(build_parser("serve").parse_args(["serve", "--cuda-graphs"])).cuda_graphs is True
    assert settings_from_args(build_parser("serve").parse_args(["serve"])).cuda_graphs is False
    monkeypatch.setenv("PGTTT_API_KEY", "")  # as compose.yaml passes an unset key
    assert Settings().api_key is None
    monkeypatch.setenv("PGTTT_API_KEY", "k")
    assert Settings().api_key.get_secret_value() == "k"
    monkeypatch.delenv("PGTTT_CHECKPOINT_DIRS")
    assert Settings().checkpoint_dirs[0].name == "demo"  # the bundled demo by default
    with pytest.raises(SettingsError, match="tpu"):
        Settings(devices=["tpu"]).resolved_devices()
    with pytest.raises(SettingsError, match="visible GPU|no GPU"):
        Settings(devices=["cuda:7"]).resolved_devices()


@pytest.mark.parametrize("flags,needle", [(["--devices", "tpu"], "tpu"), (["--port", "70000"], "--port")])
def test_serve_refuses_bad_settings_in_one_line(tmp_path, capsys, flags, needle):
    assert main(["serve", "--state-dir", str(tmp_path), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pgttt serve: error:") and needle in err and "\n" not in err


def test_caseops_datasets_list_their_sidecars_apart(tmp_path):
    data = tmp_path / "data"
    folder = dataset_folder(data / "caseops")
    write_shard(folder / "fineweb_val_bytes_000000.bin", [0] + [2] * 298)
    write_shard(folder / "fineweb_val_bytes_000001.bin", [0] + [2] * 98)
    only_bytes = data / "only_bytes"  # sidecars without token shards: not a dataset
    only_bytes.mkdir()
    write_shard(only_bytes / "fineweb_val_bytes_000000.bin", [0, 1])
    shutil.copy(TOKENIZER, only_bytes / "tok.model")

    catalog = Catalog([], [data])
    catalog.discover()
    assert sorted(catalog.datasets) == ["caseops"] and catalog.problems == []
    api = catalog.datasets["caseops"].to_api()
    assert api["val_files"] == ["fineweb_val_000000.bin", "fineweb_val_000001.bin"] and api["val_tokens"] == 398
    assert api["val_byte_files"] == ["fineweb_val_bytes_000000.bin", "fineweb_val_bytes_000001.bin"]
