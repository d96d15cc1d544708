"""Phased LoRA TTT on the first documents of the gutenberg_caseops val shard, eager then compiled twice: what
the compiled chunk step's warm-up costs and what a job after it takes, when the whole shard does not fit a call.

    python3 bench/bench_phased_subset.py --checkpoint pr1855.model.bin --frontier ../shared --docs 256 --out $OUT
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from pgttt.ttt import EvalConfig, EvalSession, load_val

CASEOPS_TOKENIZER = "fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--frontier", type=Path, required=True, help="the folder holding data/ (../shared)")
    parser.add_argument("--docs", type=int, default=256)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    session = EvalSession.load(args.checkpoint)
    valset = load_val(args.frontier / "data/gutenberg_caseops", session.config.vocab_size)
    tokenizer = args.frontier / "data/tokenizers" / CASEOPS_TOKENIZER
    rows = []
    for name, compiled in (("eager", False), ("compiled first", True), ("compiled", True)):
        cfg = EvalConfig(
            protocol="phased",
            precision="bf16",
            compile=compiled,
            max_docs=args.docs,
            phased_ttt_prefix_docs=args.docs // 2,
        )
        t0 = time.perf_counter()
        result = session.evaluate(valset, tokenizer, cfg, device="cuda")
        row = {
            "case": name,
            "docs": args.docs,
            "tokens": result.tokens_scored,
            "bpb": result.val_bpb,
            "eval_s": result.timings["eval_s"],
            "warmup_s": result.timings["warmup_s"],
            "call_s": time.perf_counter() - t0,
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
        (args.out / "phased_subset.json").write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
