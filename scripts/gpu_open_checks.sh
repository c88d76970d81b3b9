#!/usr/bin/env bash
# The GPU checks the open issues still wait for, in one prepared command for a machine with a CUDA
# GPU, its own python3 (torch, triton, transformers, pytest) and no network. Most important first;
# a step starts only while enough of DEADLINE seconds (default 540: the device allows 600 a
# command) is left, and runs no longer than what is left:
#   1. `pytest -m gpu tests`: every method's end-to-end case (issues 27, 28, 29) and the CUDA graph
#      tests (issue 26);
#   2. issue 29's engine bench: 16 prompts of 3,500-4,000 tokens on the 1B shape (random weights),
#      the training-free readers' decode tokens/s against full and Quest at budget 512 (the
#      calibrated readers need a profile of real weights);
#   3. issue 26's targets: its workload against transformers, with graphs and --enforce-eager.
# Files in $OUT: summary.txt, test_gpu.log, readers.log, loop.log.
#   OUT=/tmp/out bash scripts/gpu_open_checks.sh
set -u
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD
py=${PYTHON:-python3}
end=$(( $(date +%s) + ${DEADLINE:-540} ))

# step LOG LABEL FEWEST MOST COMMAND...: run COMMAND (at most MOST seconds) if FEWEST are left
step() {
  local log=$1 label=$2 fewest=$3 most=$4 left=$(( end - $(date +%s) ))
  shift 4
  if [ "$left" -lt "$fewest" ]; then
    echo "$label: skipped, $left s left" >> "$OUT/summary.txt"
    return
  fi
  echo "=== $label" >> "$OUT/$log"
  timeout $(( left < most ? left : most )) "$@" >> "$OUT/$log" 2>&1
  echo "$label: rc=$?" >> "$OUT/summary.txt"
}

nvidia-smi --query-gpu=name,memory.total --format=csv > "$OUT/summary.txt" 2>&1
step test_gpu.log "pytest -m gpu" 120 420 $py -m pytest -q -m gpu tests
tail -1 "$OUT/test_gpu.log" >> "$OUT/summary.txt" 2>/dev/null
long="--model llama3.2-1b --load-format dummy --num-requests 16 --min-input 3500 --max-input 4000"
for m in full quest tidaldecode rocketkv reattention tokenselect recycled_attention; do
  budget=$([ "$m" = full ] || echo "--budget 512")
  step readers.log "readers: $m" 45 90 $py bench.py $long --min-output 64 --max-output 64 --single-output 0 \
    --method $m $budget
done
for flags in "" "--enforce-eager"; do
  step loop.log "issue 26 workload ${flags:-with graphs}" 120 200 $py bench.py --model llama3.2-1b \
    --load-format dummy --num-requests 128 --compare hf $flags
done
grep -hE "^===|decode_tokens_per_s|output_tokens_per_s|kv_bytes_read|decode_graph_share" \
  "$OUT/readers.log" "$OUT/loop.log" >> "$OUT/summary.txt" 2>/dev/null
