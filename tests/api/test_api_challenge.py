"""The challenge's numbers are declared once (pgttt.api.challenge), not retyped across the packages."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("api", "app", "budget", "checkpoints", "cli", "client", "training", "ttt")


def test_the_artifact_limit_is_written_only_in_api_challenge():
    literal = re.compile(r"\b16_?000_?000\b")
    found = sorted(
        str(path.relative_to(ROOT))
        for package in PACKAGES
        for path in (ROOT / package).rglob("*.py")
        if literal.search(path.read_text())
    )
    assert found == ["api/challenge.py"]
