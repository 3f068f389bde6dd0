"""The web embedding examples as the README runs them, with their frameworks' own
commands: ``uvicorn examples.embed_starlette:app`` (asyncio, Supervisor in the lifespan)
and ``flask --app examples/embed_flask run`` (WSGI threads, SyncSupervisor started by
the first request). Each is a real server process on a free loopback port, driven with a
real HTTP client, compared with ``corral serve`` where they answer the same errors, then
stopped with Ctrl-C's signal (or SIGTERM) and checked for the exit status the README
gives."""

from __future__ import annotations

import concurrent.futures
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from tests.helpers import Served, wait_pids_exit

pytestmark = pytest.mark.timeout(90)

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent  # the virtualenv's scripts: uvicorn, flask
READY_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0

# The README's commands, run from the repository's root.
COMMANDS = {
    "embed_starlette": [str(BIN / "uvicorn"), "examples.embed_starlette:app", "--port", "0"],
    "embed_flask": [str(BIN / "flask"), "--app", "examples/embed_flask", "run", "--port", "0"],
    "corral_serve": [str(BIN / "corral"), "serve", "--port", "0"],
}
# uvicorn: "Uvicorn running on http://127.0.0.1:PORT (Press CTRL+C to quit)"; Flask:
# " * Running on http://127.0.0.1:PORT"; "corral serve: ready on http://127.0.0.1:PORT/".
# Each prints the port it got for --port 0.
READY = re.compile(r"(?:[Rr]unning|ready) on (http://[0-9.:]+)")
# A terminal's Ctrl-C reaches a server whose SIGINT is at its default, but a test run
# started as a background job inherits SIGINT ignored (and Python then leaves it so):
# put it back before the command runs, as a shell in a terminal would have it.
DEFAULT_SIGINT = (
    "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
    "os.execv(sys.argv[1], sys.argv[1:])"
)

# What the README says each command does when stopped, by signal: the exit status (as
# Popen reports it: minus the signal number for a process killed by a signal) and
# whether the workers were stopped by the supervisor's close (asked: shutdown() ran).
# uvicorn stops gracefully on both, then re-raises SIGTERM on itself; `flask run` has no
# SIGTERM handler, so its workers die with corral's warden instead.
STOPPED = {
    ("corral_serve", signal.SIGINT): (0, True),
    ("corral_serve", signal.SIGTERM): (0, True),
    ("embed_starlette", signal.SIGINT): (0, True),
    ("embed_starlette", signal.SIGTERM): (-signal.SIGTERM, True),
    ("embed_flask", signal.SIGINT): (0, True),
    ("embed_flask", signal.SIGTERM): (-signal.SIGTERM, False),
}


class Example:
    """One example served by its framework's command; ``url`` is where it listens."""

    def __init__(self, name: str, log: Path) -> None:
        self.name = name
        self.log = log  # stdout and stderr, as they come
        self.url = ""
        self._found = threading.Event()  # the ready line was seen, or the output ended
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", DEFAULT_SIGINT, *COMMANDS[name]],
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        # Drains the output for the server's whole life (so that logging never blocks it);
        # ends at EOF, once the server and everything holding its stdout are gone.
        self._reader = threading.Thread(target=self._read, name=f"{name}-output")
        self._reader.start()
        if not self._found.wait(READY_TIMEOUT) or not self.url:
            code = self.stop(signal.SIGKILL)
            raise AssertionError(f"{name} did not get ready (exit {code}):\n{self.output()}")

    def _read(self) -> None:
        assert self.proc.stdout is not None
        with self.log.open("wb") as log:
            for line in self.proc.stdout:
                log.write(line)
                log.flush()
                found = READY.search(line.decode(errors="replace"))
                if found and not self.url:
                    self.url = found.group(1)
                    self._found.set()
        self._found.set()

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, signum: int = signal.SIGINT) -> int:
        """Send ``signum`` (unless it exited), wait for the exit (SIGKILL past
        ``STOP_TIMEOUT``) and the end of its output; the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signum)
        try:
            self.proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(STOP_TIMEOUT)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return self.proc.returncode


@pytest.fixture(params=["embed_starlette", "embed_flask"])
def example(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Example]:
    served = Example(request.param, tmp_path / "output.log")
    try:
        yield served
    finally:
        served.stop()  # a no-op if the test stopped it


def put(client: httpx.Client, url: str, tenant: str, key: object, value: object) -> httpx.Response:
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
        assert missing.json() == {
            "error": {"type": "NoSuchNote", "message": "bob has no note 'size'", "tenant": "bob"}
        }
        bad = client.post(f"{url}/notes/bob", content=b"not json")
        assert bad.status_code == 400 and bad.json()["error"]["type"] == "BadRequest"


def test_corral_errors_are_answered_as_the_gateway_answers_them(
    example: Example, tmp_path: Path
) -> None:
    """The same failing call through the example and through ``corral serve``: the same
    status and the same JSON body."""
    gateway = Served(log=tmp_path / "serve.log")
    try:
        with httpx.Client(timeout=30) as client:
            # The kernel raises (a list cannot be a dict key): KernelError, the worker stays.
            raised = put(client, example.url, "bob", ["a"], 1)
            assert raised.status_code == 422, raised.text
            assert raised.json() == {
                "error": {
                    "type": "KernelError",
                    "message": "builtins.TypeError: unhashable type: 'list' (in 'bob'.put)",
                    "tenant": "bob",
                    "remote_type": "builtins.TypeError",
                }
            }
            # An argument msgpack cannot carry: InvalidCallError before anything is sent.
            unsendable = put(client, example.url, "bob", "k", 2**70)
            assert unsendable.status_code == 400, unsendable.text
            assert unsendable.json()["error"]["type"] == "InvalidCallError"
            for answer, args in ((raised, [["a"], 1]), (unsendable, ["k", 2**70])):
                direct = client.post(f"{gateway.url}/v1/tenants/bob/call/put", json={"args": args})
                assert (answer.status_code, answer.json()) == (direct.status_code, direct.json())
                assert answer.headers["content-type"] == "application/json"
            # The worker that raised is still bob's, and still has nothing stored.
            assert put(client, example.url, "bob", "k", 1).json() == {"tenant": "bob", "notes": 1}
    finally:
        tree = [p.pid for p in psutil.Process(gateway.proc.pid).children(recursive=True)]
        assert gateway.stop() == 0
    assert wait_pids_exit(tree, timeout=30) == []  # the gateway's warden and worker


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


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_stopping_ends_every_worker_with_the_documented_status(
    example: Example, signum: signal.Signals
) -> None:
    status, graceful = STOPPED[example.name, signum]
    with httpx.Client(timeout=30) as client:
        for tenant in ("alice", "bob"):
            assert put(client, example.url, tenant, "k", 1).status_code == 200
    # The supervisor's warden and the tenants' workers: the example's descendants, which
    # would outlive it as orphans (out of conftest's sight) if nothing stopped them.
    tree = [p.pid for p in psutil.Process(example.proc.pid).children(recursive=True)]
    assert len(tree) >= 3, tree  # the warden and two workers
    assert example.stop(signum) == status, example.output()
    assert wait_pids_exit(tree, timeout=10) == [], example.output()
    log = example.output()
    # Stopped by the supervisor's close: each worker was asked, and its shutdown() ran.
    assert log.count("worker stopped (closed, ask)") == (2 if graceful else 0), log
    assert log.count("closing with 1 notes") == (2 if graceful else 0), log
    assert "Traceback" not in log, log


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_corral_serve_stops_with_the_documented_status(
    tmp_path: Path, signum: signal.Signals
) -> None:
    """The gateway's statuses, which the README gives next to the examples'."""
    serve = Example("corral_serve", tmp_path / "output.log")
    try:
        with httpx.Client(timeout=30) as client:
            answer = client.post(f"{serve.url}/v1/tenants/alice/call/put", json={"args": ["k", 1]})
            assert answer.json() == {"result": 1}, answer.text
        tree = [p.pid for p in psutil.Process(serve.proc.pid).children(recursive=True)]
    finally:
        code = serve.stop(signum)
    status, graceful = STOPPED["corral_serve", signum]
    assert code == status, serve.output()
    assert wait_pids_exit(tree, timeout=10) == [], serve.output()
    log = serve.output()
    closed = [line for line in log.splitlines() if "worker stopped (closed, ask)" in line]
    assert graceful and [line for line in closed if "tenant=alice " in line], log
