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
