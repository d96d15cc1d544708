"""One rank of the phased multi-process test: ``python -m tests.helpers.phased_dist_worker RANK WORLD INIT OUT``.

Runs each case of ``CASES`` with gloo on the CPU and writes its result to OUT.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from pgttt.ttt.phased import run_phased
from tests.helpers.phased import phased, stream, tiny_model

# One document per batch, so 8 emulated ranks have batches to share and phase 1 trains under both settings.
CASES = {
    "emulate8": dict(ttt_batch_size=1, emulate_ranks=8),
    "emulate1": dict(ttt_batch_size=2, emulate_ranks=1, ttt_warm_start_a=False),
}


def run_case(name: str) -> dict:
    ids, nbytes = stream()
    run = run_phased(tiny_model(), ids, nbytes, phased(**CASES[name]))
    return {
        "loss_sum": run.loss_sum,
        "tokens": run.tokens,
        "bytes": run.bytes,
        "val_bpb": run.val_bpb,
        "counts": run.counts,
        "pauses": run.schedule["pauses"],
        "compliance": run.compliance,
        "trained": [p["trained"] for p in run.schedule["phases"]],
        "batches": [(b.queue_index, b.emulated_rank, b.loss_sum) for b in run.batches],
        "units": {
            "kind": run.units.kind,
            **{name: getattr(run.units, name).tolist() for name in ("first_token", "tokens", "bytes", "loss_sum")},
        },
    }


def main() -> None:
    rank, world, init_file, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], Path(sys.argv[4])
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        for name in CASES:
            (out / f"{name}.{rank}.json").write_text(json.dumps(run_case(name)))
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
    # Everything is written and the group is gone: leave without interpreter finalization, where gloo's own
    # threads can still abort the process ("terminate called without an active exception", seen once under load).
    sys.stdout.flush()
    os._exit(0)
