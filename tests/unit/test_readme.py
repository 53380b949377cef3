"""The README's SDK example runs as written (against the embedded server it starts itself)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_opens_with_the_install_and_test_commands():
    commands = re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S)[:2]
    assert "tether quickstart" in commands[0]
    assert "pytest" in commands[1]
    ci = (README.parent / ".ci" / "run").read_text().splitlines()
    assert commands[1].strip() in ci, "CI must run the README's test command verbatim"


@pytest.mark.slow
def test_sdk_example_runs_and_trains(tmp_path):
    (example,) = python_blocks()
    result = subprocess.run(
        [sys.executable, "-c", example], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-2000:]
    losses = [
        float(line.split()[1]) for line in result.stdout.splitlines() if re.match(r"^\d+ [\d.]+$", line)
    ]
    assert len(losses) == 10 and losses[-1] < losses[0]
    assert "SampleResponse" in result.stdout
