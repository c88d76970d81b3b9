"""Run under torchrun (or alone, for tp=1): greedy token ids of some methods on one model, as JSON.

    torchrun --nproc-per-node 2 tests/tp_worker.py RUNS_JSON OUT_JSON

RUNS_JSON: [[label, model dir, method, {options}], ...]. Each method runs in turn in one process (the
imports and the process group are paid once); its outcome is its token ids, or the ValueError it
raised (`"error: ..."`). Rank 0 writes {label: outcome} to OUT_JSON. test_tensor_parallel.py runs it.
"""

import json
import os
import sys

PROMPTS = [list(range(5, 125)), list(range(40, 130))]  # two sequences: a batch, prompts over the budgets
MAX_TOKENS = 6


def run(runs: list) -> dict:
    from nanokv import LLM, SamplingParams

    results = {}
    for label, path, name, options in runs:
        options = dict(options)
        # a pool this small (bytes on each rank) and more prompts: the scheduler preempts
        memory, prompts = options.pop("kv_cache_memory", 4 << 20), options.pop("num_prompts", len(PROMPTS))
        max_tokens = options.pop("max_tokens", MAX_TOKENS)
        prompts = [[(t + 7 * i) % 256 for t in PROMPTS[i % len(PROMPTS)]] for i in range(prompts)]
        try:
            llm = LLM(path, device="cpu", dtype="float32", kv_cache_memory=memory, method=name,
                      enforce_eager=True, **options)
            outs = llm.generate(prompts, SamplingParams(max_tokens=max_tokens, ignore_eos=True), use_tqdm=False)
            results[label] = [o.token_ids for o in outs]
            if llm.stats["preemptions"]:
                results[f"{label}:preempted"] = True
        except ValueError as e:  # a method refused (the same on every rank: no collective is pending)
            results[label] = f"error: {e}"
    return results


if __name__ == "__main__":
    runs, out = json.loads(sys.argv[1]), sys.argv[2]
    results = run(runs)
    import torch.distributed as dist

    if dist.is_initialized():  # the LLMs joined torchrun's group; leave it cleanly
        dist.destroy_process_group()
    if int(os.environ.get("RANK", 0)) == 0:
        with open(out, "w") as f:
            json.dump(results, f)
