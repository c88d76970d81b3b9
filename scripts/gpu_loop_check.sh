#!/usr/bin/env bash
# The GPU checks of issue 26 (the engine loop: device tables, one copy a step, CUDA graphs) in one
# prepared command, for a machine with a CUDA GPU, its own python3 and no network. Files in $OUT:
# summary.txt, test_gpu.log, bench_1b.log (graphs, then --enforce-eager, both against transformers),
# bench_8b.log, profile.json (a torch.profiler trace of a few decode steps).
#   OUT=/tmp/out bash scripts/gpu_loop_check.sh        (about 10 minutes on an H200)
set -u
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD
py=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total --format=csv > "$OUT/summary.txt" 2>&1
timeout 180 $py -m pytest -q -m gpu -x tests/test_cuda_graphs.py tests/test_kernels_engine.py tests/test_upload.py \
  > "$OUT/test_gpu.log" 2>&1
echo "graph tests: rc=$? $(tail -1 "$OUT/test_gpu.log")" >> "$OUT/summary.txt"
# the issue's workload: 128 requests, inputs 64-512, outputs 32-256, EOS ignored; transformers in batches of 64
for flags in "" "--enforce-eager"; do
  echo "=== llama3.2-1b $flags" >> "$OUT/bench_1b.log"
  timeout 200 $py bench.py --model llama3.2-1b --load-format dummy --num-requests 128 --compare hf $flags \
    $([ -z "$flags" ] && echo "--profile $OUT/profile.json") >> "$OUT/bench_1b.log" 2>&1
  echo "bench 1b $flags: rc=$?" >> "$OUT/summary.txt"
done
timeout 150 $py bench.py --model llama3-8b --load-format dummy --num-requests 128 > "$OUT/bench_8b.log" 2>&1
echo "bench 8b: rc=$?" >> "$OUT/summary.txt"
grep -hE "^===|tokens_per_s|decode_graph_share|peak|eager" "$OUT/bench_1b.log" "$OUT/bench_8b.log" >> "$OUT/summary.txt"
