"""Shared test fixtures: where the challenge's shared files are, and skipping when they are absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# ../shared beside the checkout (developers and CI); PGTTT_SHARED points elsewhere.
SHARED = Path(os.environ.get("PGTTT_SHARED", REPO.parent / "shared")).resolve()

torch.set_num_threads(min(2, os.cpu_count() or 1))


def shared_path(*parts: str) -> Path:
    """A file under ../shared/, or skip the test with a message saying it is absent."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent: this test needs the challenge's shared files (set PGTTT_SHARED)")
    return path


@pytest.fixture
def compat_artifact() -> Path:
    return shared_path("compat", "pg0409_s42.int6.ptz")


@pytest.fixture
def sp8192_tokenizer() -> Path:
    return shared_path("data", "tokenizers", "fineweb_8192_bpe.model")


@pytest.fixture
def sp1024_tokenizer() -> Path:
    return shared_path("data", "tokenizers", "fineweb_1024_bpe.model")


@pytest.fixture(scope="session")
def pr1855_import(tmp_path_factory) -> tuple[Path, dict[bytes, bytes]]:
    """The pr1855 compat artifact (``compat/pr1855/r0427_s42.int6.ptz``) imported by ``pgttt import`` into a
    model.bin, once per test session, with lrzip's output for each of its streams: decoding the lrzip groups
    costs minutes of CPU, so every test that needs the record's model or those outputs shares this one run."""
    from pgttt.checkpoints import lrzip
    from pgttt.main import main

    artifact = shared_path("compat", "pr1855", "r0427_s42.int6.ptz")
    out = tmp_path_factory.mktemp("pr1855") / "model.bin"
    outputs: dict[bytes, bytes] = {}
    real = lrzip.decode

    def recording(data, size, **kw):
        outputs[bytes(data)] = real(data, size, **kw)
        return outputs[bytes(data)]

    lrzip.decode = recording  # the container reader looks it up per call
    try:
        code = main(
            [
                "import",
                str(artifact),
                "--preset",
                "pr1855",
                "--tokenizer",
                str(caseops_tokenizer_path()),
                "-o",
                str(out),
            ]
        )
    finally:
        lrzip.decode = real
    assert code == 0, f"pgttt import of {artifact} failed (exit {code})"
    return out, outputs


@pytest.fixture(scope="session")
def pr1855_checkpoint(pr1855_import) -> Path:
    return pr1855_import[0]


def caseops_tokenizer_path() -> Path:
    return shared_path("data", "tokenizers", "fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model")
