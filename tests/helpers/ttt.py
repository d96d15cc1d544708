"""Small builders shared by the engine's tests: shards on disk, tiny models, synthetic byte tables."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pgttt.checkpoints.config import ModelConfig
from pgttt.checkpoints.model import GPT, init_weights
from pgttt.ttt.bytes import ByteTables

REPO = Path(__file__).resolve().parents[2]

# Recurrence, parallel residuals, XSA and skip gates, at a size that runs in milliseconds.
MICRO = ModelConfig(
    vocab_size=48,
    num_layers=2,
    model_dim=16,
    num_heads=2,
    num_kv_heads=1,
    mlp_mult=2.0,
    rope_dims=4,
    train_seq_len=16,
    num_loops=1,
    loop_start=0,
    loop_end=0,
    parallel_residual_start=1,
    xsa_last_n=1,
)


@pytest.fixture
def one_thread():
    """Micro models run fastest on one thread (and are not slowed by a busy machine); restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_shard(path: Path, tokens, *, magic: int = 20240520, version: int = 1, count: int | None = None) -> Path:
    header = np.zeros(256, dtype="<i4")
    header[0], header[1] = magic, version
    header[2] = len(tokens) if count is None else count
    path.write_bytes(header.tobytes() + np.asarray(tokens, dtype="<u2").tobytes())
    return path


def micro_model(seed: int = 0, config: ModelConfig = MICRO, noise: float = 0.1) -> GPT:
    """Seeded weights with noise everywhere, so no path (zero-initialised projections) is dead."""
    model = init_weights(GPT(config), seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * noise)
    return model


def random_tables(vocab: int, seed: int = 0) -> ByteTables:
    rng = np.random.default_rng(seed)
    boundary = rng.random(vocab) < 0.2
    base = np.where(boundary, 0, rng.integers(1, 5, vocab))
    return ByteTables(base, (rng.random(vocab) < 0.5) & ~boundary, boundary, "synthetic", vocab)


def assert_units_add_up(units, loss_sum: float, tokens: int, nbytes: int) -> None:
    """The units' totals are the result's: tokens and bytes exactly, the loss within float64 summation noise; in
    stream order, one unit per offset."""
    total_loss, total_tokens, total_bytes = units.total
    assert (total_tokens, total_bytes) == (tokens, nbytes)
    assert math.isclose(total_loss, loss_sum, rel_tol=1e-9), (total_loss, loss_sum)
    assert len(units) > 0 and (np.diff(units.first_token) > 0).all() and (units.tokens > 0).all()


def run_two_ranks(worker: str, out: Path, timeout: float) -> Path:
    """Run ``python -m worker RANK 2 INIT OUT`` (``worker``: a module under tests.helpers) as two gloo ranks at once
    and wait for both; ``out`` holds what they wrote."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", worker, str(rank), "2", str(out / "init"), str(out)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(2)
    ]
    try:
        logs = [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, log in zip(procs, logs, strict=True):
        assert p.returncode == 0, log
    return out
