"""Where torch.compile keeps its on-disk caches (Inductor's FX graphs and kernels, AOTAutograd's graphs, Triton's
binaries): one folder, so a restarted server (or a second bench run) loads what the first one compiled.

``use_compile_cache`` must run before this process (and the workers it starts, which inherit it) compiles
anything. ``cache_counts`` reads what the caches did: a warm-up that loaded its graphs has hits and no misses.
"""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"  # Inductor's own variable; Triton's cache lies under it


def use_compile_cache(directory: str | Path) -> Path:
    path = Path(directory).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    os.environ[CACHE_ENV] = str(path)
    return path


def cache_counts() -> dict[str, int]:
    """Inductor's FX-graph and AOTAutograd cache hits and misses (and graphs AOTAutograd would not cache) in this
    process so far."""
    from torch._dynamo.utils import counters

    names = (
        "fxgraph_cache_hit",
        "fxgraph_cache_miss",
        "autograd_cache_hit",
        "autograd_cache_miss",
        "autograd_cache_bypass",
    )
    seen = {**counters["inductor"], **counters["aot_autograd"]}
    return {name: int(seen.get(name, 0)) for name in names}
