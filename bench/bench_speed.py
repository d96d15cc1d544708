"""One GPU table for both protocol families (issue 20): the chunked protocol's compat cases and 2M stream, the
pr1855 compat cases, and the phased protocol over the whole gutenberg_caseops val shard, eager and compiled.

    python3 bench/bench_speed.py --checkpoint pr1855.model.bin --frontier ../shared --chunked ../shared \\
        --out $OUT [--compile-cache DIR] [--only phased] [--phased-cuda-graphs] [--profile]

Columns: case, tokens scored, s (the evaluation loop, warm-up apart), tok/s, x ref (the reference's seconds on
the same GPU kind over ours: ``compat/expected.json``'s ``gpu_bf16`` for the chunked family,
``compat/pr1855/expected.json``'s ``reference_<kind>`` (case name -> seconds) for the frontier family; '-'
where there is none), bpb, diff (against the record's or reference's bpb; for the compiled phased rows against
the eager row), TFLOP/s (a FLOP floor per case, below), % of a bf16 matmul rate measured first, peak GiB,
warm-up s and the graphs compiled inside the evaluation call. A case that fails prints its traceback and the
rest still run. Rows go to ``OUT/speed.json`` as they finish; ``--profile`` writes the top CUDA kernels of a
compiled phased run over the first documents to ``OUT/profile_phased.txt``.

FLOP floor of the phased protocol: for every document's chunk c, a forward over its window's L columns (every
layer application, attention causal over the window, the last application and the output layer at the chunk's
columns only, LoRA on every enabled site) and, when the chunk is trained on, a backward of twice that; plus
3x a forward for every global-SGD token, per epoch.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import traceback
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from bench_frontier import GPU_TOLERANCE, case_config
from bench_gpu import (
    case_name,
    compat_config,
    flops_per_token,
    gpu_kind,
    matmul_tflops,
    reference_seconds,
    throughput_stream,
)
from torch._dynamo.utils import counters

from pgttt.checkpoints.config import ModelConfig
from pgttt.ttt import EvalConfig, EvalSession, load_val
from pgttt.ttt.compile_cache import cache_counts, use_compile_cache
from pgttt.ttt.data import write_shard
from pgttt.ttt.documents import chunk_window, find_documents, num_chunks, select_documents
from pgttt.ttt.phased_compiled import PhasedStep

CASEOPS_TOKENIZER = "fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model"


def log(*args: object) -> None:
    print(*args, flush=True)


def position_flops(cfg: ModelConfig, lora_rank: int = 0, sites: tuple[str, ...] = ()) -> float:
    """Matmul FLOPs of one layer application at one position (attention scores apart), LoRA included."""
    d, kv = cfg.model_dim, cfg.num_kv_heads * cfg.head_dim
    out = {"q": d, "k": kv, "v": kv, "o": d, "mlp": d}
    macs = 2 * d * d + 2 * kv * d + 2 * cfg.mlp_hidden * d + sum(lora_rank * (d + out[s]) for s in sites)
    return 2.0 * macs


def phased_flops(cfg: ModelConfig, tokens: np.ndarray, rc: dict[str, Any], schedule: dict[str, Any] | None) -> float:
    apps = len(cfg.layer_schedule())
    rank = rc["ttt_lora_rank"]
    sites = ("q", "v") + tuple(
        s for s, on in (("k", rc["ttt_k_lora"]), ("mlp", rc["ttt_mlp_lora"]), ("o", rc["ttt_o_lora"])) if on
    )
    per_pos = position_flops(cfg, rank, sites)
    head = 2.0 * cfg.model_dim * cfg.vocab_size + 2.0 * rank * (cfg.model_dim + cfg.vocab_size)
    attn = 4.0 * cfg.num_heads * cfg.head_dim  # per (query, key) pair: scores and values
    size, window = rc["ttt_chunk_size"], rc["ttt_eval_seq_len"]
    docs = select_documents(
        find_documents(tokens), max_docs=rc["max_docs"], fraction=rc["val_doc_fraction"], seed=rc["seed"]
    )
    total = 0.0
    for doc in docs:
        n = num_chunks(doc, size)
        for c in range(n):
            w = chunk_window(c, doc.targets, size, window)
            k, length = w.chunk_length, w.length
            forward = (
                (apps - 1) * (length * per_pos + attn * length * (length + 1) / 2)
                + k * per_pos
                + attn * k * length
                + k * head
            )
            total += forward * (3 * rc["ttt_grad_steps"] if c < n - 1 else 1)  # each step: forward, backward
    seq = rc["seq_len"]
    sgd_tokens = sum(p["stream_tokens"] or 0 for p in (schedule or {}).get("phases", []))
    total += (
        3.0
        * rc["global_ttt_epochs"]
        * sgd_tokens
        * (apps * (position_flops(cfg) + attn * (seq + 1) / 2) + 2.0 * cfg.model_dim * cfg.vocab_size)
    )
    return total


def peak_gib(result: Any) -> float:
    return (result.peak_gpu_memory_bytes or 0) / 2**30


class Bench:
    def __init__(self, args: argparse.Namespace, rate: float, kind: str | None) -> None:
        self.args, self.rate, self.kind = args, rate, kind
        self.rows: list[dict[str, Any]] = []

    def wanted(self, name: str) -> bool:
        return not self.args.only or any(part in name for part in self.args.only)

    def case(self, name: str, fn: Any) -> dict[str, Any] | None:
        """Runs ``fn() -> row`` for case ``name``; a failure is logged with its traceback and skipped."""
        if not self.wanted(name):
            return None
        log(f"--- {name}")
        graphs = counters["stats"]["unique_graphs"]
        try:
            row = {"case": name, **fn()}
        except Exception:  # noqa: BLE001 - one failed case must not stop the others
            log(f"{name} FAILED:\n{traceback.format_exc()}")
            self.rows.append({"case": name, "failed": traceback.format_exc(limit=3)})
            return None
        row["graphs"] = counters["stats"]["unique_graphs"] - graphs
        row["pct_matmul"] = 100 * row["tflops"] / self.rate if row.get("tflops") is not None else None
        log(json.dumps({k: v for k, v in row.items() if k not in ("timings",)}, default=str))
        self.rows.append(row)
        self.save()
        return row

    def save(self) -> None:
        summary = {
            "matmul_tflops": self.rate,
            "gpu_kind": self.kind,
            "device": torch.cuda.get_device_name(),
            "torch": torch.__version__,
            "compile_cache": cache_counts(),
            "rows": self.rows,
        }
        (self.args.out / "speed.json").write_text(json.dumps(summary, indent=1, default=str))

    def table(self) -> None:
        log(
            f"\n{'case':34} {'tokens':>8} {'s':>7} {'tok/s':>8} {'x ref':>6} {'bpb':>9} {'diff':>9} "
            f"{'TFLOP/s':>7} {'%mm':>4} {'GiB':>6} {'warm s':>7} {'graphs':>6}"
        )
        for r in self.rows:
            if "failed" in r:
                log(f"{r['case']:34} FAILED (traceback above)")
                continue
            ref = f"{r['ref_s'] / r['s']:.2f}" if r.get("ref_s") else "-"
            diff = f"{r['diff']:+.1e}" if r.get("diff") is not None else "-"
            tf = f"{r['tflops']:.0f}" if r.get("tflops") is not None else "-"
            pct = f"{r['pct_matmul']:.1f}" if r.get("pct_matmul") is not None else "-"
            log(
                f"{r['case']:34} {r['tokens']:>8} {r['s']:>7.1f} {r['tokens'] / r['s']:>8.0f} {ref:>6} "
                f"{r['bpb']:>9.6f} {diff:>9} {tf:>7} {pct:>4} {r['peak_gib']:>6.1f} {r['warmup_s']:>7.1f} "
                f"{r['graphs']:>6}"
            )
        log(f"bf16 matmul rate {self.rate:.0f} TFLOP/s; GPU kind {self.kind}; compile cache {cache_counts()}")
        log(f"compile times (s, by phase, the whole process):\n{torch._dynamo.utils.compile_times()}")


def chunked_cases(bench: Bench, shared: Path) -> None:
    """The chunked family on the compat artifact (as bench_gpu.py runs it)."""
    expected = json.loads((shared / "compat/expected.json").read_text())
    gpu = expected["gpu_bf16"]
    refs = reference_seconds(gpu, bench.kind) or {}
    tokenizer = shared / "data/tokenizers/fineweb_8192_bpe.model"
    data_dir = shared / "data/gutenberg_sp8192"
    session = EvalSession.load(
        shared / "compat" / expected["artifact"], preset=expected["architecture"]["preset"], tokenizer=tokenizer
    )
    # As a server starts: ready once the default config's graphs are compiled, the fallback graph after.
    t0 = time.perf_counter()
    session.warmup(EvalConfig(), device="cuda", seq_lens=[2048], fallback=False)
    log(f"chunked warm-up, ready (default config) {time.perf_counter() - t0:.1f} s")

    def run(name: str, val: Any, cfg: EvalConfig, ref_bpb: float | None) -> dict[str, Any]:
        result = session.evaluate(val, tokenizer, cfg, device="cuda")
        rc, s = result.config, result.timings["eval_s"]
        return {
            "tokens": result.tokens_scored,
            "s": s,
            "ref_s": refs.get(name),
            "bpb": result.val_bpb,
            "diff": None if ref_bpb is None else result.val_bpb - ref_bpb,
            "tflops": flops_per_token(session.config, rc["seq_len"], rc["stride"], rc["ttt_epochs"])
            * result.tokens_per_second
            / 1e12,
            "peak_gib": peak_gib(result),
            "warmup_s": result.timings["warmup_s"],
            "timings": result.timings,
        }

    cases = {case_name(case): (compat_config(case), case["val_bpb"]) for case in gpu["cases"]}
    # A chunk size the ready graphs do not train (32 sequences a chunk): its batches run plain until the rest.
    before = "compat ttt 4/64K before the fallback graph"
    bench.case(before, lambda: run("compat ttt 4/64K", data_dir, *cases["compat ttt 4/64K"]))
    t0 = time.perf_counter()
    session.warmup(EvalConfig(), device="cuda", seq_lens=[2048])
    log(f"chunked warm-up, the rest (the fallback graph) {time.perf_counter() - t0:.1f} s")
    for name, (cfg, bpb) in cases.items():
        bench.case(name, lambda name=name, cfg=cfg, bpb=bpb: run(name, data_dir, cfg, bpb))
    name = "2M stream ttt 3/32K"
    if bench.wanted(name):
        tokens = gpu["throughput_stream"]["tokens"]
        stream = stream_set(bench.args.out / "stream", throughput_stream(data_dir, tokens), session)
        ref_bpb = gpu.get("reference_h200", {}).get("val_bpb", {}).get("throughput_stream_ttt_3_32768")
        bench.case(name, lambda: run(name, stream, EvalConfig(), ref_bpb))
        if bench.args.stream_variants:
            trimmed = throughput_stream(data_dir, tokens, trim_val=session.config.train_seq_len)
            trimmed_set = stream_set(bench.args.out / "stream_trimmed_val", trimmed, session)
            stream_variants(bench, session, run, data_dir, tokenizer, (stream, trimmed_set), ref_bpb)


def stream_set(folder: Path, tokens: np.ndarray, session: EvalSession) -> Any:
    """``tokens`` written to ``folder`` as its val shard, and loaded."""
    folder.mkdir(exist_ok=True)
    write_shard(folder / "fineweb_val_000000.bin", tokens)
    return load_val(folder, session.config.vocab_size)


def stream_variants(
    bench: Bench,
    session: EvalSession,
    run: Any,
    data_dir: Path,
    tokenizer: Path,
    streams: tuple[Any, Any],
    ref_bpb: float | None,
) -> None:
    """Two readings of the reference's 2M stream run that ours may not share, alone and together, TTT 3/32K each
    (diagnostic, for the bpb the reference printed): ``streams`` are ours and the one cut from the *trimmed* val
    (600,065 tokens) then the train shard; the other reading runs from the weights a compat TTT 3/32K run left
    adapted (a harness reusing one model)."""
    stream, trimmed = streams
    worker = session.worker(torch.device("cuda"), "bf16")
    adapted: dict[str, torch.Tensor] = {}  # the compat run's weights, from its first use

    def from_adapted(val: Any) -> dict[str, Any]:
        if not adapted:
            session.evaluate(data_dir, tokenizer, EvalConfig(), device="cuda")  # leaves the weights adapted
            adapted.update({n: p.detach().clone() for n, p in worker.model.named_parameters()})
        pristine = worker.pristine
        worker.pristine = adapted
        try:
            return run("2M stream ttt 3/32K", val, EvalConfig(), ref_bpb)
        finally:
            worker.pristine = pristine

    bench.case("2M stream from trimmed val", lambda: run("2M stream ttt 3/32K", trimmed, EvalConfig(), ref_bpb))
    bench.case("2M stream from compat-TTT weights", lambda: from_adapted(stream))
    bench.case("2M stream trimmed val, compat-TTT weights", lambda: from_adapted(trimmed))


def frontier_cases(bench: Bench, shared: Path, checkpoint: Path) -> None:
    """The phased protocol at pr1855's defaults over the whole val shard: compiled first (the row that matters),
    eager, and with CUDA graphs if asked; then the pr1855 compat cases (eager unless ``--compat-compiled``)."""
    expected = json.loads((shared / "compat/pr1855/expected.json").read_text())
    refs = expected.get(f"reference_{(bench.kind or '').lower()}", {})
    tokenizer = shared / "data/tokenizers" / CASEOPS_TOKENIZER
    session = EvalSession.load(checkpoint)
    valset = load_val(shared / "data/gutenberg_caseops", session.config.vocab_size)

    def run(cfg: EvalConfig, ref_bpb: float | None, ref_s: Any = None) -> dict[str, Any]:
        result = session.evaluate(valset, tokenizer, cfg, device="cuda")
        rc, s = result.config, result.timings["eval_s"]
        if rc["protocol"] == "phased":
            flops = phased_flops(session.config, valset.trimmed(rc["seq_len"], rc["max_tokens"]), rc, result.schedule)
        else:  # doc_masked: one forward per target
            flops = result.tokens_scored * (
                len(session.config.layer_schedule()) * position_flops(session.config)
                + 2.0 * session.config.model_dim * session.config.vocab_size
            )
        if isinstance(ref_s, dict):
            ref_s = ref_s.get("seconds")
        return {
            "tokens": result.tokens_scored,
            "s": s,
            "ref_s": ref_s,
            "bpb": result.val_bpb,
            "diff": None if ref_bpb is None else result.val_bpb - ref_bpb,
            "tflops": flops / s / 1e12,
            "peak_gib": peak_gib(result),
            "warmup_s": result.timings["warmup_s"],
            "timings": result.timings,
            "within_tol": None if ref_bpb is None else abs(result.val_bpb - ref_bpb) <= GPU_TOLERANCE,
        }

    full = EvalConfig(protocol="phased", precision="bf16")
    # The first call compiles (its warm-up s); the second shows that a job after it compiles nothing (graphs 0).
    bench.case(
        "full val phased compiled first",
        lambda: run(replace(full, compile=True), None, refs.get("full_val_pr1855_defaults")),
    )
    if bench.args.profile:  # on the session the first call warmed, before the rows that may run out of time
        try:
            profile_phased(session, valset, tokenizer, bench.args.out)
        except Exception:  # noqa: BLE001 - the table is what matters
            log(f"profile FAILED:\n{traceback.format_exc()}")
    compiled = bench.case(
        "full val phased compiled", lambda: run(replace(full, compile=True), None, refs.get("full_val_pr1855_defaults"))
    )
    if bench.args.all_rows:
        first_row = PhasedStep.first_row
        PhasedStep.first_row = lambda self, model, finished, rows: 0  # type: ignore[method-assign]
        every = bench.case(
            "full val phased compiled all rows",
            lambda: run(replace(full, compile=True), None, refs.get("full_val_pr1855_defaults")),
        )
        PhasedStep.first_row = first_row  # type: ignore[method-assign]
        if every is not None and compiled is not None:
            every["diff"] = every["bpb"] - compiled["bpb"]
    eager = bench.case(
        "full val phased eager", lambda: run(replace(full, compile=False), None, refs.get("full_val_pr1855_defaults"))
    )
    if compiled is not None and eager is not None:
        compiled["diff"] = compiled["bpb"] - eager["bpb"]
    if bench.args.phased_cuda_graphs:
        session.phased_cuda_graphs = True
        graphs = bench.case(
            "full val phased compiled+cudagraphs",
            lambda: run(replace(full, compile=True), None, refs.get("full_val_pr1855_defaults")),
        )
        session.phased_cuda_graphs = False
        if graphs is not None and eager is not None:
            graphs["diff"] = graphs["bpb"] - eager["bpb"]
    how = "compiled" if bench.args.compat_compiled else "eager"  # each case's shapes are graphs of their own
    for case in expected["cpu_fp32"]["cases"]:
        if case.get("role", "").startswith("diagnostic"):
            continue
        cfg = replace(case_config(case), compile=bench.args.compat_compiled)
        bench.case(
            f"pr1855 {case['case']} {how}", lambda cfg=cfg, case=case: run(cfg, case["val_bpb"], refs.get(case["case"]))
        )


def profile_phased(session: EvalSession, valset: Any, tokenizer: Path, out: Path) -> None:
    """The compiled phased protocol over the shard's first 64 documents (one batch of 64 rows, 35 chunk steps)
    under ``torch.profiler``, on a session already warm for pr1855's defaults (so it compiles nothing): the top
    ops by their own CUDA time and by their own CPU time, and the GPU's busy share of the wall time."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cfg = EvalConfig(protocol="phased", precision="bf16", compile=True, max_docs=64)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        result = session.evaluate(valset, tokenizer, cfg, device="cuda")
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    events = prof.key_averages()
    busy = sum(e.self_device_time_total for e in events if e.device_type == DeviceType.CUDA) / 1e6  # kernels
    head = (
        f"profiled: {result.tokens_scored} tokens in {wall:.2f} s under the profiler (eval_s "
        f"{result.timings['eval_s']:.2f}); kernels busy {busy:.2f} s ({100 * busy / wall:.0f}% of the wall)\n"
    )
    tables = [events.table(sort_by=key, row_limit=30) for key in ("self_cuda_time_total", "self_cpu_time_total")]
    (out / "profile_phased.txt").write_text(head + "\n\n".join(tables))
    log(head + tables[0][:8000])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True, help="pr1855.model.bin")
    parser.add_argument(
        "--frontier",
        type=Path,
        default=Path("../shared"),
        help="holds compat/pr1855/expected.json, data/gutenberg_caseops, data/tokenizers",
    )
    parser.add_argument(
        "--chunked",
        type=Path,
        default=Path("../shared"),
        help="holds compat/expected.json and its artifact, data/gutenberg_sp8192, data/tokenizers",
    )
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    parser.add_argument(
        "--compile-cache",
        type=Path,
        default=None,
        help="torch.compile's on-disk caches (a second run with the same folder reuses them)",
    )
    parser.add_argument("--only", nargs="*", default=[], help="run only the cases whose names contain one of these")
    parser.add_argument(
        "--phased-cuda-graphs",
        action="store_true",
        help="one more row: the compiled phased step replayed as CUDA graphs",
    )
    parser.add_argument(
        "--compat-compiled",
        action="store_true",
        help="the pr1855 compat cases compiled (each compiles its own shapes); default eager",
    )
    parser.add_argument(
        "--all-rows",
        action="store_true",
        help="one more row: the compiled phased step over every row of a batch, finished documents' too",
    )
    parser.add_argument("--no-chunked", action="store_true", help="the frontier family only")
    parser.add_argument(
        "--stream-variants",
        action="store_true",
        help="three more 2M stream rows: other readings of the reference's stream run (stream_variants)",
    )
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    pgttt_log = logging.getLogger("pgttt")  # the engine's own lines: each warm-up graph's seconds
    pgttt_log.setLevel(logging.INFO)
    pgttt_log.addHandler(logging.StreamHandler(sys.stdout))
    if args.compile_cache is not None:
        log(f"compile cache {use_compile_cache(args.compile_cache)}")
    name = torch.cuda.get_device_name()
    kind = gpu_kind(name)
    rate = matmul_tflops(torch.device("cuda"))
    log(f"device {name} ({kind}), torch {torch.__version__}, bf16 matmul {rate:.0f} TFLOP/s")
    bench = Bench(args, rate, kind)
    for family in ("frontier", "chunked"):
        if family == "chunked" and args.no_chunked:
            continue
        try:
            if family == "frontier":
                frontier_cases(bench, args.frontier, args.checkpoint)
            else:
                chunked_cases(bench, args.chunked)
        except Exception:  # noqa: BLE001 - a family that cannot load leaves the other's rows
            log(f"{family} family FAILED:\n{traceback.format_exc()}")
        bench.save()
    bench.table()
    bad = [r["case"] for r in bench.rows if "failed" in r or r.get("within_tol") is False]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
