"""How fast the GPUs of this machine all-reduce a TTT step's gradients, through torch.distributed and NCCL.

    NCCL_DEBUG=INFO python bench/bench_allreduce.py [--preset pg-2026-04-09] [--reps 20]

One process per visible GPU all-reduces a float32 buffer the size of the preset's parameters (what a
data-parallel TTT step sends, spec section 4) and a few smaller ones, and prints the median milliseconds
and the bus bandwidth (NCCL's measure: 2 (n - 1) / n bytes per rank). With ``NCCL_DEBUG=INFO`` NCCL logs
which transport each channel takes (P2P over NVLink or PCIe, or SHM through host memory).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pgttt.checkpoints.config import PRESETS
from pgttt.checkpoints.model import GPT


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(rank: int, world: int, port: int, sizes: list[int], reps: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=world, device_id=torch.device("cuda", rank))
    if rank == 0:
        peers = [torch.cuda.can_device_access_peer(0, j) for j in range(1, world)]
        print(
            f"{world} GPUs, {torch.cuda.get_device_name(0)}; GPU 0 can access its peers directly: {peers}", flush=True
        )
    for n in sizes:
        buf = torch.ones(n, device="cuda", dtype=torch.float32)
        for _ in range(3):
            dist.all_reduce(buf)
        torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            dist.barrier()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            dist.all_reduce(buf)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        if rank == 0:
            ms = statistics.median(times) * 1e3
            bus = 2 * (world - 1) / world * n * 4 / (ms / 1e3) / 1e9
            print(
                f"all-reduce {n:>11,} float32 ({n * 4 / 2**20:7.1f} MiB): {ms:8.2f} ms median of {reps}, "
                f"bus bandwidth {bus:6.1f} GB/s",
                flush=True,
            )
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="pg-2026-04-09")
    parser.add_argument("--reps", type=int, default=20)
    args = parser.parse_args()
    world = torch.cuda.device_count()
    if world < 2:
        raise SystemExit(f"{world} GPU(s) visible: an all-reduce needs at least 2")
    with torch.device("meta"):
        params = sum(p.numel() for p in GPT(PRESETS[args.preset]).parameters())
    print(f"{args.preset}: {params:,} parameters, {params * 4 / 2**20:.1f} MiB of float32 gradients a step")
    sizes = [params, 1 << 22, 1 << 20]
    mp.spawn(worker, args=(world, free_port(), sizes, args.reps), nprocs=world)


if __name__ == "__main__":
    main()
