"""When the host process is SIGKILLed, every worker (and their children) exits quickly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from tests.helpers import pid_gone, wait_pids_exit

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
        alive = wait_pids_exit(pids, timeout=2.0)
        took = time.monotonic() - killed_at
        assert not alive, f"still running {took:.2f}s after the host was SIGKILLed: {alive}"
        print(f"{len(pids)} processes gone {took * 1000:.0f} ms after host SIGKILL")
    finally:
        if host.poll() is None:
            host.kill()
            host.wait()
        if host.stdout is not None:
            host.stdout.close()
