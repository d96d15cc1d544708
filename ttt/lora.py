"""Batched per-document LoRA adapters (frontier spec 2.6), their A draws, and the LoRA optimizer (2.7).

One adapter set holds an independent adapter per document slot (tensors with a leading batch axis):
u -> s * (u A^T) B^T with A (slots, r, 512) drawn U(-1/sqrt(in), 1/sqrt(in)), B = 0, s = alpha / r. The
model calls ``delta(slot, site, inp)`` at every layer application's q, k, v, o and MLP and ``head(h)``
for the output head (``checkpoints.layers.Adapters``).

A draws follow ../shared/compat/pr1855/README.md: a CPU generator seeded with ``seed`` (one per emulated
rank, all seeded alike, as every rank of the reference calls ``torch.manual_seed(SEED)``); every set
built draws, in the record's construction order, lm_head then q x slots, v, k, mlp, o (the disabled ones
skipped); a set is drawn when it is built, or lazily when first used from the generator state saved at
building, which gives the same values without holding sets nobody uses.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from pgttt.checkpoints.model import GPT

SITES_IN_DRAW_ORDER: tuple[str, ...] = ("q", "v", "k", "mlp", "o")


@dataclass(frozen=True)
class Shapes:
    """Adapter shapes of one model: input width, per-site output widths, slots (layer applications)."""

    model_dim: int
    vocab_size: int
    kv_dim: int
    slots: int
    rank: int
    sites: tuple[str, ...]  # enabled sites, in draw order

    def out_features(self, site: str) -> int:
        return self.kv_dim if site in ("k", "v") else self.model_dim

    def draws(self) -> list[tuple[str, int, int]]:
        """(site, slot, out) of every adapter in construction order; site "head" for the lm_head."""
        return [("head", 0, self.vocab_size)] + [
            (site, slot, self.out_features(site)) for site in self.sites for slot in range(self.slots)
        ]


def shapes_for(model: GPT, rank: int, *, k: bool, mlp: bool, o: bool) -> Shapes:
    config = model.config
    encoder, decoder = model.schedule()
    sites = tuple(s for s in SITES_IN_DRAW_ORDER if {"k": k, "mlp": mlp, "o": o}.get(s, True))
    return Shapes(
        config.model_dim,
        config.vocab_size,
        config.num_kv_heads * config.head_dim,
        len(encoder) + len(decoder),
        rank,
        sites,
    )


class DrawStream:
    """One emulated rank's CPU generator for A draws."""

    def __init__(self, seed: int) -> None:
        self.generator = torch.Generator().manual_seed(seed)

    def draw(self, shapes: Shapes, bsz: int) -> list[Tensor]:
        bound = 1.0 / math.sqrt(shapes.model_dim)
        return [
            torch.empty(bsz, shapes.rank, shapes.model_dim).uniform_(-bound, bound, generator=self.generator)
            for _ in shapes.draws()
        ]

    @staticmethod
    def draw_from(state: Tensor, shapes: Shapes, bsz: int) -> list[Tensor]:
        """The draws ``reserve`` skipped, from the state it returned."""
        stream = DrawStream(0)
        stream.generator.set_state(state)
        return stream.draw(shapes, bsz)

    def reserve(self, shapes: Shapes, bsz: int) -> torch.Tensor:
        """Advance the generator past one set's draws; returns the state to draw them from later."""
        state = self.generator.get_state()
        block = torch.empty(bsz * shapes.rank * shapes.model_dim)
        for _ in shapes.draws():
            block.uniform_(generator=self.generator)  # uniform_ draws serially: same count, same stream
        return state


class AdapterSet:
    """The adapters of one batch (``bsz`` slots), its A possibly kept from earlier batches (warm start)."""

    def __init__(self, shapes: Shapes, a: list[Tensor], scale: float, device: torch.device) -> None:
        self.shapes, self.scale, self.bsz = shapes, scale, a[0].size(0)
        self.a = [t.to(device, non_blocking=True).requires_grad_(True) for t in a]
        self.b = [
            torch.zeros(self.bsz, out, shapes.rank, device=device, requires_grad=True) for _, _, out in shapes.draws()
        ]
        self.index = {(site, slot): i for i, (site, slot, _) in enumerate(shapes.draws())}

    def parameters(self) -> list[Tensor]:
        return [*self.a, *self.b]

    def rows_from(self, first: int) -> AdapterSet:
        """The adapters of slots ``first`` on, as views: a step's gradients reach this set's tensors, zero at
        the slots before ``first`` (the documents a batch has finished)."""
        view = copy.copy(self)
        view.a, view.b = [t[first:] for t in self.a], [t[first:] for t in self.b]
        view.bsz = self.bsz - first
        return view

    def reset(self, redrawn: list[Tensor] | None) -> None:
        """A new batch: B = 0, and A re-drawn unless warm-started (``redrawn`` None)."""
        with torch.no_grad():
            for b in self.b:
                b.zero_()
            if redrawn is not None:
                for a, new in zip(self.a, redrawn, strict=True):
                    a.copy_(new, non_blocking=True)

    def _apply(self, i: int, inp: Tensor) -> Tensor:
        a, b = self.a[i].to(inp.dtype), self.b[i].to(inp.dtype)
        return torch.bmm(torch.bmm(inp, a.transpose(1, 2)), b.transpose(1, 2)) * self.scale

    def delta(self, slot: int, site: str, inp: Tensor) -> Tensor | None:
        i = self.index.get((site, slot))
        return None if i is None else self._apply(i, inp)

    def head(self, h: Tensor) -> Tensor | None:
        return self._apply(0, h)


def lora_optimizer(
    params: list[Tensor],
    *,
    kind: str,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    fused: bool | None = None,
) -> torch.optim.Optimizer:
    """Spec 2.7: AdamW (decoupled decay on every adapter tensor each step) or SGD with L2 decay. A new one
    per batch equals the record's zeroed state and restarted step count. ``fused``: one kernel for every
    tensor's update (CUDA; the same formula)."""
    if kind == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=beta1, weight_decay=weight_decay, fused=fused)
    return torch.optim.AdamW(params, lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=weight_decay, fused=fused)
