"""The web embedding examples as their users run them: ``examples/embed_starlette.py``
(asyncio, Supervisor in the lifespan) and ``examples/embed_flask.py`` (WSGI threads,
SyncSupervisor), each a real server process on a free loopback port, driven with a real
HTTP client, then stopped with SIGTERM."""

from __future__ import annotations

import concurrent.futures
import os
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from tests.helpers import wait_pids_exit

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[2]
READY_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0


def read_line_starting(proc: subprocess.Popen[bytes], prefix: str, timeout: float) -> str:
    """The first line of ``proc``'s stdout that starts with ``prefix``, waiting at most
    ``timeout`` seconds in all (reads the raw pipe, so nothing is left in a buffer)."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    deadline = time.monotonic() + timeout
    pending = b""
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        while True:
            *lines, pending = pending.split(b"\n")
            for line in lines:
                if line.decode().startswith(prefix):
                    return line.decode()
            left = deadline - time.monotonic()
            if left <= 0 or not selector.select(left):
                raise TimeoutError(f"no line {prefix!r} on stdout within {timeout}s")
            chunk = os.read(fd, 65536)
            if not chunk:
                raise EOFError(f"stdout closed before a line {prefix!r} (exit {proc.poll()})")
            pending += chunk


class Example:
    """One example script serving on ``url``; :meth:`stop` sends SIGTERM."""

    def __init__(self, script: str, log: Path) -> None:
        self.name = Path(script).stem
        self.log = log
        with log.open("wb") as stderr:  # the child holds its own copy of the descriptor
            self.proc = subprocess.Popen(
                [sys.executable, str(ROOT / "examples" / script), "--port", "0"],
                stdout=subprocess.PIPE,
                stderr=stderr,
            )
        try:
            line = read_line_starting(self.proc, f"{self.name}: ready on ", READY_TIMEOUT)
        except (TimeoutError, EOFError) as exc:
            self.stop()
            raise AssertionError(f"{script} did not get ready: {exc}\n{log.read_text()}") from None
        self.url = line.split(" ready on ", 1)[1].strip().rstrip("/")

    def stop(self) -> int:
        """SIGTERM, then wait for the exit (SIGKILL past ``STOP_TIMEOUT``); the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.communicate(timeout=STOP_TIMEOUT)  # drains stdout (access logs)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.communicate()
        return self.proc.returncode


@pytest.fixture(params=["embed_starlette.py", "embed_flask.py"])
def example(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Example]:
    served = Example(request.param, tmp_path / "stderr.log")
    try:
        yield served
    finally:
        served.stop()  # a no-op if the test stopped it


def put(client: httpx.Client, url: str, tenant: str, key: str, value: object) -> httpx.Response:
    return client.post(f"{url}/notes/{tenant}", json={"key": key, "value": value})


def test_each_tenant_keeps_its_own_notes(example: Example) -> None:
    url = example.url
    with httpx.Client(timeout=30) as client:
        assert put(client, url, "alice", "colour", "teal").json() == {
            "tenant": "alice",
            "notes": 1,
        }
        assert put(client, url, "bob", "colour", {"rgb": [1, 2, 3]}).json()["notes"] == 1
        assert put(client, url, "alice", "size", 42).json()["notes"] == 2
        got = client.get(f"{url}/notes/alice/colour")
        assert got.status_code == 200
        assert got.json() == {"tenant": "alice", "key": "colour", "value": "teal"}
        assert client.get(f"{url}/notes/bob/colour").json()["value"] == {"rgb": [1, 2, 3]}
        # alice's "size" lives in alice's worker only: for bob the kernel raises KeyError,
        # which arrives as corral.KernelError and the app answers 404.
        missing = client.get(f"{url}/notes/bob/size")
        assert missing.status_code == 404, missing.text
        assert missing.json()["error"]["type"] == "NoSuchNote"
        assert missing.json()["error"]["tenant"] == "bob"
        bad = client.post(f"{url}/notes/bob", content=b"not json")
        assert bad.status_code == 400 and bad.json()["error"]["type"] == "BadRequest"


def test_concurrent_requests_reach_the_right_tenant(example: Example) -> None:
    """4 tenants x 5 puts, all at once: each tenant's worker counts exactly its own."""
    tenants = [f"tenant-{n}" for n in range(4)]
    with (
        httpx.Client(timeout=30, limits=httpx.Limits(max_connections=20)) as client,
        concurrent.futures.ThreadPoolExecutor(max_workers=20) as pool,
    ):
        futures = {
            (tenant, i): pool.submit(put, client, example.url, tenant, f"k{i}", tenant)
            for tenant in tenants
            for i in range(5)
        }
        answers = {key: future.result(timeout=30) for key, future in futures.items()}
        for tenant in tenants:
            counts = sorted(answers[tenant, i].json()["notes"] for i in range(5))
            assert counts == [1, 2, 3, 4, 5], tenant
            assert client.get(f"{example.url}/notes/{tenant}/k3").json()["value"] == tenant


def test_sigterm_closes_every_worker_and_exits_0(example: Example) -> None:
    with httpx.Client(timeout=30) as client:
        for tenant in ("alice", "bob"):
            assert put(client, example.url, tenant, "k", 1).status_code == 200
    # The supervisor's warden and the tenants' workers: the example's descendants, which
    # would outlive it as orphans (out of conftest's sight) if it did not close them.
    tree = [p.pid for p in psutil.Process(example.proc.pid).children(recursive=True)]
    assert len(tree) >= 3, tree  # the warden and two workers
    assert example.stop() == 0, example.log.read_text()
    assert wait_pids_exit(tree, timeout=10) == [], example.log.read_text()
    log = example.log.read_text()
    # Each worker was stopped by the supervisor's close: asked, its shutdown() ran.
    assert log.count("worker stopped (closed, ask)") == 2, log
    assert "Traceback" not in log, log
