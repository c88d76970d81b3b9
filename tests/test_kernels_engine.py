"""The engine behind one kernel interface: which implementation each device gets, and the
Triton kernels (under TRITON_INTERPRET=1 on CPU) giving the engine the same greedy tokens as
the plain-torch path, through batched decode, prefill and decode-time eviction."""

import dataclasses

import pytest
import torch

from nanokv import kernels
import nanokv.kernels.reference  # noqa: F401  (kernels.reference below)
from nanokv.kernels import kernels_for
from nanokv.cache.build import CacheRequest, build_cache
from nanokv.cache.pool import HOST
from nanokv.engine.runner import ModelRunner
from nanokv.engine.scheduler import Scheduler
from nanokv.engine.sequence import Sequence
from nanokv.methods import make_method
from nanokv.sampling import SamplingParams


def greedy(model, cfg, prompts, choice, steps=12, method=None, send=None, graphs=None):
    """Every prompt through the scheduler and runner (batched, continuous), with `choice` kernels
    (and `send`, what sends a decode step's host inputs, when given; `graphs(model, cache)`, the
    runner's DecodeGraphs, when given). `steps`: the tokens each generates, or a list, one a prompt."""
    request = method.cache_request(cfg.num_layers, cfg.head_dim) if method is not None else CacheRequest()
    cache = build_cache(request, cfg, 4 << 20, 4, torch.float32, "cpu", model.inv_freq)
    cache.kernels = kernels_for("cpu", choice, cache.workspace)
    scheduler = Scheduler(cache, 8, 64, method)
    runner = ModelRunner(model, cache, "cpu", method, graphs and graphs(model, cache))
    runner.send = send or runner.send
    steps = [steps] * len(prompts) if isinstance(steps, int) else steps
    seqs = [Sequence(p, SamplingParams(max_tokens=n, ignore_eos=True), set(), lambda t: "", 256)
            for p, n in zip(prompts, steps)]
    scheduler.add(seqs)
    while not scheduler.finished:
        batch, is_prefill = scheduler.schedule()
        for seq, token in zip(batch, runner.step(batch, is_prefill) if batch else []):
            seq.append(token)
            if seq.finished:
                scheduler.finish(seq)
    return [s.output_token_ids for s in seqs]


PROMPTS = [[(i * 37 + j * 11) % 256 for j in range(n)] for i, n in enumerate((5, 23, 1, 40, 17))]


def test_each_device_gets_its_kernels(monkeypatch):
    assert kernels_for("cuda").name == "triton" and kernels_for("cuda:1").name == "triton"
    assert kernels_for("cpu").name in ("cpu", "reference")  # "reference" where no C++ compiler is found
    monkeypatch.setenv("NANOKV_KERNELS", "triton")
    assert kernels_for("cpu").name == "triton"
    with pytest.raises(ValueError, match="unknown kernels 'cuda'; valid: triton, cpu, reference"):
        kernels_for("cpu", "cuda")
    with pytest.raises(ValueError, match="kernels 'cpu' run on the CPU only"):
        kernels_for("cuda", "cpu")


def tiny_method(name):
    """h2o: prefill column sums, decode probabilities; kivi: quantized decode (head_dim 16);
    quest: page scores and decode over the picked pages (3 of the 4-token blocks, every layer)."""
    if name == "kivi":
        return make_method("kivi", bits=4, group_size=8, residual_length=16)
    if name == "quest":
        return make_method("quest", budget=8, skip_layers=0)
    return name and make_method(name, budget=12)


@pytest.mark.parametrize("method", [None, "h2o", "kivi", "quest"])
def test_the_engine_runs_every_attention_call_through_the_chosen_kernels(tiny, monkeypatch, method):
    model, cfg = tiny
    calls = {"decode": 0, "prefill": 0, "write_kv": 0, "quantized_decode": 0, "page_scores": 0}
    triton = kernels.triton_kernels()

    def counted(name):
        def call(*args, **kwargs):
            calls[name] += 1
            return getattr(triton, name)(*args, **kwargs)
        return call

    monkeypatch.setattr(kernels, "triton_kernels", lambda: kernels.Kernels("triton", *map(counted, calls)))

    def forbidden(*args, **kwargs):
        raise AssertionError("the plain-torch attention ran while the Triton kernels were chosen")

    monkeypatch.setattr(kernels.reference, "paged_attention", forbidden)
    greedy(model, cfg, PROMPTS[:2], "triton", steps=3, method=tiny_method(method))
    layers = cfg.num_layers
    # one prefill step (a write and an attention call per prompt and layer), then two decode steps
    # (a write per layer; an attention call per layer and length group: 5 and 23 tokens are two)
    # (kivi: the 23-token prompt leaves one quantized block and a short residual, so after the
    # first step the two sequences hold similar block counts and share one group: 2 + 1 calls)
    if method == "kivi":
        assert calls == {"prefill": 2 * layers, "quantized_decode": (2 + 1) * layers, "write_kv": (2 + 2) * layers,
                         "decode": 0, "page_scores": 0}, calls
    else:
        assert calls == {"prefill": 2 * layers, "decode": 2 * 2 * layers, "write_kv": (2 + 2) * layers,
                         "quantized_decode": 0, "page_scores": 2 * 2 * layers if method == "quest" else 0}, calls


@pytest.mark.parametrize("method, fresh", [(None, True), ("kivi", True), ("h2o", False)])
def test_a_fresh_prompt_attends_over_its_own_kv(tiny, monkeypatch, method, fresh):
    """A prompt with nothing cached before it goes to fresh_prefill (SDPA on a GPU), with the paged
    prefill's answer; a prefill that needs column sums (H2O) stays on the paged kernel."""
    model, cfg = tiny
    calls = {"fresh": 0, "paged": 0}
    triton = kernels.triton_kernels()

    def fresh_prefill(q, k, v):
        calls["fresh"] += 1
        out = triton.fresh_prefill(q, k, v)
        T = len(q)
        bs, nb = 4, -(-T // 4)
        pool = lambda x: torch.nn.functional.pad(x, (0, 0, 0, 0, 0, nb * bs - T)).transpose(0, 1).reshape(-1, bs, x.shape[-1])
        pos = torch.arange(nb * bs, dtype=torch.int32).view(nb, bs).repeat(k.shape[1], 1)
        tables = torch.arange(k.shape[1] * nb).view(1, k.shape[1], nb)
        paged = triton.prefill(q, torch.arange(T), torch.tensor([0, T], dtype=torch.int32), pool(k), pool(v), pos,
                               tables, torch.full((1, k.shape[1]), T))
        torch.testing.assert_close(out, paged, rtol=1e-5, atol=1e-5)
        return out

    def paged_prefill(*args, **kwargs):
        calls["paged"] += 1
        return triton.prefill(*args, **kwargs)

    monkeypatch.setattr(kernels, "triton_kernels",
                        lambda: dataclasses.replace(triton, prefill=paged_prefill, fresh_prefill=fresh_prefill))
    greedy(model, cfg, PROMPTS[:2], "triton", steps=2, method=tiny_method(method))
    prompts = 2 * cfg.num_layers
    assert calls == ({"fresh": prompts, "paged": 0} if fresh else {"fresh": 0, "paged": prompts}), calls


@pytest.mark.parametrize("method", [None, "h2o", "kivi", "quest"])
def test_triton_kernels_give_the_reference_greedy_tokens(tiny, method):
    model, cfg = tiny
    expected = greedy(model, cfg, PROMPTS, "reference", method=tiny_method(method))
    assert greedy(model, cfg, PROMPTS, "triton", method=tiny_method(method)) == expected


# the kernel entry of each block kind, and where its arguments (after q) hold the lengths of the
# part that makes it what it is: ThinK's slim tokens (channels pruned alone: no token evicted, so
# prompts past its recent 32 hold some), MiniCache's merged layer
BLOCK_KINDS = {"think": ("pruned_attention", 4, 0.0), "minicache": ("paired_attention", 6, 0.5),
               "lorc": ("latent_attention", 4, 0.5)}


def lorc_profile(config: str, path) -> str:
    """A lorc profile made from the random weights themselves (all kv-heads of a layer one group)."""
    from nanokv.artifacts import FORMAT, model_key, write_artifact
    from nanokv.calibrate.lowrank import weight_bases
    from nanokv.loading import load_dummy

    model, cfg = load_dummy(config, torch.float32, pack=False)
    H = cfg.num_kv_heads
    write_artifact(path, {"format": FORMAT, "method": "lorc", "model": model_key(config), "num_layers": cfg.num_layers,
                          "num_kv_heads": H, "group": H, "head_dim": cfg.head_dim, "settings": {},
                          "tensors": weight_bases(model, cfg, H)})
    return str(path)


@pytest.mark.parametrize("method", list(BLOCK_KINDS))
def test_block_kinds_decode_through_their_triton_kernels(tmp_path, monkeypatch, method):
    """ThinK's slim keys, MiniCache's merged pairs, LoRC's latents: under the Triton kernels every decode layer
    that reads them runs its kernel (never the twin), and the engine gives the plain-torch
    kernels' greedy tokens, through a batch of prompts of different lengths."""
    from nanokv import LLM, SamplingParams
    from test_dummy import tiny_config

    config, (name, special, compression) = tiny_config(tmp_path, num_hidden_layers=4), BLOCK_KINDS[method]
    twin, calls = getattr(kernels.reference, name), {"kernel": 0, "special": 0}
    triton = kernels.triton_kernels()

    def counted(q, q_pos, *args):
        if q.shape[1] == 1:
            calls["kernel"] += 1
            calls["special"] += int(args[special].sum() > 0)
        return getattr(triton, name)(q, q_pos, *args)
    monkeypatch.setattr(kernels, "triton_kernels", lambda: dataclasses.replace(triton, **{name: counted}))

    extra = {"calibration_file": lorc_profile(config, tmp_path / "lorc.safetensors")} if method == "lorc" else {}

    def run(choice):
        llm = LLM(config, load_format="dummy", dtype="float32", device="cpu", kernels=choice,
                  kv_cache_memory=4 << 20, method=method, compression=compression, **extra)
        outs = llm.generate([p + [7] * 30 for p in PROMPTS[:3]], SamplingParams(max_tokens=5, ignore_eos=True),
                            use_tqdm=False)
        return [o.token_ids for o in outs]

    expected = run("reference")
    decode_twin = lambda q, *args: (_ for _ in ()).throw(AssertionError("a decode ran the twin")) \
        if q.shape[1] == 1 else twin(q, *args)
    monkeypatch.setattr(kernels.reference, name, decode_twin)
    assert run("triton") == expected
    assert calls["kernel"] > 0 and calls["special"] > 0, calls


def test_a_latent_decode_layer_reads_nothing_back_to_the_host(tmp_path, monkeypatch):
    """LoRC's decode layers under the Triton kernels: the RoPE table the latent keys are rotated
    with was grown from the positions the host announced (expect_positions), not from their
    largest read back from the device."""
    from nanokv import LLM, SamplingParams
    from test_dummy import tiny_config

    config = tiny_config(tmp_path, num_hidden_layers=4)
    llm = LLM(config, load_format="dummy", dtype="float32", device="cpu", kernels="triton", kv_cache_memory=4 << 20,
              method="lorc", compression=0.5, calibration_file=lorc_profile(config, tmp_path / "lorc.safetensors"))
    counts = count_readbacks(monkeypatch, "__call__")
    llm.generate([p + [7] * 30 for p in PROMPTS[:3]], SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)
    assert llm.cache.newest_position is not None and counts == {}


@pytest.mark.parametrize("method", [None, "h2o", "kivi", "quest"])
def test_a_decode_step_sends_its_host_inputs_in_one_copy(tiny, monkeypatch, method):
    """What a GPU does, forced on CPU: each decode step packs its ids, positions, slots, block
    tables and lengths (and H2O's budgets) into one buffer and sends it in one copy, and the
    engine reads them from there: the same greedy tokens, one copy per decode step."""
    from nanokv.engine.runner import ModelRunner
    from nanokv.engine.upload import HostToDevice

    model, cfg = tiny
    decode_steps, step = [0], ModelRunner.step

    def counted(self, seqs, is_prefill):
        decode_steps[0] += not is_prefill
        return step(self, seqs, is_prefill)
    monkeypatch.setattr(ModelRunner, "step", counted)
    expected = greedy(model, cfg, PROMPTS, "cpu", method=tiny_method(method))
    send, decode_steps[0] = HostToDevice("cpu", pack=True), 0
    assert greedy(model, cfg, PROMPTS, "cpu", method=tiny_method(method), send=send) == expected
    assert send.copies == decode_steps[0] > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("method, options", [("full", {}), ("kivi", dict(bits=4, group_size=8, residual_length=16)),
                                             ("quest", dict(budget=8, skip_layers=0)), ("h2o", dict(budget=12))])
def test_a_decode_step_waits_for_the_gpu_once(tmp_path, method, options):
    """On CUDA a decode step of full, KIVI, Quest or H2O queues its work without waiting for the GPU
    (torch's sync debug mode raises on a wait) until it reads its sampled tokens back."""
    from nanokv import LLM
    from test_dummy import tiny_config

    llm = LLM(tiny_config(tmp_path), load_format="dummy", dtype="float32", device="cuda", kv_cache_memory=4 << 20,
              method=method, **options)
    prompts, params = [p + [3] * 20 for p in PROMPTS], SamplingParams(max_tokens=4, ignore_eos=True)
    llm.generate(prompts, params, use_tqdm=False)  # captures the CUDA graphs these steps replay (cuda_graphs.py)
    forward = llm.runner._forward

    def watched(seqs, query_lens, *args, **kwargs):
        torch.cuda.set_sync_debug_mode("error" if all(n == 1 for n in query_lens) else "default")
        try:
            return forward(seqs, query_lens, *args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    llm.runner._forward = watched
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert all(len(o.token_ids) == 4 for o in outs)
    assert llm.stats["decode_graphs"]["replayed_steps"] == (0 if method == "kivi" else 3)


READBACKS = ("item", "tolist", "__int__", "__float__", "__bool__", "__index__")  # each waits for the GPU
# these wait too, with some arguments: a copy to the host (nanokv's HOST: on a CPU the pool's own
# device is another object), picking elements by a boolean mask (the result's size is counted on
# the device), nonzero
ON_HOST = {"to": lambda self, *args, **kw: any(a is HOST for a in (*args, *kw.values())),
           "__getitem__": lambda self, index, *args: is_mask(index),
           "__setitem__": lambda self, index, *args: is_mask(index),
           "nonzero": lambda self, *args, **kw: True}


def is_mask(index) -> bool:
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool
               for i in (index if isinstance(index, tuple) else (index,)))


# ops that wait for the GPU whoever calls them: a tensor made from Python data (torch.tensor, or a
# Python number assigned through an index) is copied from the host, and these read a count back
WAITING_OPS = {"lift_fresh", "_local_scalar_dense", "nonzero", "masked_select", "_unique2", "unique_dim",
               "unique_consecutive"}


def count_readbacks(monkeypatch, during):
    """Count the calls that read a tensor back to the host (READBACKS) which nanokv's own code makes
    while `during` (a method of StepAttention) runs, and the ops that wait for the GPU underneath
    (WAITING_OPS, seen by torch's dispatcher, so inside torch functions too) -> a dict that fills
    as they happen. On a GPU each one waits for the queued kernels: a decode layer that makes one
    serializes the step, and cannot be captured in a CUDA graph."""
    import sys
    import traceback
    from pathlib import Path

    from torch.utils._python_dispatch import TorchDispatchMode

    from nanokv.engine.attention import StepAttention

    ours, counts, inside = str(Path(kernels.__file__).parent.parent), {}, [False]
    for name in (*READBACKS, *ON_HOST):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            caller = sys._getframe(1).f_code
            if (inside[0] and caller.co_filename.startswith(ours)
                    and (_name not in ON_HOST or ON_HOST[_name](self, *args, **kwargs))):
                key = f"{_name} in {caller.co_name} ({Path(caller.co_filename).name})"
                counts[key] = counts.get(key, 0) + 1
            return _original(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, counted)
    wrapped = getattr(StepAttention, during)

    class WaitingOps(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if name in WAITING_OPS:
                ours_frames = [f for f in traceback.extract_stack() if f.filename.startswith(ours)]
                where = f"{ours_frames[-1].name} ({Path(ours_frames[-1].filename).name})" if ours_frames else "?"
                key = f"aten.{name} in {where}"
                counts[key] = counts.get(key, 0) + 1
            return func(*args, **(kwargs or {}))

    def watched(self, *args, **kwargs):
        inside[0] = self.is_decode
        try:
            if not self.is_decode:
                return wrapped(self, *args, **kwargs)
            with WaitingOps():
                return wrapped(self, *args, **kwargs)
        finally:
            inside[0] = False
    monkeypatch.setattr(StepAttention, during, watched)
    return counts


@pytest.mark.parametrize("method", [None, "kivi", "quest", "h2o", "tova", "roco", "cam"])
def test_a_decode_layer_reads_nothing_back_to_the_host(tiny, monkeypatch, method):
    """With the Triton kernels (the GPU's path), a decode layer of full, KIVI, Quest or of the
    evictors H2O, TOVA, RoCo and CaM (which merges what it evicts) queues its work and returns:
    Quest's reduced tables are a static number of pages wide, the KV bytes read stay a device
    tensor that the runner reads once a step, and an evictor's rounds come from the host's lengths,
    its moves and writes go to a scratch slot where a head evicts nothing, and its counts come back
    once the step's tokens are read (finish). Every method whose decode is captured is checked the
    same way through the graphs' buffers (test_cuda_graphs.py)."""
    model, cfg = tiny
    counts = count_readbacks(monkeypatch, "__call__")
    greedy(model, cfg, PROMPTS[:2], "triton", steps=3, method=tiny_method(method))
    assert counts == {}
