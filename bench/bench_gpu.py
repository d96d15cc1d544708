"""GPU benchmark of the evaluation engine on the compat artifact: checks and times everything in one go.

    python bench/bench_gpu.py --shared ../shared --out OUT_DIR

1. The ``gpu_bf16`` cases of ``compat/expected.json`` on the full val shard: bpb against the reference's.
2. The 2,000,000-token throughput stream (val tokens, then train tokens): TTT 3/32K, TTT 4/64K and sliding
   windows.
   Seconds are compared ("x ref") only with the reference evaluators' seconds on the same GPU kind, read
   from ``compat/expected.json`` (``REFERENCE_SECTIONS``); on a kind the file has no figures for, or a case
   it did not time, the script prints no ratio and says so.
3. The floor: FLOPs per scored token for each mode, achieved TFLOP/s against a measured bf16 matmul rate.
4. A second request with another config after warm-up, to show it does not compile.
5. A profile of one scoring batch and one training step (top CUDA kernels) under ``OUT_DIR``.

Prints a short table last; full results as JSON under ``OUT_DIR``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from pgttt.checkpoints.config import ModelConfig
from pgttt.ttt.config import EvalConfig
from pgttt.ttt.data import load_val, open_shard, trim_stream, write_shard
from pgttt.ttt.session import EvalSession

# GPU kind -> where ``gpu_bf16`` in compat/expected.json keeps the reference evaluators' seconds on that kind.
# "": the section itself (its note: "Reference evaluators on one H100"); otherwise the key of a sub-section.
REFERENCE_SECTIONS = {"H100": "", "H200": "reference_h200"}


def gpu_kind(device_name: str) -> str | None:
    """``H100``, ``H200``, ... from ``torch.cuda.get_device_name`` (``NVIDIA H200``, ``NVIDIA H100 80GB HBM3``)."""
    match = re.search(r"\b([A-Z]{1,2}\d{2,4})\b", device_name.upper())
    return match.group(1) if match else None


def reference_seconds(gpu: dict, kind: str | None) -> dict[str, float] | None:
    """Case name -> the reference's seconds on ``kind``, from ``expected.json``'s ``gpu_bf16``; None when the
    file has no figures for that kind (then no ratio may be printed: another GPU's times do not compare)."""
    if kind not in REFERENCE_SECTIONS:
        return None
    key = REFERENCE_SECTIONS[kind]
    if not key:
        out = {case_name(case): case["reference_seconds"] for case in gpu["cases"] if "reference_seconds" in case}
        stream = gpu["throughput_stream"].get("reference_ttt_3_32768_seconds")
    else:
        if key not in gpu:
            return None
        section = gpu[key]
        fields = (("compat sliding", "sliding_seconds"), ("compat ttt 3/32K", "ttt_3_32768_seconds"))
        out = {name: section[field] for name, field in fields if field in section}
        stream = section.get("throughput_stream_ttt_3_32768_seconds")
    if stream is not None:
        out["2M stream ttt 3/32K"] = stream
    return out


def reference_first_call_seconds(gpu: dict, kind: str | None) -> float | None:
    """The reference's first call on ``kind``, compile included, when the file timed one."""
    key = REFERENCE_SECTIONS.get(kind or "")
    return gpu.get(key, {}).get("first_call_with_compile_seconds") if key else None


def case_name(case: dict) -> str:
    if case["kind"] == "sliding":
        return "compat sliding"
    return f"compat ttt {case['epochs']}/{case['chunk_tokens'] // 1024}K"


def compat_config(case: dict) -> EvalConfig:
    """A ``compat/expected.json`` GPU case's settings."""
    if case["kind"] == "sliding":
        return EvalConfig(seq_len=case["seq_len"], stride=case["stride"], ttt_epochs=0)
    return EvalConfig(
        seq_len=case["seq_len"],
        stride=case["stride"],
        ttt_epochs=case["epochs"],
        chunk_tokens=case["chunk_tokens"],
        ttt_lr=case["lr"],
        ttt_momentum=case["momentum"],
        batch_seqs=case["batch_seqs"],
    )


def throughput_stream(data_dir: Path, tokens: int, *, trim_val: int | None = None) -> np.ndarray:
    """``expected.json``'s ``throughput_stream``: the val shard's tokens then the train shard's, the first
    ``tokens + 1``. ``trim_val``: the val part cut to its ``usable + 1`` at that seq_len first (a reading of the
    reference's run that ``bench_speed.py --stream-variants`` tries)."""
    val = np.asarray(open_shard(data_dir / "fineweb_val_000000.bin"))
    if trim_val is not None:
        val = trim_stream(val, trim_val)
    train = np.asarray(open_shard(data_dir / "fineweb_train_000000.bin"))
    return np.concatenate([val, train])[: tokens + 1]


def log(*args: object) -> None:
    print(*args, flush=True)


def flops_per_token(cfg: ModelConfig, seq_len: int, stride: int, epochs: int) -> float:
    """Forward over every window position, logits only where scored; TTT: forward+backward (3x) per epoch."""
    d, kv = cfg.model_dim, cfg.num_kv_heads * cfg.head_dim
    matmul = 2 * d * d + 2 * kv * d + 2 * cfg.mlp_hidden * d
    apps = len(cfg.layer_schedule())
    per_position = 2 * matmul * apps + 4 * cfg.num_heads * cfg.head_dim * (seq_len + 1) / 2 * apps
    logits = 2 * d * cfg.vocab_size
    scoring = seq_len / stride * per_position + logits
    training = 3 * epochs * (per_position + logits)
    return scoring + training


def time_cuda(fn, reps: int = 20) -> float:
    """Median seconds of ``fn()`` on the GPU, after three untimed calls."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return float(np.median(times))


def matmul_tflops(device: torch.device) -> float:
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    return 2 * n**3 / time_cuda(lambda: a @ b) / 1e12


def profile(session: EvalSession, tokens_dir: Path, tokenizer: Path, out: Path, device: torch.device) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    cfg = EvalConfig(ttt_epochs=1, chunk_tokens=65536, max_tokens=131072)
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        session.evaluate(tokens_dir, tokenizer, cfg, device=device)
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=40)
    (out / "profile.txt").write_text(table)
    log(table[:6000])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=Path("../shared"))
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    parser.add_argument("--skip-stream", action="store_true", help="only the compat cases")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="short lease: warm the default config only; 2M TTT 3/32K first, then the compat "
        "cases, sliding windows and the second request",
    )
    parser.add_argument(
        "--cuda-graphs",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="replay the static training graphs as CUDA graphs (default on, as in the service)",
    )
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda")
    expected = json.loads((args.shared / "compat" / "expected.json").read_text())
    gpu = expected["gpu_bf16"]
    artifact = args.shared / "compat" / expected["artifact"]
    tokenizer = args.shared / "data" / "tokenizers" / "fineweb_8192_bpe.model"
    data_dir = args.shared / "data" / "gutenberg_sp8192"
    device_name = torch.cuda.get_device_name(device)
    kind = gpu_kind(device_name)
    ref_seconds = reference_seconds(gpu, kind)
    log(f"device {device_name}, torch {torch.__version__}")
    if ref_seconds is None:
        log(
            f"expected.json has no reference seconds for GPU kind {kind or device_name!r} (it has: "
            f"{', '.join(k for k in REFERENCE_SECTIONS if reference_seconds(gpu, k) is not None)}): "
            "no 'x ref' ratios will be printed"
        )
        ref_seconds = {}
    else:
        log(f"'x ref': the reference evaluators' seconds on one {kind} (expected.json), over ours")

    rate = matmul_tflops(device)
    log(f"measured bf16 matmul rate (8192^3): {rate:.0f} TFLOP/s")

    t0 = time.perf_counter()
    session = EvalSession.load(
        artifact, preset=expected["architecture"]["preset"], tokenizer=tokenizer, cuda_graphs=args.cuda_graphs
    )
    load_s = time.perf_counter() - t0
    model_cfg = session.config
    rows: list[dict] = []

    def run(name: str, val: object, cfg: EvalConfig, ref_bpb: float | None, tol: float | None) -> dict:
        result = session.evaluate(val, tokenizer, cfg, device=device)
        rc = result.config
        secs = result.timings["eval_s"]
        tps = result.tokens_per_second
        ref_s = ref_seconds.get(name)
        fl = flops_per_token(model_cfg, rc["seq_len"], rc["stride"], rc["ttt_epochs"])
        row = {
            "case": name,
            "tokens": result.tokens_scored,
            "seconds": secs,
            "tokens_per_s": tps,
            "ref_seconds": ref_s,
            "speedup": (ref_s / secs) if ref_s else None,
            "val_bpb": result.val_bpb,
            "ref_bpb": ref_bpb,
            "bpb_diff": (result.val_bpb - ref_bpb) if ref_bpb is not None else None,
            "within_tol": (abs(result.val_bpb - ref_bpb) <= tol) if ref_bpb is not None else None,
            "peak_gib": (result.peak_gpu_memory_bytes or 0) / 2**30,
            "warmup_s": result.timings["warmup_s"],
            "scoring_s": result.timings["scoring_s"],
            "training_s": result.timings["training_s"],
            "tflops": fl * tps / 1e12,
            "compliance": result.compliance,
        }
        log(json.dumps({k: v for k, v in row.items() if k != "compliance"}))
        rows.append(row)
        return row

    # Warm-up once for the default shapes: what a server pays at start.
    t0 = time.perf_counter()
    warm_s = session.warmup(EvalConfig(), device=device, seq_lens=[2048])
    if not args.quick:
        warm_s += session.warmup(EvalConfig(chunk_tokens=65536), device=device, seq_lens=[2048])
    log(f"load {load_s:.1f}s, warm-up {warm_s:.1f}s ({time.perf_counter() - t0:.1f}s wall)")

    tmp = Path(tempfile.mkdtemp())
    write_shard(tmp / "fineweb_val_000000.bin", throughput_stream(data_dir, gpu["throughput_stream"]["tokens"]))
    stream_set = load_val(tmp, model_cfg.vocab_size)
    if args.quick:
        run("2M stream ttt 3/32K", stream_set, EvalConfig(), None, None)

    for case in gpu["cases"]:
        cfg = compat_config(case)
        tol = gpu["tolerance_bpb"]["sliding" if case["kind"] == "sliding" else "ttt"]
        run(case_name(case), data_dir, cfg, case["val_bpb"], tol)

    if not args.skip_stream and not args.quick:
        run("2M stream ttt 3/32K", stream_set, EvalConfig(), None, None)
        run("2M stream ttt 4/64K", stream_set, EvalConfig(ttt_epochs=4, chunk_tokens=65536), None, None)
    if not args.skip_stream:
        run("2M stream sliding", stream_set, EvalConfig(ttt_epochs=0), None, None)
    if not args.skip_stream:
        # A request with another config after warm-up: its warmup_s shows whether it compiled.
        second = run(
            "2nd request ttt 2/48K lr .01",
            stream_set,
            replace(EvalConfig(), ttt_epochs=2, chunk_tokens=49152, ttt_lr=0.01, max_tokens=400_000),
            None,
            None,
        )
        log(f"second request warm-up (compile) seconds: {second['warmup_s']:.2f}")

    first_call = reference_first_call_seconds(gpu, kind)
    summary = {
        "matmul_tflops": rate,
        "load_s": load_s,
        "warmup_s": warm_s,
        "cuda_graphs": args.cuda_graphs,
        "device": device_name,
        "gpu_kind": kind,
        "reference_first_call_s": first_call,
        "torch": torch.__version__,
        "rows": rows,
    }
    (args.out / "bench.json").write_text(json.dumps(summary, indent=2))
    log("")
    log(
        f"{'case':32} {'tokens':>9} {'s':>7} {'tok/s':>9} {'x ref':>6} {'val_bpb':>10} {'diff':>9} "
        f"{'ok':>3} {'TFLOP/s':>8} {'%mm':>4} {'GiB':>5}"
    )
    for r in rows:
        diff = f"{r['bpb_diff']:+.1e}" if r["bpb_diff"] is not None else "-"
        ok = {True: "yes", False: "NO", None: "-"}[r["within_tol"]]
        speed = f"{r['speedup']:.2f}" if r["speedup"] else "-"
        log(
            f"{r['case']:32} {r['tokens']:>9} {r['seconds']:>7.1f} {r['tokens_per_s']:>9.0f} {speed:>6} "
            f"{r['val_bpb']:>10.6f} {diff:>9} {ok:>3} {r['tflops']:>8.0f} {100 * r['tflops'] / rate:>4.0f} "
            f"{r['peak_gib']:>5.1f}"
        )
    first = f" (the reference's first call on one {kind}, compile included: {first_call:.1f}s)" if first_call else ""
    log(f"matmul {rate:.0f} TFLOP/s; load {load_s:.1f}s; warm-up {warm_s:.1f}s{first}")
    log(
        f"x ref: against the reference's seconds on one {kind} from expected.json"
        if ref_seconds
        else "x ref: none printed, expected.json has no reference seconds for this GPU kind"
    )
    if args.profile:  # last: the table above is already out if the lease runs short
        profile(session, tmp, tokenizer, args.out, device)
    bad = [r["case"] for r in rows if r["within_tol"] is False or not r["compliance"]["score_before_update"]]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
