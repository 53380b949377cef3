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
    example = python_blocks()[0]
    result = subprocess.run(
        [sys.executable, "-c", example], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-2000:]
    losses = [
        float(line.split()[1]) for line in result.stdout.splitlines() if re.match(r"^\d+ [\d.]+$", line)
    ]
    assert len(losses) == 10 and losses[-1] < losses[0]
    assert "SampleResponse" in result.stdout


@pytest.mark.slow
def test_deployment_example_runs_after_the_sdk_example(tmp_path):
    """The deployments example continues the SDK one (its `trainer`, `tokens`), with full
    fine-tuning as it says, against the embedded server's address."""
    sdk, deployment = python_blocks()[:2]
    sdk = sdk.replace("rank=8", "rank=0").replace("learning_rate=1e-2", "learning_rate=1e-4")
    script = sdk + deployment.replace('"http://127.0.0.1:8000"', "service.base_url")
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-2000:]
    last = result.stdout.splitlines()[-1]
    assert last.startswith("tinker://") and "/sampler_weights/step-1 [" in last
