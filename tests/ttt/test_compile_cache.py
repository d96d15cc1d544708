"""Compile caches persist across processes: a second process that compiles the same graph under the same
``use_compile_cache`` folder loads it (Inductor's FX-graph cache hits, nothing missed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

SCRIPT = """
import json, sys
import torch
from pgttt.ttt.compile_cache import cache_counts, use_compile_cache
use_compile_cache(sys.argv[1])
torch.set_num_threads(1)
weight = torch.randn(8, 8, requires_grad=True)
step = torch.compile(lambda x, w: torch.tanh(x @ w).square().sum())
step(torch.randn(4, 8), weight).backward()
print(json.dumps(cache_counts()))
"""


def compile_once(directory) -> dict[str, int]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(directory)], capture_output=True, text=True, env=env, timeout=600, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_second_process_loads_the_graphs_the_first_compiled(tmp_path):
    first = compile_once(tmp_path / "cache")
    assert first["fxgraph_cache_miss"] >= 2 and first["fxgraph_cache_hit"] == 0  # forward and backward
    assert any((tmp_path / "cache").rglob("*")), "nothing was written under the cache folder"
    second = compile_once(tmp_path / "cache")
    # Loaded whole (AOTAutograd's cache, which holds Inductor's graphs) or graph by graph; compiled: never.
    assert second["autograd_cache_hit"] + second["fxgraph_cache_hit"] >= 1
    assert second["fxgraph_cache_miss"] == second["autograd_cache_miss"] == second["autograd_cache_bypass"] == 0
    elsewhere = compile_once(tmp_path / "other")
    assert elsewhere["fxgraph_cache_hit"] == elsewhere["autograd_cache_hit"] == 0  # the folder held them
