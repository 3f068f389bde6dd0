"""The side-by-side benchmark runs: its smoke mode exercises every scenario and every
contender once (no figure is checked: they vary with the machine)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "compare.py"

SCENARIOS = [
    "warm call, one caller",
    "warm call, one caller, everything on one CPU",
    "warm call, 64 callers on one worker",
    "warm call, 32 tenants on 32 workers",
    "pipelined throughput, 1,000 calls in flight",
    "idle worker memory",
    "LRU/TTL table operations",
    "cold start",
    "churn",
    "payload round trip",
]
CONTENDERS = [
    "raw pipe, blocking (the limit)",
    "raw pipe, asyncio (the async limit)",
    "multiprocessing.Pipe",
    "ProcessPoolExecutor",
    "loky",
    "pebble",
    "ProcessPoolExecutor, awaited",
    "loky, awaited",
    "pebble, awaited",
    "corral, Sandbox.none()",
    "corral, kernel with an async method",
    "plain os.fork()",
    "fresh interpreter",
    "multiprocessing forkserver child",
    "minimal fork-server child",
]


@pytest.mark.timeout(150)
def test_compare_smoke_runs_every_scenario(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--json", str(tmp_path / "results.json")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr  # also non-zero if it left a process behind
    for name in SCENARIOS:
        assert f"== {name} ==" in out.stdout, name
    for name in CONTENDERS:
        assert name in out.stdout, name
    assert "== targets (measured, not asserted) ==" in out.stdout
    assert (tmp_path / "results.json").stat().st_size > 0
