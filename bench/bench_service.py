"""GPU benchmark of `pgttt serve` on a pod with two GPUs or more, driven over HTTP with pgttt's own client.

    python bench/bench_service.py --shared ../shared --out OUT_DIR [--devices cuda:0,cuda:1]

1. Served evaluations of the compat artifact (a challenge .ptz with its sidecar) must return the
   ``gpu_bf16`` numbers of ``compat/expected.json``.
2. A second request with another config (epochs, chunk size, lr) must start computing without a compile
   pause: its result's ``timings.warmup_s``.
3. The 2M-token throughput stream, TTT 3/32K: one job on 1 GPU, the same on every device of
   ``--devices`` (a gang, data parallel), and two 1-GPU jobs at once.

Prints a short table last; everything it measured goes to ``OUT_DIR/service.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from pgttt.client.client import Client
from pgttt.ttt.data import open_shard, write_shard


def log(*args: object) -> None:
    print(*args, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=Path("../shared"))
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    parser.add_argument("--devices", default="cuda:0,cuda:1")
    parser.add_argument("--dry", action="store_true", help="plumbing check on CPUs: 4K tokens, stride 1024")
    parser.add_argument(
        "--cuda-graphs",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="serve with --cuda-graphs (the default) or --no-cuda-graphs",
    )
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    expected = json.loads((args.shared / "compat" / "expected.json").read_text())
    gpu = expected["gpu_bf16"]
    tokenizer = (args.shared / "data" / "tokenizers" / "fineweb_8192_bpe.model").resolve()
    data = (args.shared / "data" / "gutenberg_sp8192").resolve()
    stream_tokens = gpu["throughput_stream"]["tokens"] + 1
    work = Path(tempfile.mkdtemp(prefix="pgttt-bench-"))
    ckpt_dir, data_dir = work / "checkpoints", work / "data"
    ckpt_dir.mkdir()
    shutil.copy(args.shared / "compat" / expected["artifact"], ckpt_dir / "compat.ptz")
    (ckpt_dir / "compat.ptz.json").write_text(json.dumps({"preset": "pg-2026-04-09", "tokenizer": str(tokenizer)}))
    for name, tokens in (
        ("compat", open_shard(data / "fineweb_val_000000.bin")),
        (
            "stream2m",
            np.concatenate(
                [open_shard(data / "fineweb_val_000000.bin"), open_shard(data / "fineweb_train_000000.bin")]
            )[:stream_tokens],
        ),
    ):
        (data_dir / name).mkdir(parents=True)
        write_shard(data_dir / name / "fineweb_val_000000.bin", tokens)
        (data_dir / name / "dataset.json").write_text(json.dumps({"tokenizer": str(tokenizer)}))

    port = free_port()
    server_log = open(args.out / "server.log", "w")
    cmd = [
        sys.executable,
        "-m",
        "pgttt.main",
        "serve",
        "--checkpoint-dir",
        str(ckpt_dir),
        "--data-dir",
        str(data_dir),
        "--devices",
        args.devices,
        "--port",
        str(port),
        "--state-dir",
        str(work / "state"),
    ]
    cmd.append("--cuda-graphs" if args.cuda_graphs else "--no-cuda-graphs")
    t0 = time.perf_counter()
    server = subprocess.Popen(cmd, stdout=server_log, stderr=subprocess.STDOUT, env=os.environ.copy())
    rows: list[dict] = []
    try:
        api = Client(f"http://127.0.0.1:{port}", timeout_s=60)
        api.wait_ready(timeout_s=480, poll_s=2)
        ready_s = time.perf_counter() - t0
        log(f"server ready after {ready_s:.1f}s (load + warm-up of every worker)")

        def run(label: str, dataset: str, gpus: int = 1, **config: object) -> dict:
            started = time.perf_counter()
            if args.dry:
                config = {**config, "max_tokens": 4096, "stride": 1024, "chunk_tokens": 2048}
            job = api.submit("compat", dataset, gpus=gpus, force=True, **config)
            job = api.wait(job.id, poll_s=0.5)
            wall = time.perf_counter() - started
            if job.state != "succeeded":
                raise RuntimeError(f"{label}: job {job.id} {job.state}: {job.error}")
            r = job.result
            row = {
                "case": label,
                "gpus": gpus,
                "wall_s": wall,
                "eval_s": r["timings"]["eval_s"],
                "warmup_s": r["timings"]["warmup_s"],
                "scoring_s": r["timings"]["scoring_s"],
                "training_s": r["timings"]["training_s"],
                "tokens": r["tokens_scored"],
                "tokens_per_s": r["tokens_per_second"],
                "val_bpb": r["val_bpb"],
                "world_size": r["world_size"],
                "group_s": r["timings"].get("group_s"),
            }
            log(json.dumps(row))
            # Per chunk (rank 0's view): where a gang loses time against one GPU. Kept in service.json only.
            row["chunk_s"] = [[c["scoring_s"], c["training_s"]] for c in r["chunks"]]
            rows.append(row)
            return row

        checks = []
        for case in gpu["cases"]:
            if case["kind"] == "sliding":
                row = run("compat sliding", "compat", ttt_epochs=0)
                tol = gpu["tolerance_bpb"]["sliding"]
            else:
                row = run(
                    f"compat ttt {case['epochs']}/{case['chunk_tokens'] // 1024}K",
                    "compat",
                    ttt_epochs=case["epochs"],
                    chunk_tokens=case["chunk_tokens"],
                    ttt_lr=case["lr"],
                )
                tol = gpu["tolerance_bpb"]["ttt"]
            row["ref_bpb"], row["bpb_diff"] = case["val_bpb"], row["val_bpb"] - case["val_bpb"]
            row["within_tol"] = abs(row["bpb_diff"]) <= tol or args.dry
            checks.append(row["within_tol"])
        second = run("2nd config ttt 2/48K lr .01", "compat", ttt_epochs=2, chunk_tokens=49152, ttt_lr=0.01)
        one = run("2M ttt 3/32K, 1 GPU", "stream2m", gpus=1)
        gang = len(args.devices.split(","))  # one job on every device
        ganged = run(f"2M ttt 3/32K, {gang} GPUs", "stream2m", gpus=gang)
        started = time.perf_counter()
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(lambda i: run(f"2M ttt 3/32K, 1 GPU, pair #{i}", "stream2m"), (1, 2)))
        pair_wall = time.perf_counter() - started
        summary = {
            "ready_s": ready_s,
            "second_request_warmup_s": second["warmup_s"],
            "gang_gpus": gang,
            "gang_speedup": one["eval_s"] / ganged["eval_s"],
            "gang_wall_speedup": one["wall_s"] / ganged["wall_s"],
            "gang_bpb_diff": ganged["val_bpb"] - one["val_bpb"],
            "pair_wall_over_single": pair_wall / one["wall_s"],
            "compat_within_tolerance": all(checks),
            "cuda_graphs": args.cuda_graphs,
        }
        (args.out / "service.json").write_text(json.dumps({"rows": rows, "summary": summary}, indent=2))
        log("")
        log(
            f"{'case':34} {'gpus':>4} {'wall s':>7} {'eval s':>7} {'score s':>7} {'train s':>7} {'warm s':>7} "
            f"{'tok/s':>8} {'val_bpb':>10} {'diff':>9}"
        )
        for r in rows:
            diff = f"{r['bpb_diff']:+.1e}" if "bpb_diff" in r else "-"
            log(
                f"{r['case']:34} {r['gpus']:>4} {r['wall_s']:>7.1f} {r['eval_s']:>7.1f} {r['scoring_s']:>7.1f} "
                f"{r['training_s']:>7.1f} {r['warmup_s']:>7.2f} "
                f"{r['tokens_per_s']:>8.0f} {r['val_bpb']:>10.6f} {diff:>9}"
            )
        for key, value in summary.items():
            log(f"{key}: {value}")
        return 0 if all(checks) else 1
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        server_log.close()


if __name__ == "__main__":
    sys.exit(main())
