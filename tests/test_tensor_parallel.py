"""Tensor parallelism over torch.distributed (nanokv/distributed.py), on the CPU with gloo: two ranks
started by torchrun in a subprocess (tests/tp_worker.py) against the same runs on one process.

Each torchrun loops over its methods inside (the imports and the process group paid once)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nanokv.config import ModelConfig
from nanokv.distributed import SINGLE, TensorParallel, shard_config, valid_sizes
from nanokv.methods import METHODS
from nanokv.methods.registry import QUANTIZERS

TESTS = Path(__file__).parent
sys.path.insert(0, str(TESTS))
import tp_worker  # noqa: E402

# a representative set: per-head top-k, per-layer budgets, the cross-head top-k (adakv, kvzip, with its
# exchange), a page reader, a decode evictor, a quantizer, a window
REPRESENTATIVE = {"full": {}, "snapkv": dict(compression=0.5), "pyramidkv": dict(compression=0.5),
                  "adakv": dict(compression=0.5), "kvzip": dict(compression=0.5), "quest": dict(budget=32),
                  "h2o": dict(compression=0.5), "kivi": dict(group_size=8), "streaming_llm": dict(compression=0.5),
                  "snapkv+kivi": dict(compression=0.5, group_size=8)}


def torchrun(runs: list, tmp_path: Path, nproc: int = 2, timeout: int = 300, **env) -> dict:
    """tp_worker's results at tensor_parallel_size=nproc (torchrun picks a free port: --standalone)."""
    out = tmp_path / f"tp{nproc}.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", NANOKV_TP_TIMEOUT_S="60",  # a desync fails, not hangs
               PYTHONPATH=os.pathsep.join([str(TESTS.parent), os.environ.get("PYTHONPATH", "")]), **env)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                           str(TESTS / "tp_worker.py"), json.dumps(runs), str(out)],
                          env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(out.read_text())


def options(name: str) -> dict:
    """Small budgets and knobs for every method, as the other every-method tests build them."""
    m = METHODS[name]
    small = {"group_size": 8} if "group_size" in m.options else {}
    if name == "full" or name in QUANTIZERS or m.blends:
        return small
    if m.offloads:
        return dict(budget=256)
    if m.selects_pages or m.sparse_prefill:  # below the prompts' 90 and 120 tokens: the readers read less
        return dict(budget=64)
    return dict(compression=0.5, **small)


def test_two_ranks_generate_what_one_does(tmp_path, tiny_gqa_dir, tiny_qwen2_gqa_dir):
    """Greedy token ids at tp=2 equal tp=1's, float32, for a Llama and a Qwen2 (biased q/k/v) of 4
    query heads over 2 kv-heads: one kv-head per rank."""
    runs = [[f"{model.name}:{name}", str(model), name, opts] for model in (tiny_gqa_dir, tiny_qwen2_gqa_dir)
            for name, opts in REPRESENTATIVE.items()]
    # a pool that preempts, under AdaKV (its heads keep different lengths, so the ranks' free blocks
    # differ): the scheduler's agreed counts keep the ranks in step (without them gloo fails)
    tight = dict(compression=0.5, num_prompts=6, max_tokens=48)
    expected = tp_worker.run(runs + [["preempts", str(tiny_gqa_dir), "adakv", dict(tight, kv_cache_memory=200_000)]])
    assert not [v for v in expected.values() if not isinstance(v, list) and v is not True]  # no method refused
    # each rank holds half the heads: half the bytes make the same blocks per head
    runs.append(["preempts", str(tiny_gqa_dir), "adakv", dict(tight, kv_cache_memory=100_000)])
    # and a method that cannot split its heads says so, on every rank, before anything runs
    got = torchrun(runs + [["refused", str(tiny_gqa_dir), "kv_compress", dict(compression=0.5)]], tmp_path)
    assert got.pop("refused") == ("error: method 'kv_compress' cannot run under tensor parallelism: "
                                  + METHODS["kv_compress"].tensor_parallel_reason)
    assert got.get("preempts:preempted") and expected.get("preempts:preempted")
    assert got == expected


@pytest.mark.slow
def test_every_method_runs_on_two_ranks(tmp_path, tiny_gqa_dir):
    """Every registered method (those with a calibration aside: they need an artifact) runs at tp=2,
    and gives tp=1's tokens, or refuses with its tensor_parallel_reason."""
    names = [n for n, m in METHODS.items() if not m.calibration]
    runs = [[name, str(tiny_gqa_dir), name, options(name)] for name in names]
    expected = tp_worker.run(runs)
    got = torchrun(runs, tmp_path)
    refused = {n for n in names if METHODS[n].tensor_parallel_reason}
    for name in refused:
        assert got[name] == f"error: method {name!r} cannot run under tensor parallelism: " \
                            f"{METHODS[name].tensor_parallel_reason}"
    assert [n for n in names if not isinstance(expected[n], list)] == []
    assert [n for n in names if n not in refused and got[n] != expected[n]] == []


# calibrated methods, each with the artifact `python -m nanokv.calibrate` makes of the tiny model (a few
# seconds each): per-head tables split by rank (artifacts.rank_share), per-layer ones whole
CALIBRATED = {"loki": dict(budget=32), "double_sparsity": dict(budget=32), "minference": dict(budget=32),
              "kvquant": {}, "skvq": dict(group_size=16), "squeezed_attention": dict(budget=32),
              "lorc": dict(compression=0.5)}


@pytest.mark.slow
def test_calibrated_methods_on_two_ranks(tmp_path, tiny_gqa_dir, monkeypatch):
    """Their tp=2 tokens equal tp=1's; a profile that ranks heads across the whole model (DuoAttention's
    head_scores) is refused with why."""
    cache = tmp_path / "nanokv-cache"
    monkeypatch.setenv("NANOKV_CACHE", str(cache))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for name in [*CALIBRATED, "duoattention"]:  # lorc's bases per kv-head (--group 1): they split by rank
        subprocess.run([sys.executable, "-m", "nanokv.calibrate", name, "--model", str(tiny_gqa_dir), "--samples", "2",
                        "--length", "128", "--dtype", "float32", "--device", "cpu", "--group", "1"],
                       env=env, check=True, capture_output=True, timeout=300)
    runs = [[name, str(tiny_gqa_dir), name, opts] for name, opts in CALIBRATED.items()]
    runs.append(["duoattention", str(tiny_gqa_dir), "duoattention", dict(compression=0.5)])
    expected = tp_worker.run(runs)
    got = torchrun(runs, tmp_path, NANOKV_CACHE=str(cache))
    assert "head_scores rank heads across the whole model" in got.pop("duoattention")
    assert isinstance(expected.pop("duoattention"), list)
    assert not [v for v in expected.values() if not isinstance(v, list)], expected
    assert got == expected


def test_cli_prints_once_on_two_ranks(tmp_path, tiny_gqa_dir):
    """torchrun generate.py: rank 0 alone prints the text and the stats line, the text of one rank."""
    env = dict(os.environ, OMP_NUM_THREADS="1", NANOKV_TP_TIMEOUT_S="60",
               PYTHONPATH=os.pathsep.join([str(TESTS.parent), os.environ.get("PYTHONPATH", "")]))
    args = ["--model", str(tiny_gqa_dir), "--device", "cpu", "--dtype", "float32", "--max-tokens", "8",
            "--kv-cache-memory", str(4 << 20), "--no-chat", "--stats-json"]
    one = subprocess.run([sys.executable, str(TESTS.parent / "generate.py"), *args, str(tmp_path / "1.json"), "Hello"],
                         env=env, capture_output=True, text=True, timeout=300)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                          "-m", "nanokv.cli.generate", *args, str(tmp_path / "2.json"), "Hello"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-3000:]
    assert two.stdout == one.stdout and one.stdout.strip()
    assert sum("prompt " in line and "decode " in line for line in two.stderr.splitlines()) == 1
    assert json.loads((tmp_path / "2.json").read_text())["tensor_parallel_size"] == 2


def config(heads: int, kv_heads: int, intermediate: int = 256) -> ModelConfig:
    return ModelConfig(architecture="llama", vocab_size=256, hidden_size=128, intermediate_size=intermediate,
                       num_layers=2, num_heads=heads, num_kv_heads=kv_heads, head_dim=32, rms_norm_eps=1e-6,
                       rope_theta=10000.0, max_position_embeddings=256)


def test_a_rank_sees_its_share_of_the_heads():
    local = shard_config(config(8, 4), 2)
    assert (local.num_heads, local.num_kv_heads, local.intermediate_size) == (4, 2, 128)
    assert shard_config(config(8, 4), 1) == config(8, 4)
    assert valid_sizes(8, 2, 256) == [1, 2]


def test_heads_that_do_not_divide_are_refused():
    with pytest.raises(ValueError, match=r"tensor_parallel_size=4 .*num_key_value_heads=2.*valid sizes: 1, 2"):
        shard_config(config(8, 2), 4)


def test_one_process_needs_no_process_group(monkeypatch):
    """WORLD_SIZE unset or 1: every collective is the identity, torch.distributed never joined."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    tp = TensorParallel.from_env("cpu")
    x = torch.arange(4.0)
    assert (tp.rank, tp.size) == (0, 1)
    assert tp.all_reduce(x) is x and tp.all_gather(x) is x and tp.broadcast(x) is x and tp.own(x) is x
    assert tp.agree([3, 1], "min") == [3, 1] and SINGLE.size == 1
    assert not (torch.distributed.is_available() and torch.distributed.is_initialized())


def test_a_size_torchrun_did_not_start_is_refused(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ValueError, match=r"tensor_parallel_size=2 but WORLD_SIZE=1.*torchrun --nproc-per-node 2"):
        TensorParallel.from_env("cpu", 2)
    with pytest.raises(ValueError, match="positive integer"):
        TensorParallel.from_env("cpu", 0)


def test_a_per_head_profile_ranked_across_the_model_is_refused():
    from nanokv.artifacts import rank_share

    artifact = {"method": "duoattention", "num_kv_heads": 2, "head_scores": [[0.1, 0.2]]}
    with pytest.raises(ValueError, match="duoattention.*cannot run under tensor parallelism.*head_scores"):
        rank_share(artifact, 0, 2)
    tables = {"method": "loki", "num_kv_heads": 4, "tensors": {"k_basis": torch.arange(2 * 4 * 3.0).view(2, 4, 3),
                                                                "inv_freq": torch.ones(2, 8)}}
    share = rank_share(tables, 1, 2)
    assert share["num_kv_heads"] == 2 and torch.equal(share["tensors"]["k_basis"], tables["tensors"]["k_basis"][:, 2:])
    assert torch.equal(share["tensors"]["inv_freq"], tables["tensors"]["inv_freq"])
