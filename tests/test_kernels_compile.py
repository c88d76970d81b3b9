"""Every Triton kernel specialization the wrappers launch compiles for a GPU (sm_90: H100/H200),
with no GPU: scripts/compile_kernels.py records the launches and compiles them with Triton's own
ptxas. The interpreter the other kernel tests use accepts code a GPU compiler rejects (a dot of
mixed dtypes, a tile side under 16), so this is the CPU's guard for the GPU path."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_every_kernel_compiles_for_sm90():
    pytest.importorskip("triton.backends.nvidia.compiler")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "compile_kernels.py"), "--arch", "90"],
                         capture_output=True, text=True, env=env, timeout=1800)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "0 failed" in run.stdout
