"""The layering of docs/ARCHITECTURE.md, checked on every test run by import-linter.

The contracts live in pyproject.toml (`[tool.importlinter]`), inside the repository, so the check
needs nothing outside the checkout. Function-level (lazy) imports count too.
"""

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _lint_imports() -> list[str]:
    exe = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))
    return [exe, "--no-cache"]


def test_no_import_goes_against_the_layering():
    result = subprocess.run(_lint_imports(), cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_the_check_catches_an_upward_import(tmp_path):
    """The same contracts, on a copy of the package with one import pointing the wrong way, fail."""
    copy = tmp_path / "tether"
    shutil.copytree(ROOT / "tether", copy, ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "types" / "losses.py").write_text(
        (copy / "types" / "losses.py").read_text() + "\nfrom tether.server import config  # noqa: E402,F401\n"
    )
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    result = subprocess.run(
        _lint_imports(),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode != 0 and "BROKEN" in result.stdout, result.stdout + result.stderr
