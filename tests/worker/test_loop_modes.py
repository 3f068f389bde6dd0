"""The worker loop's two modes: blocking while the kernel is synchronous, asyncio from a
kernel's first ``async def`` (or awaitable result) on. Each mode must keep the same
contract: every call answered once, typed errors, the shutdown hook run."""

from __future__ import annotations

import asyncio
import json
import os
import select
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

import corral
from corral import KernelError, Sandbox, Supervisor, WorkerCrashedError
from corral.ipc import Call, FrameDecoder, FromWorker, Hello, Result, Start, encode_frame
from corral.ipc.framing import DEFAULT_MAX_FRAME_BYTES
from corral.worker._loop import needs_loop
from tests.helpers import FAST
from tests.worker import modes

M = "tests.worker.modes"
# A roomier shutdown than FAST: some of these kernels' shutdown() hooks run on a loop.
OPTIONS: dict[str, Any] = {**FAST, "shutdown_timeout": 5.0}


@pytest.fixture(params=["forkserver", "spawn"])
def start_method(request: pytest.FixtureRequest) -> str:
    return str(request.param)


# -- which mode -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        pytest.param(lambda: modes.SyncKernel("t"), False, id="sync"),
        # shutdown is not a call target
        pytest.param(lambda: modes.AsyncShutdownKernel("t"), False, id="async-shutdown"),
        pytest.param(lambda: modes.TrapProperty("t"), False, id="property-not-run"),
        pytest.param(lambda: modes.MixedKernel("t"), True, id="one-async-method"),
        pytest.param(lambda: modes.StaticAsync("t"), True, id="async-staticmethod"),
        # its __dir__ and __getattr__ raise a BaseException: never called
        pytest.param(lambda: modes.HostileDir("t"), False, id="hostile-dir-getattr"),
        pytest.param(lambda: json, False, id="module-of-plain-functions"),
        pytest.param(lambda: modes, True, id="module-with-an-async-function"),
    ],
)
def test_needs_loop(make: Callable[[], object], expected: bool) -> None:
    assert needs_loop(make()) is expected


async def test_sync_kernel_runs_without_a_loop(start_method: str) -> None:
    async with Supervisor(f"{M}:make", start_method=start_method, **OPTIONS) as sup:  # type: ignore[arg-type]
        assert await sup.call("a", "on_loop") is False
        assert [await sup.call("a", "put", f"k{i}", i) for i in range(5)] == [1, 2, 3, 4, 5]


async def test_async_kernel_and_async_factory_run_on_a_loop(start_method: str) -> None:
    for factory in ("make_mixed", "make_awaited"):
        async with Supervisor(f"{M}:{factory}", start_method=start_method, **OPTIONS) as sup:  # type: ignore[arg-type]
            assert await sup.call("a", "on_loop") is True, factory


async def test_a_plain_factory_runs_without_a_running_loop() -> None:
    """A plain factory asking for the running loop gets a StartError that says how to
    have one; a task it starts on the loop get_event_loop() gives it keeps running while
    the kernel serves (that loop serves)."""
    async with Supervisor(f"{M}:make_needing_loop", **OPTIONS) as sup:
        with pytest.raises(corral.StartError, match="make the factory `async def`"):
            await sup.call("a", "on_loop")
    async with Supervisor(f"{M}:make_background", **OPTIONS) as sup:
        first = await sup.call("a", "ticked")
        async with asyncio.timeout(30):  # a hang guard
            while await sup.call("a", "ticked") == first:
                pass  # each call is a round trip: the task ticks between them
        assert await sup.call("a", "on_loop") is True


async def test_blocking_mode_errors_are_typed() -> None:
    async with Supervisor(f"{M}:make", **OPTIONS) as sup:
        with pytest.raises(KernelError) as info:
            await sup.call("a", "fail", "boom")
        assert (
            info.value.remote_type == "builtins.ValueError" and "boom" in info.value.remote_message
        )
        with pytest.raises(corral.InvalidCallError) as bad:
            await sup.call("a", "nope")
        assert bad.value.kind == "method"
        with pytest.raises(corral.InvalidCallError) as bad:
            await sup.call("a", "unencodable")
        assert bad.value.kind == "result"
        with pytest.raises(corral.InvalidCallError) as bad:
            await sup.call("a", "_private")
        assert bad.value.kind == "method"
        assert await sup.call("a", "on_loop") is False  # still the blocking loop
        with pytest.raises(WorkerCrashedError) as crashed:
            await sup.call("a", "crash", 7)
        assert crashed.value.exitcode == 7


async def test_an_awaitable_result_moves_the_worker_onto_a_loop() -> None:
    """The first awaitable arrives among many calls read in one go: the calls behind it
    (already read, not yet run) must all be answered too, each with its own value."""
    async with Supervisor(f"{M}:make", **OPTIONS) as sup:
        assert await sup.call("a", "on_loop") is False
        calls = [sup.call("a", "later", "first", 0.05)]
        calls += [sup.call("a", "put", f"k{i}", i) for i in range(200)]
        calls.append(sup.call("a", "later", "last"))
        results = await asyncio.gather(*calls)
        assert results[0] == "first" and results[-1] == "last"
        assert sorted(results[1:-1]) == list(range(1, 201))
        assert await sup.call("a", "on_loop") is True
        with pytest.raises(KernelError) as info:
            await sup.call("a", "later_fail", "gone")
        assert info.value.remote_type == "builtins.KeyError"
        assert await sup.call("a", "put", "x", 0) == 201  # the same kernel, still serving


@pytest.mark.parametrize(
    ("factory", "line"),
    [
        ("make", "sync shutdown on_loop=False"),
        ("make_async_shutdown", "async shutdown on_loop=True"),
        ("make_mixed", "sync shutdown on_loop=True"),
    ],
)
async def test_shutdown_hook_runs_in_each_mode(tmp_path: Path, factory: str, line: str) -> None:
    mark = tmp_path / "mark"
    env = {modes.MARK_ENV: str(mark)}
    async with Supervisor(f"{M}:{factory}", sandbox=Sandbox.none(), env=env, **OPTIONS) as sup:
        await sup.call("t", "put", "k", 1)
        await sup.evict("t")
        assert mark.read_text() == line + "\n"


def call_frame(call_id: int, method: str, *args: object) -> bytes:
    return encode_frame(Call(call_id, method, msgspec.Raw(msgspec.msgpack.encode([args, {}]))))


class RawWorker:
    """``python -m corral.worker worker FD_IN FD_OUT`` on two real pipes, driven by hand
    (blocking reads with a deadline), for what a Supervisor never sends."""

    def __init__(self, factory: str) -> None:
        to_worker_r, self.to_worker = os.pipe()
        self.from_worker, from_worker_w = os.pipe()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "corral.worker", "worker", str(to_worker_r), str(from_worker_w)],
            pass_fds=(to_worker_r, from_worker_w),
            stderr=subprocess.PIPE,
        )
        os.close(to_worker_r)
        os.close(from_worker_w)
        self.decoder: FrameDecoder[FromWorker] = FrameDecoder(FromWorker)
        self.inbox: list[FromWorker] = []
        self.factory = factory

    def start(self) -> None:
        start = Start("t", self.factory, None, list(sys.path), DEFAULT_MAX_FRAME_BYTES)
        self.send(encode_frame(start))
        assert isinstance(self.receive(), Hello)

    def send(self, data: bytes) -> None:
        os.write(self.to_worker, data)

    def receive(self, deadline: float = 20.0) -> FromWorker:
        end = time.monotonic() + deadline
        while not self.inbox:
            left = max(0.0, end - time.monotonic())
            ready, _, _ = select.select([self.from_worker], [], [], left)
            assert ready, "no reply before the deadline"
            data = os.read(self.from_worker, 65536)
            assert data, "the worker closed its pipe"
            self.inbox += self.decoder.feed(data)
        return self.inbox.pop(0)

    def call(self, call_id: int, method: str, *args: object) -> Any:
        self.send(call_frame(call_id, method, *args))
        reply = self.receive()
        assert isinstance(reply, Result) and reply.id == call_id, reply
        return msgspec.msgpack.decode(reply.value)

    def exit_code(self) -> int:
        os.close(self.to_worker)
        self.to_worker = -1
        try:
            return self.process.wait(20)
        finally:
            self.close()

    def close(self) -> None:
        """Idempotent: kill the worker if it is still there, close every fd."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        for fd in (self.to_worker, self.from_worker):
            if fd >= 0:
                os.close(fd)
        self.to_worker = self.from_worker = -1
        assert self.process.stderr is not None
        if not self.process.stderr.closed:
            self.stderr = self.process.stderr.read().decode()
            self.process.stderr.close()


@pytest.fixture
def raw_worker() -> Iterator[Callable[[str], RawWorker]]:
    """Makes RawWorkers; whatever a test leaves (a failed assertion) is closed after it."""
    made: list[RawWorker] = []

    def make(factory: str) -> RawWorker:
        made.append(RawWorker(factory))  # closed after the test even if it fails to start
        made[-1].start()
        return made[-1]

    yield make
    for worker in made:
        worker.close()


@pytest.mark.parametrize("factory", ["make", "make_mixed"])
async def test_worker_exits_0_on_eof(factory: str, raw_worker: Callable[[str], RawWorker]) -> None:
    """The supervisor going away (its pipe closing) ends the worker, blocked in read()
    or waiting on its loop."""
    worker = raw_worker(f"{M}:{factory}")
    assert worker.call(1, "put", "k", 1) == 1
    assert worker.call(2, "on_loop") is (factory == "make_mixed")
    assert worker.exit_code() == 0


@pytest.mark.parametrize("factory", ["make", "make_mixed"])
@pytest.mark.parametrize(
    ("junk", "complaint"),
    [
        (b"\x00\x00\x00\x01\xc1", "bad frame from supervisor"),
        (encode_frame(Start("t", "x:y", None, [], 1024)), "unexpected Start"),
    ],
)
async def test_worker_exits_2_on_a_bad_message(
    factory: str, junk: bytes, complaint: str, raw_worker: Callable[[str], RawWorker]
) -> None:
    worker = raw_worker(f"{M}:{factory}")
    assert worker.call(1, "put", "k", 1) == 1
    worker.send(junk)
    assert worker.exit_code() == 2
    assert complaint in worker.stderr


@pytest.mark.parametrize("value", [None, 1, "text", b"\x00" * 70_000, [1, {"a": [2.5]}], True])
def test_a_reply_is_the_bytes_of_a_result_with_a_raw_value(value: object) -> None:
    """A result's value is encoded with its envelope in one pass: the same bytes as the
    value encoded on its own and carried as Raw; the supervisor decodes the envelope with
    the value left as those bytes, and the bytes into objects once."""
    one_pass = msgspec.msgpack.encode(Result(7, value))
    two_pass = msgspec.msgpack.encode(Result(7, msgspec.Raw(msgspec.msgpack.encode(value))))
    assert one_pass == two_pass
    decoded = FrameDecoder(FromWorker).feed(len(one_pass).to_bytes(4, "big") + one_pass)
    assert decoded == [Result(7, msgspec.Raw(msgspec.msgpack.encode(value)))]
    assert msgspec.msgpack.decode(decoded[0].value) == value


async def test_calls_read_with_the_first_awaitable_are_handed_to_the_loop(
    raw_worker: Callable[[str], RawWorker],
) -> None:
    """One write holds a call whose method returns an awaitable and 48 calls behind it:
    the worker reads them together, switches to asyncio at the first, and must answer
    every one of the rest (the backlog) once, with its own value."""
    worker = raw_worker(f"{M}:make")
    assert worker.call(1, "on_loop") is False
    burst = [call_frame(2, "later", "first")]
    burst += [call_frame(3 + i, "put", f"k{i}", i) for i in range(48)]
    burst.append(call_frame(51, "on_loop"))
    worker.send(b"".join(burst))
    replies = {}
    for _ in range(50):
        reply = worker.receive()
        assert isinstance(reply, Result) and reply.id not in replies, reply
        replies[reply.id] = msgspec.msgpack.decode(reply.value)
    assert replies[2] == "first"
    assert [replies[3 + i] for i in range(48)] == list(range(1, 49))
    assert replies[51] is True  # on the loop now
    assert worker.exit_code() == 0
