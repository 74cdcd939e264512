"""Each tool runs as its users run it: `python -m tools.<name> ...` from the repository root, in a child process."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def run_tool():
    def run(name: str, *args: str, timeout: float = 600, **env: str) -> subprocess.CompletedProcess:
        child_env = {**os.environ, "PYTHONUNBUFFERED": "1", **env}
        return subprocess.run([sys.executable, "-m", f"tools.{name}", *args], cwd=ROOT, env=child_env,
                              capture_output=True, text=True, timeout=timeout)

    return run
