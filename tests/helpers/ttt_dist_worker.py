"""One rank of the engine's multi-process test: ``python -m tests.helpers.ttt_dist_worker RANK WORLD INIT OUT``.

Runs the cases of ``CASES`` with gloo on the CPU and writes each result (and the final weights) to OUT.
"""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from pgttt.ttt.chunked import run_chunked
from pgttt.ttt.config import EvalConfig
from pgttt.ttt.data import trim_stream
from pgttt.ttt.doc_masked import run_doc_masked
from tests.helpers.frontier import seeded, tiny
from tests.helpers.ttt import MICRO, micro_model, random_tables

CASES = {
    "sliding": EvalConfig(seq_len=16, stride=4, ttt_epochs=0, batch_seqs=3),
    # Batches of 3 sequences split 1 + 2 over the ranks: the weighting must still give the batch mean.
    # (A larger rate, 0.2, makes training chaotic enough to amplify float32 noise to 1e-5 in the weights.)
    "ttt": EvalConfig(seq_len=16, stride=5, ttt_epochs=2, chunk_tokens=80, batch_seqs=3, ttt_lr=0.02),
    # One sequence per batch: rank 0 holds none and contributes zero gradients.
    "ttt_single": EvalConfig(
        seq_len=8,
        stride=8,
        ttt_epochs=1,
        chunk_tokens=40,
        batch_seqs=1,
        ttt_lr=0.1,
        optimizer="adamw",
        adapt_exclude=("tok_emb.*",),
    ),
}


def stream() -> np.ndarray:
    return np.random.default_rng(11).integers(0, MICRO.vocab_size, 400).astype(np.uint16)


def run_case(name: str) -> tuple[dict, torch.nn.Module]:
    cfg = CASES[name].resolved(MICRO, "cpu")
    model = copy.deepcopy(micro_model(seed=5))
    run = run_chunked(model, trim_stream(stream(), cfg.seq_len), random_tables(MICRO.vocab_size, seed=6), cfg)
    summary = {
        "loss_sum": run.loss_sum,
        "tokens": run.tokens,
        "bytes": run.bytes,
        "val_bpb": run.val_bpb,
        "compliance": run.compliance,
        "chunks": len(run.chunks),
        "units": units_dict(run.units),
    }
    return summary, model


def units_dict(units) -> dict:
    return {
        "kind": units.kind,
        **{name: getattr(units, name).tolist() for name in ("first_token", "tokens", "bytes", "loss_sum")},
    }


def doc_masked_stream() -> np.ndarray:
    """Documents of 1..29 tokens after their BOS: some cross a sequence, a batch and the ranks' shares."""
    rng = np.random.default_rng(12)
    ids: list[int] = []
    while len(ids) < 16 * 9 + 1:
        ids += [1, *rng.integers(2, 64, int(rng.integers(1, 30))).tolist()]
    return np.array(ids[: 16 * 9 + 1])


def run_doc_masked_case() -> dict:
    """The doc_masked pass with batches of one sequence: 9 sequences, rank 0 scores 0-3, rank 1 scores 4-8."""
    model = seeded(tiny("pr1855"))
    cfg = EvalConfig(protocol="doc_masked", seq_len=16, val_batch_tokens=8 * 16).resolved(model.config, "cpu")
    run = run_doc_masked(model, doc_masked_stream(), random_tables(64, seed=6), cfg)
    return {"loss_sum": run.loss_sum, "tokens": run.tokens, "bytes": run.bytes, "units": units_dict(run.units)}


def main() -> None:
    rank, world, init_file, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], Path(sys.argv[4])
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        for name in CASES:
            summary, model = run_case(name)
            (out / f"{name}.{rank}.json").write_text(json.dumps(summary))
            torch.save(model.state_dict(), out / f"{name}.{rank}.pt")
        (out / f"doc_masked.{rank}.json").write_text(json.dumps(run_doc_masked_case()))
        dist.barrier()  # neither rank tears gloo down while the other still talks to it
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
    # Everything is written and the group is gone: leave without interpreter finalization, where gloo's own
    # threads can still abort the process ("terminate called without an active exception", seen once under load).
    sys.stdout.flush()
    os._exit(0)
