"""When the host process is SIGKILLed, every worker (and their children) exits by itself:
nobody is left to stop them. How soon is printed, not asserted (a busy host may take a
while to schedule the processes that act on it); what is checked is that none survives."""

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
            print(json.dumps({"pids": pids, "wardens": [warden]}), flush=True)
            await asyncio.Event().wait()

    import psutil
    asyncio.run(main())
    """
)


SURVIVOR_DEADLINE = 20.0  # seconds; they go in milliseconds on an idle host


def sigkill_host_and_wait(code: str, *args: str) -> tuple[list[int], float]:
    """Run ``code`` as a host process until it prints ``{"pids": [...], "wardens": [...]}``,
    SIGKILL it, and wait for those processes (up to ``SURVIVOR_DEADLINE``: a survivor
    would live for an hour). Returns (still alive, seconds)."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    host = subprocess.Popen(
        [sys.executable, "-c", code, *args],
        stdout=subprocess.PIPE,
        text=True,
        cwd=root,
        env={**os.environ, "PYTHONPATH": root},
    )
    try:
        assert host.stdout is not None
        report = json.loads(host.stdout.readline())  # pytest-timeout bounds the wait
        pids = [*report["pids"], *report["wardens"]]
        assert all(not pid_gone(p) for p in pids)
        host.send_signal(signal.SIGKILL)
        host.wait()
        killed_at = time.monotonic()
        alive = wait_pids_exit(pids, timeout=SURVIVOR_DEADLINE)
        took = time.monotonic() - killed_at
        print(f"{len(pids)} processes: {len(alive)} left {took * 1000:.0f} ms after host SIGKILL")
        return alive, took
    finally:
        if host.poll() is None:
            host.kill()
            host.wait()
        if host.stdout is not None:
            host.stdout.close()


@pytest.mark.parametrize("start_method", ["forkserver", "spawn"])
def test_workers_exit_after_host_sigkill(start_method: str) -> None:
    alive, took = sigkill_host_and_wait(HOST, start_method)
    assert not alive, f"still running {took:.2f}s after the host was SIGKILLed: {alive}"


MID_LOAD = textwrap.dedent(
    """
    import asyncio, json, sys
    import psutil
    import corral

    async def main():
        async with (
            corral.Supervisor("tests.kernels:make") as sup,
            corral.Supervisor("tests.kernels:hang_on_import", start_timeout=3600) as slow,
        ):
            pids = [(await sup.call(f"t{i}", "whoami"))["pid"] for i in range(4)]
            pids.append(await sup.call("t0", "start_child", False))  # a grandchild
            pids.append(await sup.call("t1", "start_child", True))  # a setsid'd daemon
            busy = [asyncio.ensure_future(sup.call(f"t{i}", "hold", "x")) for i in (2, 3)]
            for i in (2, 3):
                await sup.call(f"t{i}", "wait_entered", "x")  # the calls are in the workers
            starting = asyncio.ensure_future(slow.call("s", "whoami"))  # never gets ready
            while not [w for w in slow.stats().workers if w.pid is not None]:
                await asyncio.sleep(0.01)  # ok-sleep: until the warden reports the pid
            (info,) = slow.stats().workers
            assert info.state == "starting", info
            pids.append(info.pid)
            wardens = {psutil.Process(p).ppid() for p in (pids[0], info.pid)}
            print(json.dumps({"pids": pids, "wardens": sorted(wardens)}), flush=True)
            await asyncio.Event().wait()

    asyncio.run(main())
    """
)


def test_nothing_survives_a_host_sigkilled_mid_load() -> None:
    """Workers busy with calls, one with a child, one with a setsid'd daemon, one still
    starting (its factory hangs), two wardens: all gone after the host's SIGKILL."""
    alive, took = sigkill_host_and_wait(MID_LOAD)
    assert not alive, f"still running {took:.2f}s after the host was SIGKILLed: {alive}"
