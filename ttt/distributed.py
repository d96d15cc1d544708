"""pgttt's only contact with torch.distributed: joining and leaving a process group (the server's ganged
workers and training both), rank, world size, and the few collectives the engine needs.

Without an initialised process group (or with one rank) every helper is the identity, so a single
device runs the same code as many.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

# Gradients travel in float32 buckets of at most this many elements (one or two for the 2026-04-09 model).
BUCKET_ELEMENTS = 1 << 25


@contextlib.contextmanager
def process_group(
    device: torch.device,
    *,
    init_method: str | None = None,
    rank: int = -1,
    world_size: int = -1,
    timeout: timedelta | None = None,
) -> Iterator[float]:
    """Join a process group for the block (NCCL on a CUDA device, gloo otherwise) and destroy it after;
    yields the seconds joining took. Without ``init_method``, rank and size come from torchrun's environment;
    ``timeout`` (of a collective) defaults to torch's."""
    started = time.perf_counter()
    cuda = device.type == "cuda"
    # On GPUs, device_id makes NCCL set up its communicator here (0.56 s for two H200s, bench/RESULTS.md run 8),
    # not in the first all-reduce, where an evaluation would count it as scoring time.
    dist.init_process_group(
        "nccl" if cuda else "gloo",
        init_method=init_method,
        rank=rank,
        world_size=world_size,
        timeout=timeout,
        device_id=device if cuda else None,
    )
    try:
        yield time.perf_counter() - started
    finally:
        dist.destroy_process_group()


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @classmethod
    def current(cls) -> World:
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def all_reduce_sum(self, tensor: Tensor) -> Tensor:
        """Sums ``tensor`` over ranks in place (float64 sums stay float64)."""
        if self.distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def all_reduce_grads(self, params: list[torch.nn.Parameter], extra: Tensor) -> Tensor:
        """Sums the gradients of ``params`` (a missing one counts as zeros) and the scalar ``extra`` over
        ranks, in few large float32 buckets; returns the summed ``extra``."""
        if not self.distributed:
            return extra
        pieces: list[tuple[torch.nn.Parameter | None, int]] = [(p, p.numel()) for p in params] + [(None, 1)]
        bucket: list[tuple[torch.nn.Parameter | None, int]] = []
        size = 0
        for i, piece in enumerate(pieces):
            bucket.append(piece)
            size += piece[1]
            if size >= BUCKET_ELEMENTS or i == len(pieces) - 1:
                extra = self._reduce_bucket(bucket, extra)
                bucket, size = [], 0
        return extra

    def _reduce_bucket(self, bucket: list[tuple[torch.nn.Parameter | None, int]], extra: Tensor) -> Tensor:
        def flat(p: torch.nn.Parameter | None) -> Tensor:
            if p is None:
                return extra.detach().reshape(1).float()
            if p.grad is None:
                return torch.zeros(p.numel(), device=p.device, dtype=torch.float32)
            return p.grad.reshape(-1).float()

        buffer = torch.cat([flat(p) for p, _ in bucket])
        dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
        offset = 0
        for p, n in bucket:
            values = buffer[offset : offset + n]
            offset += n
            if p is None:
                extra = values.reshape(()).to(extra.dtype)
            elif p.grad is None:
                p.grad = values.view_as(p).to(p.dtype)
            else:
                p.grad.copy_(values.view_as(p.grad))
        return extra

    def all_gather(self, obj: Any) -> list[Any]:
        if not self.distributed:
            return [obj]
        gathered: list[Any] = [None] * self.size
        dist.all_gather_object(gathered, obj)
        return gathered
