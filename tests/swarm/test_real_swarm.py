"""The real-Swarm tier as a pytest test: opt-in with PYROUTE_SWARM_E2E=1 (root; see README.md)."""
import os
import subprocess
from pathlib import Path

import pytest


@pytest.mark.skipif(os.environ.get("PYROUTE_SWARM_E2E") != "1", reason="real-Swarm tier: set PYROUTE_SWARM_E2E=1")
def test_real_swarm():
    run = subprocess.run([str(Path(__file__).with_name("run.sh"))], capture_output=True, text=True, timeout=600)
    print(run.stdout)
    print(run.stderr)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    assert "PASS all real-Swarm checks" in run.stdout
    assert "PASS stack deploy checks" in run.stdout
    assert "PASS DFSL stack checks" in run.stdout
