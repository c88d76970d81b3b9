"""The machine nanokv sees (nanokv/hardware.py) and the AVX2-only path most users' CPUs take.

NANOKV_CPU_ISA=avx2 hides AVX-512, AMX and AVX-NE-CONVERT from nanokv, and ATEN_CPU_CAPABILITY=avx2
makes torch's own kernels take their AVX2 path; both are read when the process starts, so those
checks run in a subprocess: the C++ kernels built for AVX2 against their plain-torch twins
(tests/test_kernels_cpu.py run whole), and a bfloat16 model that must not be packed for oneDNN.
The rest are unit tests of hardware.py with the CPU's flags faked."""

import json
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nanokv import hardware
from tiny_model import save_tiny_llama

ROOT = Path(__file__).resolve().parent.parent
AVX2_ENV = {**os.environ, "NANOKV_CPU_ISA": "avx2", "ATEN_CPU_CAPABILITY": "avx2"}

x86_with_avx2 = pytest.mark.skipif(
    platform.machine().lower() not in ("x86_64", "amd64") or "avx2" not in hardware._cpuinfo("flags").split(),
    reason="the AVX2 path needs an x86 CPU with AVX2")


def run_python(code: str, *args: str, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=AVX2_ENV,
                          cwd=ROOT, timeout=timeout)


# --- under NANOKV_CPU_ISA=avx2, in a subprocess ---------------------------------------------------

HARDWARE_REPORT = """
import json
import torch
from nanokv import hardware
from nanokv.kernels import cpu
print(json.dumps({
    "flags": sorted(hardware.cpu_flags()), "bfloat16": hardware.cpu_has_bfloat16(),
    "packs": hardware.onednn_packs_bfloat16(), "auto": str(hardware.resolve_dtype("auto", "cpu")),
    "command": cpu._build_command(cpu.SOURCES, cpu._library_path()), "library": str(cpu._library_path()),
    "loaded": cpu.load(), "gemv": cpu.gemv_available(), "torch_isa": torch.backends.cpu.get_cpu_capability()}))
"""


@pytest.fixture(scope="module")
def avx2_report():
    result = run_python(HARDWARE_REPORT)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


@x86_with_avx2
def test_hardware_sees_an_avx2_only_cpu(avx2_report):
    assert "avx2" in avx2_report["flags"] and "fma" in avx2_report["flags"]
    assert not [f for f in avx2_report["flags"] if f.startswith(hardware.NEWER_THAN_AVX2)]
    assert avx2_report["bfloat16"] is False and avx2_report["packs"] is False
    assert avx2_report["auto"] == "torch.float32"
    assert avx2_report["torch_isa"] == "AVX2"   # torch's own kernels took the hint too


@x86_with_avx2
def test_cpp_kernels_build_for_avx2_and_leave_out_the_avx512_gemv(avx2_report, monkeypatch):
    from nanokv.kernels import cpu

    command = avx2_report["command"]
    assert "-mavx2" in command and "-mfma" in command and "-march=native" not in command
    assert avx2_report["loaded"] is True and avx2_report["gemv"] is False
    # the flags are part of the cache key: an AVX2 run never loads the native build
    monkeypatch.delenv(hardware.ISA_VARIABLE, raising=False)
    assert avx2_report["library"] != str(cpu._library_path())


@x86_with_avx2
def test_the_avx2_build_uses_no_avx512_register(avx2_report):
    """No zmm, no mask register k0-k7, no xmm/ymm 16-31: nothing an AVX2-only CPU would fault on."""
    if shutil.which("objdump") is None:
        pytest.skip("no objdump to read the machine code")
    code = subprocess.run(["objdump", "-d", "--no-show-raw-insn", avx2_report["library"]], capture_output=True,
                          text=True, check=True).stdout
    assert "vfmadd" in code   # -mfma took: the dot products fuse
    assert re.findall(r"%(?:zmm\d+|[xy]mm(?:1[6-9]|2\d|3[01])|k[0-7])\b", code) == []


@x86_with_avx2
def test_cpp_kernels_under_avx2_match_their_plain_torch_twins():
    """tests/test_kernels_cpu.py whole, under the switch: decode, KV writes, norm, RoPE and greedy
    tokens against plain torch. Only the AVX512-BF16 matrix-vector tests may skip."""
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                             str(ROOT / "tests" / "test_kernels_cpu.py")],
                            capture_output=True, text=True, env=AVX2_ENV, cwd=ROOT, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = result.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "failed" not in summary and "error" not in summary, summary
    skips = [line for line in result.stdout.splitlines() if line.startswith("SKIPPED")]
    assert skips and all("AVX512-BF16" in line for line in skips), skips   # the gemv tests, and only they


TINY_BFLOAT16_RUN = """
import json, sys
import torch
sys.path.insert(0, "tests")
from helpers import nanokv_logits
from nanokv import LLM, SamplingParams
from nanokv.kernels import cpu
from nanokv.models.cpu_linear import PackedLinear

path, prompts = sys.argv[1], [[5, 9, 33, 47, 80], list(range(40, 100)), [200, 3]]
params = SamplingParams(max_tokens=16, ignore_eos=True)
fast = LLM(path, dtype="bfloat16", kv_cache_memory=16 << 20)
calls, rms_norm = [], cpu.rms_norm
cpu.rms_norm = lambda *args: calls.append(1) or rms_norm(*args)
got = [o.token_ids for o in fast.generate(prompts, params)]
packed = any(isinstance(m, PackedLinear) for m in fast.model.modules())
cpu.serves = lambda *tensors: False  # plain torch: nanokv/models' norm and RoPE, reference attention
plain = LLM(path, dtype="bfloat16", kv_cache_memory=16 << 20, kernels="reference")
want = [o.token_ids for o in plain.generate(prompts, params)]
top2 = []  # where the two differ: plain torch's two best logits there
for prompt, a, b in zip(prompts, got, want):
    step = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
    if step is not None:
        logits = nanokv_logits(plain.model, plain.config, prompt + b[:step], torch.bfloat16)[-1].float()
        top2.append(logits.topk(2).values.tolist())
print(json.dumps({"kernels": fast.cache.kernels.name, "packed": packed, "cpp_norms": len(calls),
                  "got": got, "want": want, "top2": top2, "dtype": str(fast.dtype)}))
"""


@x86_with_avx2
def test_bfloat16_model_is_not_packed_and_gives_the_plain_torch_tokens(tmp_path):
    save_tiny_llama(tmp_path / "tiny")
    result = run_python(TINY_BFLOAT16_RUN, str(tmp_path / "tiny"))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["dtype"] == "torch.bfloat16" and report["packed"] is False   # oneDNN would refuse here
    assert report["kernels"] == "cpu" and report["cpp_norms"] > 0                # the C++ kernels served
    assert all(len(tokens) == 16 for tokens in report["got"] + report["want"])
    # The C++ kernels sum in float32 in another order, so a bfloat16 logit may move by a step
    # (1/128 of its size): the tokens may part only where plain torch's best two are that close.
    assert sum(a == b for a, b in zip(report["got"], report["want"])) >= 1, report
    for first, second in report["top2"]:
        assert first - second <= abs(first) * 2 ** -6, (report, first, second)


# --- hardware.py with the CPU's flags faked --------------------------------------------------------

def fake_cpu(monkeypatch, flags: str):
    """Make /proc/cpuinfo say `flags` for the rest of the test."""
    monkeypatch.setattr(hardware, "_cpuinfo", lambda key: flags if key == "flags" else "")


def test_an_unknown_isa_is_a_one_line_error_naming_the_valid_ones(monkeypatch):
    monkeypatch.setenv(hardware.ISA_VARIABLE, "avx9")
    with pytest.raises(ValueError) as error:
        hardware.cpu_flags()
    message = str(error.value)
    assert "\n" not in message and "'avx9'" in message and "valid: native, avx2" in message


def test_the_avx2_switch_hides_what_is_newer_than_avx2(monkeypatch):
    fake_cpu(monkeypatch, "sse4_2 avx avx2 fma avx512f avx512bw avx512vl avx512dq avx512_bf16 amx_bf16 amx_tile "
                          "avx_vnni avx_ne_convert")
    monkeypatch.delenv(hardware.ISA_VARIABLE, raising=False)
    assert hardware.cpu_has_bfloat16() and "avx512_bf16" in hardware.cpu_flags()
    monkeypatch.setenv(hardware.ISA_VARIABLE, " AVX2 ")   # case and spaces forgiven
    assert hardware.cpu_flags() == {"sse4_2", "avx", "avx2", "fma"}
    assert not hardware.cpu_has_bfloat16() and not hardware.onednn_packs_bfloat16()


@pytest.mark.parametrize("flags, auto", [
    ("avx avx2 fma", torch.float32),                                       # an AVX2-only CPU: emulated bfloat16
    ("avx2 avx512f avx512bw avx512vl avx512dq", torch.float32),            # AVX-512 without BF16
    ("avx2 avx512f avx512bw avx512vl avx512dq avx512_bf16", torch.bfloat16),
    ("avx2 amx_bf16 amx_tile", torch.bfloat16),
    ("avx2 avx_ne_convert", torch.bfloat16),
    ("", torch.float32),                                                   # not x86, or not Linux
])
def test_auto_dtype_on_cpu_follows_the_cpus_bfloat16_arithmetic(monkeypatch, flags, auto):
    fake_cpu(monkeypatch, flags)
    monkeypatch.delenv(hardware.ISA_VARIABLE, raising=False)
    assert hardware.resolve_dtype("auto", "cpu") == auto
    assert hardware.resolve_dtype("auto", torch.device("cpu")) == auto


def test_auto_dtype_on_cuda_is_bfloat16_where_the_gpu_has_it(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    assert hardware.resolve_dtype("auto", "cuda") == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: False)
    assert hardware.resolve_dtype("auto", "cuda") == torch.float16


def test_onednn_packing_needs_avx_ne_convert_or_avx512_bw_vl_dq(monkeypatch):
    if not torch.backends.mkldnn.is_available():
        pytest.skip("torch built without oneDNN")
    monkeypatch.delenv(hardware.ISA_VARIABLE, raising=False)
    for flags, packs in [("avx2 avx_ne_convert", True), ("avx512bw avx512vl avx512dq", True),
                         ("avx512bw avx512vl", False), ("avx2 fma", False)]:
        fake_cpu(monkeypatch, flags)
        assert hardware.onednn_packs_bfloat16() is packs, flags


def test_bfloat16_on_a_cpu_without_it_warns_once_and_is_honoured(monkeypatch, capsys):
    fake_cpu(monkeypatch, "avx avx2 fma")
    monkeypatch.delenv(hardware.ISA_VARIABLE, raising=False)
    assert hardware.resolve_dtype("bfloat16", "cpu") == torch.bfloat16
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "float32" in err and "bfloat16" in err
    fake_cpu(monkeypatch, "avx2 avx512_bf16")
    assert hardware.resolve_dtype(torch.bfloat16, "cpu") == torch.bfloat16
    assert capsys.readouterr().err == ""   # where it computes in bfloat16, nothing to say


def test_explicit_dtypes_on_cpu(monkeypatch):
    fake_cpu(monkeypatch, "avx2")
    assert hardware.resolve_dtype("float32", "cpu") == torch.float32
    assert hardware.resolve_dtype(torch.float32, "cpu") == torch.float32
    with pytest.raises(ValueError) as error:
        hardware.resolve_dtype("float16", "cpu")
    assert "\n" not in str(error.value) and "float32" in str(error.value)
    with pytest.raises(ValueError, match=r"unknown dtype 'int3'; valid: auto, float32, bfloat16, float16"):
        hardware.resolve_dtype("int3", "cpu")


def test_a_device_this_machine_lacks_is_a_one_line_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert hardware.resolve_device(None) == torch.device("cpu")
    assert hardware.resolve_device("cpu") == torch.device("cpu")
    for device, needle in [("cuda", "'cuda' is not available"), ("cuda:1", "'cuda:1' is not available"),
                           ("gpu", "unknown device 'gpu'"), ("meta", "'meta' is not supported")]:
        with pytest.raises(ValueError) as error:
            hardware.resolve_device(device)
        message = str(error.value)
        assert "\n" not in message and needle in message and message.endswith("valid: cpu"), message
