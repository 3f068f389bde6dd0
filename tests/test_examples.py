"""The embedding examples run and do what they say."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    ("script", "expect"),
    [("embed_asyncio.py", "tenant-5: 5 notes"), ("embed_threads.py", "live workers:")],
)
def test_example_runs(script: str, expect: str) -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / script)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert expect in out.stdout
