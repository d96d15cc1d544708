"""Muon: momentum SGD whose 2-D updates are orthogonalized by a quintic Newton-Schulz iteration.

The record's "MuonEq-R" variant normalizes each row of the (Nesterov) update before the iteration.
Weight decay is decoupled (``w <- w * (1 - lr * wd)``), per parameter group.
"""

from __future__ import annotations

import torch
from torch import Tensor

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def newton_schulz(g: Tensor, steps: int, eps: float = 1e-7) -> Tensor:
    """Approximately ``U V^T`` of ``g = U S V^T``: bfloat16 on GPUs, float32 on CPUs."""
    a, b, c = NS_COEFFICIENTS
    x = g.to(torch.bfloat16 if g.is_cuda else torch.float32)
    x = x / (x.norm() + eps)
    transposed = g.size(0) > g.size(1)
    if transposed:
        x = x.T
    for _ in range(steps):
        s = x @ x.T
        x = a * x + (b * s + c * s @ s) @ x
    return x.T if transposed else x


class Muon(torch.optim.Optimizer):
    """For 2-D parameters only. Group keys: lr, momentum, backend_steps, row_normalize, weight_decay."""

    def __init__(
        self,
        params,
        lr: float,
        momentum: float,
        backend_steps: int,
        row_normalize: bool = True,
        weight_decay: float = 0.0,
    ) -> None:
        defaults = dict(
            lr=lr,
            momentum=momentum,
            backend_steps=backend_steps,
            row_normalize=row_normalize,
            weight_decay=weight_decay,
        )
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError(f"Muon takes matrices only, got a parameter of shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            lr, momentum, wd = group["lr"], group["momentum"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad)
                buf = state["momentum_buffer"]
                buf.mul_(momentum).add_(p.grad)
                update = p.grad.add(buf, alpha=momentum)  # Nesterov
                if group["row_normalize"]:
                    update = update / update.float().norm(dim=-1, keepdim=True).clamp_min(1e-7).to(update.dtype)
                update = newton_schulz(update, group["backend_steps"])
                update = update * max(1.0, p.size(0) / p.size(1)) ** 0.5
                if wd:
                    p.mul_(1.0 - lr * wd)
                p.add_(update.to(p.dtype), alpha=-lr)
