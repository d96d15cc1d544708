"""The fused MLP kernel (checkpoints/kernels.py) on the CPU, through Triton's interpreter, against the plain path.

Each test runs in a subprocess with ``TRITON_INTERPRET=1`` (read when the kernel module is imported).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton", reason="the test extras install Triton (pip install -e '.[test]')")


def interpreted(code: str) -> str:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_kernel_matches_the_plain_roundings_on_ragged_and_large_shapes():
    interpreted("""
        import torch, torch.nn.functional as F
        from pgttt.checkpoints import kernels
        torch.manual_seed(0)
        # ragged in every dimension; one batch large enough for the 128-row tiles; a single row
        for m, n, k in [(300, 520, 200), (8200, 256, 64), (1, 7, 3)]:
            x = torch.randn(m, k).bfloat16()
            w = (torch.randn(n, k) / k**0.5).bfloat16()
            with torch.no_grad():
                assert kernels.available(x)
                got = kernels.fc_leaky_relu_sq(x, w, 0.5)
            act = lambda h: F.leaky_relu(h.bfloat16().float(), 0.5).square().bfloat16()
            assert got.dtype == torch.bfloat16 and got.shape == (m, n), (got.dtype, got.shape)
            # The exact product, and how far a float32 sum in any order can stray from it: where both ends
            # of that interval round to the same bfloat16, the kernel must give exactly the plain path's value.
            h = x.double() @ w.double().T
            slack = 2 * k * 2.0**-24 * (x.double().abs() @ w.double().abs().T)
            low, high = act(h - slack), act(h + slack)
            settled = low == high
            assert torch.equal(got[settled], act(h)[settled]), (m, n, k)
            # elsewhere it lies between the values at the ends (from 0 where the interval holds 0)
            floor = torch.where((h - slack) * (h + slack) <= 0, 0.0, torch.minimum(low, high).float())
            assert ((got.float() >= floor) & (got.float() <= torch.maximum(low, high).float())).all(), (m, n, k)
            assert settled.float().mean() > 0.5, (m, n, k, settled.float().mean())  # the check has teeth
        x = torch.randn(4, 8).bfloat16()
        assert not kernels.available(x), "with gradients on, training keeps the plain path"
        with torch.no_grad():
            assert not kernels.available(x.float()), "float32 without autocast keeps the plain path"
            with torch.autocast("cpu", dtype=torch.bfloat16):
                assert kernels.available(x.float())
    """)


def test_scoring_with_the_kernel_equals_the_plain_model():
    out = interpreted("""
        import torch
        from pgttt.checkpoints import kernels
        from pgttt.checkpoints.config import resolve_config
        from pgttt.checkpoints.model import GPT, apply_precision, autocast, init_weights
        from pgttt.ttt.engine import score_batch

        calls = []
        fused = kernels.fc_leaky_relu_sq
        kernels.fc_leaky_relu_sq = lambda *a: calls.append(1) or fused(*a)
        cfg = resolve_config("tiny")
        model = apply_precision(init_weights(GPT(cfg), seed=3), "bf16")
        with torch.no_grad():  # trained-looking weights: the zero-initialised projections made non-zero
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        g = torch.Generator().manual_seed(1)
        x = torch.randint(0, cfg.vocab_size, (3, 64), generator=g)
        positions = torch.arange(48, 64).repeat(3, 1)
        targets = torch.randint(0, cfg.vocab_size, (3, 16), generator=g)
        mask = torch.ones(3, 16, dtype=torch.bool)

        def score(use_kernel):
            kernels_available = kernels.available
            if not use_kernel:
                kernels.available = lambda x: False
            try:
                with torch.no_grad(), autocast("bf16", "cpu"):
                    return score_batch(model, x, positions, targets, mask).item()
            finally:
                kernels.available = kernels_available

        plain = score(False)
        assert not calls
        with_kernel = score(True)
        applications = len(model.encoder_indices) + len(model.decoder_indices)
        assert len(calls) == applications, (len(calls), applications)
        assert abs(with_kernel - plain) <= 2e-3 * abs(plain), (with_kernel, plain)

        # training (gradients on) never takes the kernel and still back-propagates
        calls.clear()
        model.requires_grad_(True)
        with autocast("bf16", "cpu"):
            model.loss(x, x).backward()
        assert not calls and model.blocks[0].mlp.fc.weight.grad is not None
        print(plain, with_kernel)
    """)
    plain, with_kernel = map(float, out.split())
    assert plain > 0 and with_kernel > 0
