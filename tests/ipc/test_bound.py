"""Pure tests of the decoded-size bound: msgpack bodies in, a bound out, no processes.

The bound must hold for what msgspec really allocates (measured with tracemalloc) and stay
close enough to it that ordinary replies are not refused; a body that would decode into
far more than its size must be found out cheaply, whatever its shape.
"""

from __future__ import annotations

import datetime
import gc
import struct
import tracemalloc
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corral.ipc import bound
from corral.ipc.bound import DECODE_BUDGET_FACTOR, MAX_WEIGHT, decoded_size_bound
from corral.ipc.framing import FrameDecoder, ProtocolViolation, encode_frame
from corral.ipc.messages import FromWorker, Result

enc = msgspec.msgpack.encode
_decode = msgspec.msgpack.Decoder().decode
UNLIMITED = 2**62  # a limit no bound reaches: the walk goes to the end
MIB = 1 << 20


def walked(body: bytes) -> int:
    """The bound found by walking every item, to the end."""
    return bound._walk(body, 0, len(body), UNLIMITED)


def allocated(body: bytes) -> int:
    """Bytes msgspec's untyped decode of ``body`` holds once done (tracemalloc)."""
    gc.collect()
    tracemalloc.start()
    try:
        value = _decode(body)
        size = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    del value
    return size


SHAPES: dict[str, Any] = {
    "empty lists": [[]] * 20_000,
    "empty dicts": [{}] * 20_000,
    "nested lists": [[[i, [i]]] for i in range(5_000)],
    "one-entry dicts": [{i: None} for i in range(5_000)],
    "records": [
        {"id": i, "name": f"user{i}", "score": i * 0.5, "tags": ["a", "bc"]} for i in range(5_000)
    ],
    "dicts of every small size": [
        {j * 1.5: j for j in range(n)} for n in range(40) for _ in range(50)
    ],
    "big dict": {i * 1.5: None for i in range(50_000)},
    "floats": [i * 0.25 for i in range(20_000)],
    "ints of every width": [
        v for i in range(2_000) for v in (i, -i, 300 + i, 70_000 + i, 2**40 + i, -(2**40) - i)
    ],
    "negative fixints": [-20] * 20_000,
    "ascii strs": [f"s{i}" for i in range(10_000)],
    "latin-1 strs": [f"é{i}" for i in range(10_000)],
    "ucs-2 strs": [f"ĉ{i}" for i in range(10_000)],
    "ucs-4 strs": [f"\U0001f600{i}" + "x" * 30 for i in range(10_000)],
    "str8/16/32": ["x" * 40, "y" * 300, "z" * 70_000] * 10,
    "bin": [b"", b"a", b"ab" * 3, b"c" * 300, b"d" * 70_000] * 10,
    "ext": [msgspec.msgpack.Ext(5, bytes(n)) for n in (0, 1, 2, 4, 8, 16, 3, 300, 70_000)] * 10,
    "timestamps": [datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC)] * 5_000,
    "scalars": [None, True, False, 0, 127, ""] * 5_000,
    "mixed": [[0, 0.5, "ab", None, b"xy", {"k": [1, 2, 3]}]] * 3_000,
}


@pytest.mark.parametrize("value", SHAPES.values(), ids=SHAPES.keys())
def test_bound_holds_for_what_decoding_allocates(value: Any) -> None:
    body = enc(value)
    real = allocated(body)
    bound = walked(body)
    assert real <= bound <= 3 * real + 4096


@pytest.mark.parametrize("value", SHAPES.values(), ids=SHAPES.keys())
def test_every_step_bounds_the_walk(value: Any) -> None:
    body = enc(value)
    # The limit decides where it stops: each earlier step's figure, where it decides,
    # is at least the walk's, and any decision at or above the walk's figure is "within".
    exact = walked(body)
    assert len(body) * MAX_WEIGHT >= exact
    assert decoded_size_bound(body, exact) <= exact
    assert decoded_size_bound(body, exact - 1) > exact - 1


@given(
    st.recursive(
        st.none()
        | st.booleans()
        | st.integers(min_value=-(2**63), max_value=2**64 - 1)
        | st.floats(allow_nan=False)
        | st.text(max_size=40)
        | st.binary(max_size=40),
        lambda children: (
            st.lists(children, max_size=20)
            | st.dictionaries(st.text(max_size=8), children, max_size=20)
        ),
        max_leaves=200,
    )
)
@settings(max_examples=200, deadline=None)
# CPU-bound (about 11 s of CPU: a gc.collect() and a tracemalloc run per example): its hang
# guard leaves room for a host whose cores are busy with other work.
@pytest.mark.timeout(300)
def test_bound_holds_for_any_value(value: Any) -> None:
    body = enc(value)
    assert allocated(body) <= walked(body)


def test_a_nest_of_empty_lists_is_refused() -> None:
    body = enc([[]] * 8_000_000)  # 8 MB that decode into over 500 MiB
    assert decoded_size_bound(body, 64 * MIB) > 64 * MIB
    assert decoded_size_bound(body, 520 * MIB) > 520 * MIB
    assert decoded_size_bound(body, 600 * MIB) <= 600 * MIB


def test_the_walk_stops_soon_after_the_limit_is_passed() -> None:
    body = enc([[[0, 0.5]] * 10_000] * 100)  # 136 MB in all, at most 1.3 MB per inner list
    assert 1 * MIB < decoded_size_bound(body, 1 * MIB) < 3 * MIB


def test_small_bodies_get_the_size_times_the_largest_weight() -> None:
    body = enc([[]] * 100)
    assert decoded_size_bound(body, len(body) * MAX_WEIGHT) == len(body) * MAX_WEIGHT


@pytest.mark.parametrize(
    "value",
    [
        [7] * 1000,
        [0.5] * 1000,
        [300] * 1000,
        [2**40] * 1000,
        [None, True, 1, -3, [], {}, ""] * 200,
        [[]] * 1000 + [1.5, [[]] * 30],
        [0] * 40 + [200] * 40,
    ],
    ids=["fixints", "floats", "uint16", "uint64", "one-byte items", "run then more", "two runs"],
)
def test_arrays_weighed_at_c_speed_match_the_item_by_item_walk(
    value: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    body = enc(value)
    fast = walked(body)
    monkeypatch.setattr(bound, "_FAST_MIN", 2**40)  # never weigh an array at C speed
    assert walked(body) == fast


@pytest.mark.parametrize(
    "body",
    [
        b"\x92\x90",  # an array of two with one item
        b"\xdd\x00\x10\x00\x00",  # an array32 of 1M with no items
        b"\xdf\xff\xff\xff\xff",  # a map32 of 4G entries with none
        b"\xd9",  # str8 without its length
        b"\xda\x00",  # str16 with half its length
        b"\xdb\x00\x00\x00\x10abc",  # str32 longer than the body
        b"\xc6\xff\xff\xff\xff",  # bin32 of 4 GiB, no bytes
        b"\xc9\x00\x00\x00\x05",  # ext32 without its type or data
        b"\x91\xc1",  # the byte msgpack never uses
        b"",
    ],
)
def test_truncated_or_malformed_bodies_are_bounded_without_error(body: bytes) -> None:
    # What precedes the fault is charged (and a container's declared size, ahead of its
    # items); msgspec refuses the body at the fault.
    assert decoded_size_bound(body, 0) >= 0
    assert decoded_size_bound(body, UNLIMITED) >= 0
    with pytest.raises(msgspec.DecodeError):
        _decode(body)


@pytest.mark.parametrize("header", [b"\xdd", b"\xdf", b"\xdb", b"\xc6", b"\xc9"], ids=repr)
def test_a_lying_count_allocates_nothing_beyond_the_bytes_behind_it(header: bytes) -> None:
    # What the byte-count steps rest on: msgspec grows a container as its items arrive
    # and checks a length against the bytes left, so a header claiming 4G items or bytes
    # costs no more than the bytes that follow it.
    body = header + struct.pack(">I", 2**32 - 1) + b"\xc0" * 64
    gc.collect()
    tracemalloc.start()
    try:
        with pytest.raises(msgspec.DecodeError):
            _decode(body)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak <= len(body) * MAX_WEIGHT


def test_str_bin_and_ext_bodies_are_skipped_by_length_not_read_as_items() -> None:
    payload = bytes([0x90]) * 100_000  # would weigh 64 bytes each if read as items
    for value in (payload.decode("latin-1"), payload, msgspec.msgpack.Ext(1, payload)):
        body = enc([value])
        assert walked(body) < 5 * len(body)


def test_a_body_inside_a_larger_buffer_is_bounded_alone() -> None:
    body = enc([[]] * 10_000)
    buf = b"\x00" * 3 + body + enc([[]] * 50_000)
    assert decoded_size_bound(buf, 0, 3, 3 + len(body)) == walked(body)
    limit = allocated(body) * 2
    assert decoded_size_bound(buf, limit, 3, 3 + len(body)) <= limit


def test_the_budget_factor_admits_dense_payloads_of_a_whole_frame() -> None:
    frame = 4 * MIB
    budget = DECODE_BUDGET_FACTOR * frame
    for value in (
        b"x" * (frame - 64),
        "x" * (frame - 64),
        [0.5] * (frame // 9 - 8),
        [2**40 + i for i in range(frame // 9 - 8)],
    ):
        body = enc(value)
        assert len(body) <= frame
        assert decoded_size_bound(body, budget) <= budget


# -- in the frame decoder ---------------------------------------------------------------------


def result_frame(value: Any) -> bytes:
    return bytes(encode_frame(Result(1, value)))


def test_frame_decoder_refuses_a_frame_over_its_decoding_limit() -> None:
    dec: FrameDecoder[FromWorker] = FrameDecoder(
        FromWorker, max_frame_bytes=1 * MIB, max_decoded_bytes=8 * MIB
    )
    with pytest.raises(ProtocolViolation, match="could decode into more than 8388608 bytes"):
        dec.feed(result_frame([[]] * 500_000))
    with pytest.raises(ProtocolViolation):  # poisoned
        dec.feed(result_frame(1))


def test_frame_decoder_refuses_it_fed_one_chunk_at_a_time() -> None:
    dec: FrameDecoder[FromWorker] = FrameDecoder(
        FromWorker, max_frame_bytes=1 * MIB, max_decoded_bytes=8 * MIB
    )
    data = result_frame([[]] * 500_000)
    with pytest.raises(ProtocolViolation):
        for i in range(0, len(data), 65536):
            dec.feed(data[i : i + 65536])


def test_frame_decoder_decodes_a_frame_just_under_its_decoding_limit() -> None:
    limit = 8 * MIB
    dec: FrameDecoder[FromWorker] = FrameDecoder(
        FromWorker, max_frame_bytes=1 * MIB, max_decoded_bytes=limit
    )
    n = (limit - 4096) // 73  # 64 bytes per empty list, 9 per slot
    msg, after = dec.feed(result_frame([[]] * n) + result_frame("next"))
    assert isinstance(msg, Result) and isinstance(after, Result)
    value, next_value = (msgspec.msgpack.decode(m.value) for m in (msg, after))
    assert (len(value), next_value) == (n, "next")


def test_frame_decoder_without_a_decoding_limit_decodes_anything() -> None:
    dec: FrameDecoder[FromWorker] = FrameDecoder(FromWorker, max_frame_bytes=1 * MIB)
    (msg,) = dec.feed(result_frame([[]] * 500_000))
    assert isinstance(msg, Result)


@pytest.mark.parametrize("value", [0, -1])
def test_frame_decoder_rejects_a_decoding_limit_below_one(value: int) -> None:
    with pytest.raises(ValueError, match="max_decoded_bytes"):
        FrameDecoder(FromWorker, max_decoded_bytes=value)
