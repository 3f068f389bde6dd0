"""Property-based: whatever bytes a live worker writes to its reply pipe, the caller
gets a result or a typed corral error within its timeout, and the supervisor and the
other tenants carry on. (The decoder alone is fuzzed in test_framing.py.)"""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import corral
from corral.ipc import CallFailed, Hello, RemoteError, Result, encode_frame

pytestmark = pytest.mark.timeout(120)

_valid_messages = st.sampled_from(
    [
        Hello(1, 123, None),
        Result(1, msgspec.Raw(msgspec.msgpack.encode("forged"))),
        Result(99999, msgspec.Raw(b"\xc0")),
        CallFailed(1, "kernel", RemoteError("x.Y", "forged", "")),
    ]
)
_junk = st.one_of(
    st.binary(min_size=1, max_size=64),  # anything
    st.binary(max_size=64).map(lambda b: len(b).to_bytes(4, "big") + b),  # framed junk
    st.integers(0, 2**32 - 1).map(lambda n: n.to_bytes(4, "big")),  # a bare length
    _valid_messages.map(lambda m: bytes(encode_frame(m))),  # well-formed, out of place
    st.recursive(st.none() | st.integers(-(2**63), 2**63 - 1), st.lists, max_leaves=200).map(
        lambda v: bytes(encode_frame(Result(1, msgspec.Raw(msgspec.msgpack.encode(v)))))
    ),  # nested payloads
)
# What a caller may get when its worker's pipe carries junk: a protocol error (the worker
# is killed), a timeout (a frame left incomplete), or, for a well-formed CallFailed for
# the call in flight, the failure the worker forged about its own call.
_OUTCOMES = (
    corral.ProtocolError,
    corral.CallTimeoutError,
    corral.WorkerCrashedError,
    corral.KernelError,
    corral.InvalidCallError,
)


def test_junk_from_a_live_worker_gives_typed_outcomes_only() -> None:
    counts: dict[str, int] = {}
    # call_timeout is short for the attacker's calls (junk may leave a frame incomplete);
    # every other call has a generous timeout of its own, so that a busy host cannot fail it.
    with corral.SyncSupervisor(
        "tests.kernels:make", call_timeout=0.5, term_timeout=0.5, restart_intensity=10_000
    ) as sup:
        bystander = sup.invoke("bystander", "whoami", timeout=30)["pid"]

        @settings(
            max_examples=60,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
        )
        @given(junk=st.lists(_junk, min_size=1, max_size=3).map(b"".join))
        def check(junk: bytes) -> None:
            outcome: Any
            try:
                outcome = sup.call("attacker", "write_raw", junk)
            except _OUTCOMES as exc:
                outcome = exc
            # A value is fine too: a worker may answer its own call with anything (a
            # well-formed Result for the id in flight is its answer).
            kind = "value" if not isinstance(outcome, BaseException) else type(outcome).__name__
            counts[kind] = counts.get(kind, 0) + 1
            assert sup.invoke("bystander", "whoami", timeout=30)["pid"] == bystander  # untouched

        check()
        assert sup.invoke("attacker", "echo", ("still served",), timeout=30) == "still served"
    print(f"\noutcomes over the examples: {counts}")
    assert counts.get("ProtocolError", 0) > 0
