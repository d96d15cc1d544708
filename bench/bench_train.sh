#!/usr/bin/env bash
# Issue 5's GPU run: train the pg-2026-04-09 preset on gutenberg_sp8192 for about three minutes on one GPU,
# quantize it (GPTQ) into model.bin, then evaluate that model.bin with TTT (default settings); the training
# log's last line has val_bpb before and after quantization (sliding windows, the TTT-free figure).
#
#   bench/bench_train.sh SHARED_DIR OUT_DIR        (on the GPU machine: after `source bench/gpu_env.sh`)
# TRAIN_ARGS adds arguments to `pgttt train` (a CPU plumbing check: TRAIN_ARGS="--preset tiny --set ...").
set -euo pipefail
shared=${1:-../shared}
out=${2:-bench-out}
work=${WORK_DIR:-/tmp/pgttt-train}
data=$shared/data/gutenberg_sp8192
tokenizer=$shared/data/tokenizers/fineweb_8192_bpe.model
mkdir -p "$out" "$work"
start=$(date +%s)
python3 -m pgttt.main train --data "$data" --tokenizer "$tokenizer" -o "$work/model.bin" --run-dir "$work/run" \
  --set max_wallclock_seconds=180 --set train_log_every=25 --set gptq_calibration_batches=8 ${TRAIN_ARGS:-} 2>&1 | tee "$out/train.log"
echo "train command: $(( $(date +%s) - start )) s wall (start-up, compile, training, evals, GPTQ)" | tee -a "$out/train.log"
python3 -m pgttt.main inspect "$work/model.bin" 2>&1 | tee "$out/inspect.txt"
python3 -m pgttt.main eval --checkpoint "$work/model.bin" --tokenizer "$tokenizer" --val "$data" --no-compile \
  --json --quiet > "$out/eval-ttt.json"
python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print('TTT (defaults):', r['val_bpb'], r['timings'])" \
  "$out/eval-ttt.json"
