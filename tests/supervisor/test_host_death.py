"""When the host process is SIGKILLed, every worker (and their children) exits quickly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

from tests.helpers import pid_gone

HOST = textwrap.dedent(
    """
    import asyncio, json, sys
    import corral

    async def main():
        async with corral.Supervisor("tests.kernels:make", start_method=sys.argv[1]) as sup:
            pids = [(await sup.call(f"t{i}", "whoami"))["pid"] for i in range(3)]
            pids.append(await sup.call("t0", "start_child", False))
            pids.append(await sup.call("t1", "start_child", True))
            warden = psutil.Process(pids[0]).ppid()
            print(json.dumps({"pids": pids, "warden": warden}), flush=True)
            await asyncio.Event().wait()

    import psutil
    asyncio.run(main())
    """
)


@pytest.mark.parametrize("start_method", ["forkserver", "spawn"])
def test_workers_exit_within_two_seconds_of_host_sigkill(start_method: str) -> None:
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    host = subprocess.Popen(
        [sys.executable, "-c", HOST, start_method],
        stdout=subprocess.PIPE,
        text=True,
        cwd=root,
        env={**os.environ, "PYTHONPATH": root},
    )
    try:
        assert host.stdout is not None
        line = host.stdout.readline()  # blocks until the host reports (pytest-timeout bounds it)
        report = json.loads(line)
        pids = [*report["pids"], report["warden"]]
        assert all(not pid_gone(p) for p in pids)
        host.send_signal(signal.SIGKILL)
        host.wait()
        killed_at = time.monotonic()
        survivors = [psutil.Process(p) for p in pids if not pid_gone(p)]
        _gone, alive = psutil.wait_procs(survivors, timeout=2.0)
        alive = [p for p in alive if not pid_gone(p.pid)]
        assert not alive, (
            f"still running {time.monotonic() - killed_at:.2f}s after host death: {alive}"
        )
    finally:
        if host.poll() is None:
            host.kill()
            host.wait()
        if host.stdout is not None:
            host.stdout.close()
