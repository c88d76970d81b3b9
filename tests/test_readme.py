"""The README's commands run as written: every `python generate.py` line of its "Using it" and
"Methods" sections, pasted into bash (with --max-tokens 4, so each takes seconds), and the
"Using it" Python snippet as a script. Skipped: lines that need another model's download or a
calibration made first (those commands' own tests cover them: test_hub, test_calibrate)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from nanokv.methods import METHODS

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
CALIBRATED = tuple(name for name, m in METHODS.items() if m.calibration)


def section(title: str) -> str:
    start = README.index(f"\n## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start:end]


def blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)


def generate_lines() -> list[str]:
    lines = [line for title in ("Using it", "Methods") for block in blocks(section(title), "bash")
             for line in block.splitlines() if line.startswith("python generate.py")]
    return [line for line in lines
            if "--model" not in line and not any(f"--method {m}" in line for m in CALIBRATED)]


def test_the_readme_has_commands_to_check():
    lines = generate_lines()
    assert len(lines) >= 10 and any("$'\\n\\n'" in line for line in lines)


@pytest.mark.slow
@pytest.mark.parametrize("line", generate_lines())
def test_readme_command_runs_as_written(line, smollm2_gguf, tmp_path):
    command = re.sub(r"--max-tokens \d+", "", line)
    command = command.replace("python generate.py", f"{sys.executable} {ROOT / 'generate.py'} --max-tokens 4", 1)
    result = subprocess.run(["bash", "-c", command], capture_output=True, text=True, cwd=tmp_path, timeout=600,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_readme_python_snippet_runs_as_written(smollm2_gguf, tmp_path):
    # the library's snippet (the server's, an openai client, needs a server: tests/test_serve.py)
    [snippet] = [b for b in blocks(section("Using it"), "python") if "from nanokv import" in b]
    script = tmp_path / "snippet.py"
    script.write_text(snippet)
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=ROOT, timeout=900,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
