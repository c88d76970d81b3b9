"""The GPU kernel benchmark (nanokv/kernels/bench.py) where there is no GPU: it imports only torch,
says it needs CUDA and exits 0, and turns a run's JSON into the markdown tables of docs/kernels.md."""

import ast
import json

import torch

from nanokv.kernels import bench

REPORT = {"device": "NVIDIA H200", "torch": "2.9.0", "triton": "3.5.0", "flash_attn": None, "dtype": "bfloat16",
          "quick": True, "copy_bandwidth_gbps": 4252.0, "results": [
              {"kernel": "decode", "B": 1, "S": 4096, "dtype": "bfloat16", "impl": "sdpa", "bytes": 16777216,
               "ms": 0.05, "gbps": 335.5, "frac_copy_bw": 0.0789, "speedup": 1.0},
              {"kernel": "decode", "B": 1, "S": 4096, "dtype": "bfloat16", "impl": "paged_decode",
               "bytes": 16777216, "ms": 0.1, "gbps": 167.8, "frac_copy_bw": 0.0395, "speedup": 0.5,
               "max_abs_err": 0.0039},
              {"kernel": "decode", "B": 1, "S": 4096, "dtype": "bfloat16", "impl": "flash_attn",
               "bytes": 16777216, "error": "ModuleNotFoundError: No module named 'flash_attn'"},
              {"kernel": "quant_decode", "B": 32, "S": 8192, "dtype": "bfloat16", "impl": "paged_decode",
               "bytes": 1073741824, "ms": 1.0, "gbps": 1073.7, "frac_copy_bw": 0.2525, "speedup": 1.0},
              {"kernel": "quant_decode", "B": 32, "S": 8192, "dtype": "bfloat16", "impl": "kivi4",
               "bytes": 285212672, "ms": 0.5, "gbps": 570.4, "frac_copy_bw": 0.1341, "speedup": 2.0},
              {"kernel": "prefill", "B": 1, "T": 2048, "dtype": "bfloat16", "impl": "sdpa", "bytes": 8388608,
               "ms": 0.25, "gbps": 33.6, "frac_copy_bw": 0.0079, "speedup": 1.0, "tflops": 137.4},
              {"kernel": "prefill", "B": 1, "T": 2048, "dtype": "bfloat16", "impl": "prefill", "bytes": 8388608,
               "ms": 295.0, "gbps": 0.03, "frac_copy_bw": 0.0000067, "speedup": 0.000847, "tflops": 0.1}]}


def test_the_markdown_tables_of_a_run(tmp_path, capsys):
    path = tmp_path / "k.json"
    path.write_text(json.dumps(REPORT))
    assert bench.main(["--markdown", str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "NVIDIA H200, bfloat16, torch 2.9.0, triton 3.5.0; copy bandwidth 4,252 GB/s (`--quick`)"
    decode = lines.index("**decode**")
    assert lines[decode + 2:decode + 7] == [
        "| case | impl | ms | GB/s | of copy bw | speedup |",
        "|---|---|---|---|---|---|",
        "| B=1, S=4,096 | sdpa | 0.050 | 336 | 8% | 1.00x |",
        "| B=1, S=4,096 | paged_decode | 0.100 | 168 | 4% | 0.50x |",
        "| B=1, S=4,096 | flash_attn | error: ModuleNotFoundError: No module named 'flash_attn' |  |  |  |"]
    quant = lines.index("**quant_decode**")  # the target is a share of full precision's time
    assert lines[quant + 2] == "| case | impl | ms | GB/s | of copy bw | speedup | time / baseline |"
    assert lines[quant + 5] == "| B=32, S=8,192 | kivi4 | 0.500 | 570 | 13% | 2.00x | 0.50x |"
    prefill = lines.index("**prefill**")
    assert lines[prefill + 2] == "| case | impl | ms | GB/s | of copy bw | speedup | TFLOP/s |"
    assert lines[prefill + 4] == "| B=1, T=2,048 | sdpa | 0.250 | 34 | 1% | 1.00x | 137.4 |"
    assert lines[prefill + 5] == "| B=1, T=2,048 | prefill | 295.000 | 0 | 0% | 1/1,181 | 0.1 |" == lines[-1]


def test_without_cuda_it_says_so_and_exits_0(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench.main(["--quick", "--json", str(tmp_path / "k.json")]) == 0
    assert "needs a CUDA GPU" in capsys.readouterr().out
    assert not (tmp_path / "k.json").exists()


def test_importing_it_imports_only_torch():
    """Its module-level imports are the standard library's and torch: Triton, flash-attn and
    nanokv's kernels load when a case runs."""
    tree = ast.parse(open(bench.__file__).read())
    imported = {alias.name.split(".")[0] for node in tree.body if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module.split(".")[0] for node in tree.body if isinstance(node, ast.ImportFrom)}
    assert imported == {"argparse", "json", "sys", "pathlib", "torch"}
