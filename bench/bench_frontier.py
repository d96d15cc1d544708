"""GPU benchmark of the frontier records' evaluation: the pr1855 compat cases in bf16, and the phased
protocol at the 1.0611 record's settings over the whole gutenberg_caseops val shard.

    python3 bench/bench_frontier.py --checkpoint pr1855.model.bin --shared ../shared --out $OUT [--full-limit-s 300]

The checkpoint is ``pgttt import ../shared/compat/pr1855/r0427_s42.int6.ptz --preset pr1855 -o pr1855.model.bin``
(made on a CPU: the import runs lrzip). Each compat case runs as the record's own evaluator ran it (world size
1, ``emulate_ranks=1``, every setting of its ``env``) and is compared with the fp32 numbers of
``compat/pr1855/expected.json``: issue 18 asks for bf16 within 2e-3 of them. Prints one table; the whole
results go to ``OUT/frontier.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from pgttt.ttt import EvalConfig, EvalSession, load_val

# The record's environment variables the compat cases set, as EvalConfig fields (the rest: pr1855's defaults).
CASE_FIELDS = {
    "SEED": "seed",
    "TTT_BATCH_SIZE": "ttt_batch_size",
    "TTT_CHUNK_SIZE": "ttt_chunk_size",
    "TTT_EVAL_SEQ_LEN": "ttt_eval_seq_len",
    "TTT_LORA_LR": "ttt_lora_lr",
    "TTT_LORA_RANK": "ttt_lora_rank",
    "TTT_BETA2": "ttt_beta2",
    "TTT_WEIGHT_DECAY": "ttt_weight_decay",
    "PHASED_TTT_PREFIX_DOCS": "phased_ttt_prefix_docs",
    "PHASED_TTT_NUM_PHASES": "phased_ttt_num_phases",
    "GLOBAL_TTT_CHUNK_TOKENS": "global_ttt_chunk_tokens",
    "GLOBAL_TTT_LR": "global_ttt_lr",
    "GLOBAL_TTT_MOMENTUM": "global_ttt_momentum",
    "VAL_BATCH_TOKENS": "val_batch_tokens",
}
GPU_TOLERANCE = 2e-3  # issue 18: bf16 on a GPU within 2e-3 of the record's fp32 numbers


def case_config(case: dict) -> EvalConfig:
    fields = EvalConfig.__dataclass_fields__
    settings = {}
    for env, name in CASE_FIELDS.items():
        if env in case["env"] and name in fields:
            kind = type(fields[name].default) if fields[name].default is not None else float
            raw = case["env"][env]
            settings[name] = int(raw) if kind is int or raw.isdigit() else float(raw)
    if case["kind"] == "eval_val":
        return EvalConfig(
            protocol="doc_masked",
            max_tokens=case["prefix_tokens"] - 1,
            precision="bf16",
            **{k: v for k, v in settings.items() if k in ("val_batch_tokens", "seed")},
        )
    return EvalConfig(
        protocol="phased",
        emulate_ranks=1,
        max_tokens=case["prefix_tokens"] - 1,
        precision="bf16",
        **{k: v for k, v in settings.items() if k != "val_batch_tokens"},
    )


def timed(session: EvalSession, valset, tokenizer: Path, config: EvalConfig) -> tuple[dict, float]:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    result = session.evaluate(valset, tokenizer, config, device="cuda").to_dict()
    torch.cuda.synchronize()
    return result, time.perf_counter() - t0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--shared", type=Path, default=Path("../shared"))
    parser.add_argument("--out", type=Path, default=Path("out"))
    parser.add_argument(
        "--full",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also the phased protocol at pr1855's defaults over the whole val shard",
    )
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    expected = json.loads((args.shared / "compat/pr1855/expected.json").read_text())
    tokenizer = args.shared / "data/tokenizers/fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model"
    print(f"device {torch.cuda.get_device_name()} torch {torch.__version__}", flush=True)

    t0 = time.perf_counter()
    session = EvalSession.load(args.checkpoint)
    valset = load_val(args.shared / "data/gutenberg_caseops", session.config.vocab_size)
    print(f"loaded {args.checkpoint} in {time.perf_counter() - t0:.1f} s", flush=True)

    rows, results = [], {}
    for case in expected["cpu_fp32"]["cases"]:
        if case.get("role", "").startswith("diagnostic"):
            continue
        config = case_config(case)
        timed(session, valset, tokenizer, config)  # first call: CUDA kernels, allocator
        result, seconds = timed(session, valset, tokenizer, config)
        diff = result["val_bpb"] - case["val_bpb"]
        results[case["case"]] = {"result": result, "seconds": seconds, "diff_vs_fp32": diff}
        rows.append(
            (
                case["case"],
                result["tokens_scored"],
                seconds,
                result["val_bpb"],
                case["val_bpb"],
                diff,
                abs(diff) <= GPU_TOLERANCE,
                result["peak_gpu_memory_bytes"],
            )
        )
        print(
            f"{case['case']}: bpb {result['val_bpb']:.6f} (fp32 {case['val_bpb']:.6f}, {diff:+.2e}) {seconds:.2f} s",
            flush=True,
        )

    if args.full:  # issue 20's case: phased at the record's settings (8 emulated ranks) over the whole shard
        config = EvalConfig(protocol="phased", precision="bf16")
        result, seconds = timed(session, valset, tokenizer, config)
        results["full_val_pr1855_defaults"] = {"result": result, "seconds": seconds}
        rows.append(
            (
                "full_val_pr1855_defaults",
                result["tokens_scored"],
                seconds,
                result["val_bpb"],
                math.nan,
                math.nan,
                None,
                result["peak_gpu_memory_bytes"],
            )
        )
        print(f"full val: {result['timings']}", flush=True)

    (args.out / "frontier.json").write_text(json.dumps(results, indent=1, default=str))
    print(f"\n{'case':<26} {'tokens':>8} {'s':>8} {'tok/s':>9} {'bpb':>10} {'fp32':>10} {'diff':>9} ok  peak GiB")
    for name, tokens, seconds, bpb, ref, diff, ok, peak in rows:
        print(
            f"{name:<26} {tokens:>8} {seconds:>8.2f} {tokens / seconds:>9.0f} {bpb:>10.6f} {ref:>10.6f} "
            f"{diff:>+9.2e} {'-' if ok is None else 'yes' if ok else 'NO'} {(peak or 0) / 2**30:8.2f}"
        )
    return 0 if all(r[6] is not False for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
