"""Small helpers for tests that run real processes."""

from __future__ import annotations

import asyncio
import os

import psutil
import pytest

import corral


def pid_gone(pid: int) -> bool:
    """True if ``pid`` no longer runs (a zombie counts as gone: it is not running code)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


async def wait_pid_gone(pid: int, timeout: float = 30.0) -> None:
    """Wait until ``pid`` exits, via a pidfd (works for processes that are not our children)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    loop = asyncio.get_running_loop()
    exited = loop.create_future()
    loop.add_reader(fd, lambda: exited.done() or exited.set_result(None))
    try:
        async with asyncio.timeout(timeout):
            await exited
    finally:
        loop.remove_reader(fd)
        os.close(fd)


def wait_pids_exit(pids: list[int], timeout: float) -> list[int]:
    """Block until every pid has exited (zombies count as exited) or ``timeout`` passes;
    return those still running. Uses pidfds, so it works for processes that are not ours."""
    import select
    import time

    fds: dict[int, int] = {}
    for pid in pids:
        try:
            fds[os.pidfd_open(pid)] = pid
        except ProcessLookupError:
            pass
    try:
        poller = select.poll()
        for fd in fds:
            poller.register(fd, select.POLLIN)
        pending = dict(fds)
        deadline = time.monotonic() + timeout
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            for fd, _event in poller.poll(left * 1000):
                poller.unregister(fd)
                pending.pop(fd, None)
        return sorted(pending.values())
    finally:
        for fd in fds:
            os.close(fd)


class FakeClock:
    """A monotonic clock that moves only when told to."""

    def __init__(self, now: float = 500.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def run_host(code: str, timeout: float, user: int | None = None) -> tuple[str, int | None]:
    """Run ``code`` as a separate host process (with this checkout importable; as uid and
    gid ``user`` if given) and return its stdout and return code; the return code is None
    if it did not finish in time (it is then killed)."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    host = subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=root,
        env={**os.environ, "PYTHONPATH": root},
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        user=user,
        group=user,
        extra_groups=[] if user is not None else None,
    )
    try:
        out, _ = host.communicate(timeout=timeout)
        return out, host.returncode
    except subprocess.TimeoutExpired:
        host.kill()
        out, _ = host.communicate()
        return out, None


REQUIRE_STRICT = os.environ.get("CORRAL_REQUIRE_STRICT") == "1"


async def start_strict(sup: corral.Supervisor) -> corral.Supervisor:
    """Start ``sup``, whose sandbox needs the root-only layers. Where this host cannot
    provide them (not root; an interpreter in a private home directory), the test is
    skipped, with corral's own reason; with ``CORRAL_REQUIRE_STRICT=1`` (CI) it fails."""
    try:
        await sup.start()
    except corral.StartError as exc:
        if "the sandbox requires layers" not in str(exc):
            raise
        if REQUIRE_STRICT:
            pytest.fail(f"strict sandbox required (CORRAL_REQUIRE_STRICT=1): {exc}")
        pytest.skip(f"strict sandbox unavailable here: {exc}")
    return sup


class Served:
    """``corral serve`` in a subprocess on a free loopback port.

    With ``wait`` (the default) it is ready to take calls when the constructor returns;
    otherwise :meth:`wait_ready` waits for its ready line. ``url`` is its base URL.
    :meth:`stop` sends SIGTERM (a graceful shutdown) and returns the exit code; the
    process is killed if it outlives ``timeout``."""

    def __init__(
        self,
        *args: str,
        log: str | os.PathLike[str],
        timeout: float = 30.0,
        env: dict[str, str] | None = None,
        wait: bool = True,
    ) -> None:
        import subprocess
        import sys

        self.log_path = os.fspath(log)
        self.log = open(log, "w")  # closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "corral", "serve", "--port", "0", *args],
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            env=env,
        )
        self.url = ""
        if wait:
            try:
                self.wait_ready(timeout)
            except RuntimeError:
                self.stop()
                raise

    def wait_ready(self, timeout: float = 30.0) -> str:
        """Wait (with a deadline) for the ready line; return the base URL."""
        import select
        import time

        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        line = ""
        while not line.startswith("corral serve: ready on "):
            left = deadline - time.monotonic()
            ready, _, _ = select.select([self.proc.stdout], [], [], max(0.0, left))
            line = self.proc.stdout.readline() if ready else ""
            if (not ready or not line) and (left <= 0 or self.proc.poll() is not None):
                raise RuntimeError(f"corral serve did not get ready: {self.tail()}")
        self.url = line.removeprefix("corral serve: ready on ").strip().rstrip("/")
        return self.url

    def tail(self) -> str:
        """The end of what it wrote to stderr."""
        self.log.flush()
        with open(self.log_path) as f:
            return f.read()[-3000:]

    def stop(self, timeout: float = 30.0) -> int:
        import signal
        import subprocess

        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.log.close()
        return code
