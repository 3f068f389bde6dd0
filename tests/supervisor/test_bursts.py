"""Calls sent in a burst (several in flight on one worker) go out together in one
``writev`` at the end of the loop iteration: they must still arrive whole, in order, and
each be answered once, also when the burst is far larger than the pipe holds."""

from __future__ import annotations

import asyncio
import os

import pytest

from corral import Supervisor
from corral.supervisor._pipes import PipeWriter
from tests.helpers import K


@pytest.mark.parametrize("size", [10, 8 * 1024, 100 * 1024])
async def test_a_burst_larger_than_the_pipe_is_answered_in_full(size: int) -> None:
    async with Supervisor(K, start_timeout=20.0) as sup:
        await sup.call("a", "echo", "warm")
        payloads = [bytes([i % 251]) * size for i in range(200)]  # 200 x 100 KiB: 20 MiB
        results = await asyncio.gather(*(sup.call("a", "echo", p) for p in payloads))
        assert results == payloads


async def test_write_soon_keeps_order_across_a_full_pipe() -> None:
    """Direct writes and burst writes interleaved, more than a pipe holds: the reader sees
    every byte in the order written."""
    loop = asyncio.get_running_loop()
    r, w = os.pipe()
    os.set_blocking(w, False)
    broken: list[bool] = []
    writer = PipeWriter(w, loop, lambda: broken.append(True))
    chunks = [bytes([i]) * (7_000 + i) for i in range(40)]  # ~290 KiB
    for i, chunk in enumerate(chunks):
        if i % 3:
            writer.write_soon(chunk)
        else:
            writer.write(chunk)
    expected = b"".join(chunks)
    received = bytearray()
    os.set_blocking(r, False)

    def drain() -> None:
        try:
            received.extend(os.read(r, 1 << 16))
        except BlockingIOError:
            pass
        if len(received) >= len(expected):
            done.set()

    done = asyncio.Event()
    loop.add_reader(r, drain)
    try:
        await asyncio.wait_for(done.wait(), 20)
    finally:
        loop.remove_reader(r)
        writer.close()
        os.close(r)
    assert bytes(received) == expected
    assert not broken
