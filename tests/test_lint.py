"""ruff finds nothing (its rules: [tool.ruff] in pyproject.toml). No Ray, a second: `pytest -m lint`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.lint
REPO = Path(__file__).resolve().parents[1]


def test_ruff_finds_nothing():
    cmd = [sys.executable, "-m", "ruff", "check", "capray", "benchmarks", "tests", "docs/make_samples.py"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
