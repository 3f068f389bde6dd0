"""Kernels used by the tests, loaded in real worker processes by import string
("tests.kernels:<factory>"). Some misbehave on purpose."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Any


class Kernel:
    """A well-behaved kernel with a few levers for tests."""

    def __init__(self, tenant: str) -> None:
        self.tenant = tenant
        self.calls = 0
        self.gates: dict[str, asyncio.Event] = {}
        self.entered: dict[str, asyncio.Event] = {}

    def _gate(self, table: dict[str, asyncio.Event], name: str) -> asyncio.Event:
        if name not in table:
            table[name] = asyncio.Event()
        return table[name]

    def echo(self, value: Any) -> Any:
        self.calls += 1
        return value

    def whoami(self) -> dict[str, Any]:
        return {"tenant": self.tenant, "pid": os.getpid(), "ppid": os.getppid()}

    def add(self, a: int, b: int = 0) -> int:
        return a + b

    async def async_echo(self, value: Any, delay: float = 0.0) -> Any:
        if delay:
            await asyncio.sleep(delay)  # ok-sleep: kernel workload, not synchronisation
        return value

    async def hold(self, name: str) -> str:
        """Announce 'entered', then wait until ``release(name)`` is called."""
        self._gate(self.entered, name).set()
        await self._gate(self.gates, name).wait()
        return f"released {name}"

    async def wait_entered(self, name: str) -> bool:
        await self._gate(self.entered, name).wait()
        return True

    def release(self, name: str) -> bool:
        self._gate(self.gates, name).set()
        return True

    def fail(self, message: str) -> None:
        raise ValueError(message)

    def crash(self, code: int = 3) -> None:
        os._exit(code)

    def exit_cleanly(self) -> None:
        sys.exit(0)

    def kill_self(self, signum: int = signal.SIGKILL) -> None:
        os.kill(os.getpid(), signum)

    def spin(self, seconds: float = 3600.0) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            pass

    def env(self) -> dict[str, str]:
        with open("/proc/self/environ", "rb") as f:
            raw = f.read()
        out = {}
        for item in raw.split(b"\0"):
            if b"=" in item:
                k, _, v = item.partition(b"=")
                out[k.decode()] = v.decode()
        return out

    def open_fds(self) -> list[int]:
        return sorted(int(fd) for fd in os.listdir("/proc/self/fd"))

    def start_child(self, detach: bool = False) -> int:
        """Start a long-lived grandchild; with ``detach`` it double-forks into its own session."""
        code = "import time; time.sleep(3600)"  # ok-sleep: kernel workload, not synchronisation
        if detach:
            code = (
                "import os, subprocess, sys;"
                f"p = subprocess.Popen([sys.executable, '-c', {code!r}],"
                " start_new_session=True, stdout=subprocess.DEVNULL,"
                " stderr=subprocess.DEVNULL); print(p.pid, flush=True)"
            )
            out = subprocess.run(
                [sys.executable, "-c", code], capture_output=True, text=True, check=True
            )
            return int(out.stdout.strip())
        proc = subprocess.Popen([sys.executable, "-c", code])
        return proc.pid

    def garbage(self) -> None:
        os.write(4, b"\x00\x00\x00\x05" + b"\xc1" * 5)  # a frame whose body is not msgpack

    def oversize(self, claimed: int) -> None:
        os.write(4, claimed.to_bytes(4, "big") + b"x")

    def unknown_reply(self) -> None:
        import msgspec

        from corral.ipc import Result, encode_frame

        os.write(4, bytes(encode_frame(Result(987654, msgspec.Raw(msgspec.msgpack.encode(1))))))

    def close_pipe(self) -> None:
        os.close(4)
        time.sleep(3600)  # ok-sleep: lives on with its pipe closed until killed

    def big(self, size: int) -> bytes:
        return b"x" * size

    def unencodable(self) -> object:
        return object()

    def print_lines(self, n: int) -> int:
        for i in range(n):
            print(f"line {i}", flush=True)
        return n

    def shutdown(self) -> None:
        print(f"shutdown hook ran for {self.tenant}", flush=True)


def make(tenant: str) -> Kernel:
    return Kernel(tenant)


class StubbornKernel(Kernel):
    """shutdown() never returns; with 'ignore-term' in the tenant, SIGTERM is ignored too."""

    def __init__(self, tenant: str) -> None:
        super().__init__(tenant)
        if "ignore-term" in tenant:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)

    def shutdown(self) -> None:
        time.sleep(3600)  # ok-sleep: a hook that hangs, to force escalation


def stubborn(tenant: str) -> Kernel:
    return StubbornKernel(tenant)


def broken(tenant: str) -> Kernel:
    raise RuntimeError(f"factory refuses {tenant}")


def hang_on_import(tenant: str) -> Kernel:
    time.sleep(3600)  # ok-sleep: a factory that never returns
    raise AssertionError


async def async_factory(tenant: str) -> Kernel:
    await asyncio.sleep(0)  # ok-sleep: kernel workload, not synchronisation
    return Kernel(tenant)


def exits_in_factory(tenant: str) -> Kernel:
    os._exit(7)


_HOARD: list[bytearray] = []


def hog(self: Kernel, megabytes: int, keep: bool = True) -> int:
    """Allocate and touch ``megabytes`` MiB (kept alive across calls unless ``keep`` is False)."""
    block = bytearray(megabytes * 1024 * 1024)  # zero-filled: every page touched
    if keep:
        _HOARD.append(block)
    return sum(len(b) for b in _HOARD)


Kernel.hog = hog  # type: ignore[attr-defined]


_BOMB_CAP_MB = 4096  # a bomb stops here even if no limit stops it first: 4 GiB of a 24 GiB host


def bomb(self: Kernel, step_mb: int = 8, cap_mb: int = _BOMB_CAP_MB) -> int:
    """Allocate and touch memory in a tight loop until something stops it, or ``cap_mb``
    (at most 4 GiB) is reached; returns the MiB allocated. Nothing is kept after the call."""
    blocks: list[bytearray] = []
    cap_mb = min(cap_mb, _BOMB_CAP_MB)
    while len(blocks) * step_mb < cap_mb:
        blocks.append(bytearray(step_mb * 1024 * 1024))  # zero-filled: every page touched
    return len(blocks) * step_mb


def many_threads(self: Kernel, n: int = 50) -> dict[str, Any]:
    """Start ``n`` threads that are all alive at once (each does a little work, then waits
    for the rest), join them, and say how many started and finished (and why one could not
    start)."""
    import threading

    go = threading.Event()
    done: list[int] = []

    def work(i: int) -> None:
        total = sum(range(10_000 + i))
        go.wait(30)
        done.append(total)

    threads: list[threading.Thread] = []
    error = None
    for i in range(n):
        thread = threading.Thread(target=work, args=(i,))
        try:
            thread.start()
        except Exception as exc:  # "can't start new thread" under a memory limit
            error = f"{type(exc).__name__}: {exc}"
            break
        threads.append(thread)
    go.set()
    for thread in threads:
        thread.join(30)
    return {"started": len(threads), "finished": len(done), "error": error}


Kernel.bomb = bomb  # type: ignore[attr-defined]
Kernel.many_threads = many_threads  # type: ignore[attr-defined]


async def hold_until_signal(self: Kernel, name: str, signum: int = signal.SIGUSR1) -> str:
    """Announce 'entered' (see ``wait_entered``), then wait until the worker receives
    ``signum``: a gate the test can open while the supervisor accepts no calls for it."""
    loop = asyncio.get_running_loop()
    opened = asyncio.Event()
    loop.add_signal_handler(signum, opened.set)
    try:
        self._gate(self.entered, name).set()
        await opened.wait()
    finally:
        loop.remove_signal_handler(signum)
    return f"released {name}"


Kernel.hold_until_signal = hold_until_signal  # type: ignore[attr-defined]


def _connect_tcp(self: Kernel, port: int) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=2):
        return "connected"


def _read_file(self: Kernel, path: str) -> int:
    with open(path, "rb") as f:
        return len(f.read())


def _write_file(self: Kernel, path: str, size: int) -> int:
    with open(path, "wb") as f:
        return f.write(b"x" * size)


Kernel.connect_tcp = _connect_tcp  # type: ignore[attr-defined]
Kernel.read_file = _read_file  # type: ignore[attr-defined]
Kernel.write_file = _write_file  # type: ignore[attr-defined]
