#!/usr/bin/env bash
# The GPU checks of issue 25 (kernels) in one prepared command, for a machine with a CUDA GPU,
# its own python3 (torch, triton, transformers, pytest) and no network. Five files go to $OUT
# (the device tool brings back at most eight): summary.txt, test_gpu.log, kernels.json,
# kernels.md, engine.log.
#   OUT=/tmp/out bash scripts/gpu_check.sh            (about 10 minutes on an H200)
set -u
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD
py=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total --format=csv > "$OUT/summary.txt" 2>&1
timeout 300 $py -m pytest -q -m gpu -x tests > "$OUT/test_gpu.log" 2>&1
echo "make test-gpu: rc=$? $(tail -1 "$OUT/test_gpu.log")" >> "$OUT/summary.txt"
timeout 240 $py -m nanokv.kernels.bench --json "$OUT/kernels.json" > "$OUT/kernels.md" 2>&1
echo "kernels.bench: rc=$?" >> "$OUT/summary.txt"
$py -m nanokv.kernels.bench --markdown "$OUT/kernels.json" >> "$OUT/kernels.md" 2>&1
# issue 25's engine runs: a 1B Llama shape, 16 prompts of 3,500-4,000 tokens, 64 out
for m in "full" "quest --budget 512" "kivi --method-arg bits=4" "snapkv --compression 0.75"; do
  echo "=== --method $m" >> "$OUT/engine.log"
  timeout 150 $py bench.py --model llama3.2-1b --load-format dummy --num-requests 16 --min-input 3500 \
    --max-input 4000 --min-output 64 --max-output 64 --single-output 0 --method $m >> "$OUT/engine.log" 2>&1
  echo "engine --method $m: rc=$?" >> "$OUT/summary.txt"
done
grep -E "^===|decode_tokens_per_s|prefill_tokens_per_s|kv_bytes_read" "$OUT/engine.log" >> "$OUT/summary.txt"
