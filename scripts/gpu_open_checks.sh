#!/usr/bin/env bash
# The GPU checks the open issues still wait for, in prepared commands for a machine with a CUDA GPU,
# its own python3 (torch, triton, transformers, pytest, pytest-xdist) and no network. STEPS picks
# which run (default: all three, most important first); a step starts only while enough of DEADLINE
# seconds (default 540: the device allows 600 a command) is left, and runs no longer than what is left:
#   tests    `pytest -m gpu tests` over WORKERS processes (default 8; pytest-xdist, where installed):
#            every method's end-to-end case (issues 27, 28, 29) and the CUDA graph tests (issue 26);
#   readers  issue 29's engine bench: 16 prompts of 3,500-4,000 tokens on the 1B shape (random
#            weights), each of the nine readers' decode tokens/s against full and Quest at budget 512.
#            The four calibrated ones read profiles made here of the same random weights over random
#            token ids (`python -m nanokv.calibrate ... --load-format dummy`): right in shape, so right
#            for timing, and saying nothing of a real model;
#   loop     issue 26's targets: its workload against transformers, with graphs and --enforce-eager.
# Files in $OUT: summary.txt, test_gpu.log, readers.log, loop.log. One device session has 15 minutes,
# so the steps go in two calls on one warm machine:
#   OUT=$OUT STEPS=tests bash scripts/gpu_open_checks.sh
#   OUT=$OUT STEPS="readers loop" DEADLINE=300 bash scripts/gpu_open_checks.sh
# The device has no gguf: carry its wheel in .whl/ (ignored by git), which is installed first.
set -u
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD
if ls .whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PWD:/tmp/site
fi
py=${PYTHON:-python3}
steps=" ${STEPS:-tests readers loop} "
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
  local start=$(date +%s)
  timeout $(( left < most ? left : most )) "$@" >> "$OUT/$log" 2>&1
  echo "$label: rc=$? in $(( $(date +%s) - start )) s" >> "$OUT/summary.txt"
}

nvidia-smi --query-gpu=name,memory.total --format=csv >> "$OUT/summary.txt" 2>&1
if [[ $steps == *" tests "* ]]; then
  workers=$($py -c "import xdist" 2> /dev/null && echo "-n ${WORKERS:-8}")
  step test_gpu.log "pytest -m gpu ${workers:-}" 120 480 $py -m pytest -q -m gpu ${workers:-} tests
  tail -1 "$OUT/test_gpu.log" >> "$OUT/summary.txt" 2> /dev/null
fi
if [[ $steps == *" readers "* ]]; then
  shape="--model ${MODEL:-llama3.2-1b} --load-format dummy"
  profiles=/tmp/nanokv-dummy-profiles
  for m in loki double_sparsity squeezed_attention duoattention; do  # lserve reads duoattention's
    suffix=$([ "$m" = duoattention ] && echo json || echo safetensors)
    [ -f "$profiles/$m.$suffix" ] || step readers.log "profile: $m" 30 60 $py -m nanokv.calibrate $m $shape \
      --samples 2 --length 1024 --out "$profiles/$m.$suffix"
  done
  long="$shape --num-requests 16 --min-input 3500 --max-input 4000 --min-output 64 --max-output 64 --single-output 0"
  for m in full quest tidaldecode rocketkv reattention tokenselect recycled_attention loki double_sparsity \
           squeezed_attention lserve; do
    args=$([ "$m" = full ] || echo "--budget 512")
    case $m in
      loki|double_sparsity|squeezed_attention) args+=" --method-arg calibration_file=$profiles/$m.safetensors" ;;
      lserve) args+=" --method-arg calibration_file=$profiles/duoattention.json" ;;
    esac
    step readers.log "readers: $m" 30 60 $py bench.py $long --method $m $args
  done
fi
if [[ $steps == *" loop "* ]]; then
  for flags in "" "--enforce-eager"; do
    step loop.log "issue 26 workload ${flags:-with graphs}" 120 200 $py bench.py --model llama3.2-1b \
      --load-format dummy --num-requests 128 --compare hf $flags
  done
fi
grep -hE "^===|decode_tokens_per_s|output_tokens_per_s|kv_bytes_read|decode_graph_share" \
  "$OUT/readers.log" "$OUT/loop.log" >> "$OUT/summary.txt" 2> /dev/null
