"""A worker's reply cannot blow up the supervisor by decoding into far more than its size.

A frame under ``max_frame_bytes`` can still decode into 70 times its size (``[[]] * n``
is one byte per 56-byte list); the supervisor bounds what a frame can decode into before
decoding it (``DECODE_BUDGET_FACTOR`` x ``max_frame_bytes``, see ``corral.ipc.bound``).
Beyond the bound the reply is a protocol violation: the caller gets ``ProtocolError``,
that worker is killed, the other tenants carry on, and the supervisor's memory grows by
no more than a few frames' worth. Run under each sandbox preset with real workers.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import psutil
import pytest

import corral
from corral import Sandbox, Supervisor, WorkerEvent
from corral.ipc import DECODE_BUDGET_FACTOR
from tests.helpers import FAST, start_strict, wait_pid_gone

AMPLIFIER = "tests.amplifier:make"
ATTACKER = "attacker"
BYSTANDER = "bystander"
MIB = 1 << 20
MAX_FRAME = 16 * MIB
BUDGET = DECODE_BUDGET_FACTOR * MAX_FRAME  # 128 MiB
ALLOWED_GROWTH = 4 * MAX_FRAME  # the frame, buffered and joined, and the bound's copies
PER_EMPTY_LIST = 73  # the bound's charge: 64 for the list, 9 for its slot
PRESETS: dict[str, Callable[[], Sandbox]] = {
    "none": Sandbox.none,
    "default": Sandbox.default,
    "strict": Sandbox.strict,
}
OPTIONS: dict[str, Any] = {**FAST, "call_timeout": 60.0, "restart_intensity": 50}

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(params=list(PRESETS))
def preset(request: pytest.FixtureRequest) -> str:
    return str(request.param)


class Stops:
    """The ``on_event`` hook: a future per tenant for its first worker's "stopped" event."""

    def __init__(self) -> None:
        self._stopped: dict[str, asyncio.Future[WorkerEvent]] = {}

    def _future(self, tenant: str) -> asyncio.Future[WorkerEvent]:
        if tenant not in self._stopped:
            self._stopped[tenant] = asyncio.get_running_loop().create_future()
        return self._stopped[tenant]

    def __call__(self, event: WorkerEvent) -> None:
        if event.kind == "stopped" and not self._future(event.tenant).done():
            self._future(event.tenant).set_result(event)

    async def first(self, tenant: str) -> WorkerEvent:
        return await self._future(tenant)


@contextlib.asynccontextmanager
async def supervisor(preset: str, stops: Stops) -> AsyncIterator[Supervisor]:
    sup = Supervisor(
        AMPLIFIER, sandbox=PRESETS[preset](), max_frame_bytes=MAX_FRAME, on_event=stops, **OPTIONS
    )
    try:
        if preset == "strict":
            await start_strict(sup)  # skips (or fails, in CI) where strict is unavailable
        else:
            await sup.start()
        yield sup
    finally:
        await sup.aclose()


def worker_pid(sup: Supervisor, tenant: str) -> int:
    (info,) = [w for w in sup.stats().workers if w.tenant == tenant]
    assert info.pid is not None
    return info.pid


class PeakRss:
    """How far this process's resident set rose above where it was at the start: the
    kernel's high-water mark (``VmHWM``), reset at the start through
    ``/proc/self/clear_refs``; where that is refused, the RSS at the end."""

    def __init__(self) -> None:
        self._proc = psutil.Process()
        self.before = self._proc.memory_info().rss
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self._hwm = True
        except OSError:
            self._hwm = False

    def growth(self) -> int:
        if not self._hwm:
            return self._proc.memory_info().rss - self.before
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024 - self.before
        raise AssertionError("no VmHWM in /proc/self/status")


@contextlib.contextmanager
def peak_rss() -> Iterator[PeakRss]:
    yield PeakRss()


async def test_a_reply_that_would_decode_into_hundreds_of_mib_is_a_protocol_error(
    preset: str,
) -> None:
    stops = Stops()
    async with supervisor(preset, stops) as sup:
        assert await sup.call(BYSTANDER, "echo", 1) == 1
        bystander = worker_pid(sup, BYSTANDER)
        assert await sup.call(ATTACKER, "echo", 1) == 1
        attacker = worker_pid(sup, ATTACKER)

        # 8 MB on the wire, under the 16 MiB frame cap; over 550 MiB once decoded.
        with peak_rss() as rss:
            with pytest.raises(corral.ProtocolError, match="could decode into more than") as err:
                await sup.call(ATTACKER, "empty_lists", 8_000_000)
            grown = rss.growth()
        assert grown <= ALLOWED_GROWTH, f"the supervisor grew by {grown / MIB:.0f} MiB"
        assert f"{BUDGET} bytes" in str(err.value)
        assert err.value.tenant == ATTACKER

        stopped = await stops.first(ATTACKER)
        assert (stopped.reason, stopped.rung) == ("protocol_error", "kill")
        await wait_pid_gone(attacker)

        assert await sup.call(BYSTANDER, "echo", 2) == 2
        assert worker_pid(sup, BYSTANDER) == bystander
        assert await sup.call(ATTACKER, "echo", 3) == 3  # a new worker for the tenant
        assert worker_pid(sup, ATTACKER) != attacker


async def test_a_reply_of_nested_empty_containers_is_a_protocol_error(preset: str) -> None:
    # No run of one-byte items at the top level: the bound walks the items one by one.
    stops = Stops()
    async with supervisor(preset, stops) as sup:
        assert await sup.call(BYSTANDER, "echo", 1) == 1
        with peak_rss() as rss:
            with pytest.raises(corral.ProtocolError, match="could decode into more than"):
                await sup.call(ATTACKER, "empty_dicts_in_lists", 1_500_000)  # 6 MB
            grown = rss.growth()
        assert grown <= ALLOWED_GROWTH, f"the supervisor grew by {grown / MIB:.0f} MiB"
        assert (await stops.first(ATTACKER)).reason == "protocol_error"
        assert await sup.call(BYSTANDER, "echo", 2) == 2


async def test_a_large_reply_just_under_the_bound_is_decoded(preset: str) -> None:
    stops = Stops()
    async with supervisor(preset, stops) as sup:
        n = int(BUDGET * 0.95) // PER_EMPTY_LIST  # 1.7 MB on the wire, ~110 MiB decoded
        value = await sup.call(ATTACKER, "empty_lists", n)
        assert len(value) == n and value[0] == [] and value[-1] == []
        del value
        assert sup.stats().stops == {}
        payload = b"x" * (MAX_FRAME - 1024)  # a dense reply as large as the frame cap
        assert await sup.call(ATTACKER, "big", len(payload)) == payload
