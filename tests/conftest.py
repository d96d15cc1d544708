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
def pr1855_checkpoint(tmp_path_factory) -> Path:
    """The 1.0611 record's compat artifact imported once per session as a model.bin (lrzip: minutes of CPU)."""
    from pgttt.main import main

    ptz = shared_path("compat", "pr1855", "r0427_s42.int6.ptz")
    tokenizer = shared_path("data", "tokenizers", "fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model")
    out = tmp_path_factory.mktemp("pr1855") / "model.bin"
    assert main(["import", str(ptz), "--preset", "pr1855", "--tokenizer", str(tokenizer), "-o", str(out)]) == 0
    return out
