"""The layering of ARCHITECTURE.md, checked on every test run rather than only before a stop."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHECKER = ROOT.parent / "shared" / "tools" / "check_layers.py"


@pytest.mark.skipif(not CHECKER.exists(), reason="shared/tools/check_layers.py is not beside the checkout")
def test_no_import_goes_against_the_layering():
    result = subprocess.run([sys.executable, str(CHECKER), str(ROOT / "tether")], capture_output=True, text=True)
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout
