"""Pure tests of the frame codec: no pipes, no processes, bytes in and messages out."""

from __future__ import annotations

import itertools
import time
import tracemalloc
from typing import Any

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from corral.ipc.framing import (
    DEFAULT_MAX_FRAME_BYTES,
    HEADER_BYTES,
    FrameDecoder,
    ProtocolViolation,
    RecordDecoder,
    encode_frame,
    encode_frame_parts,
    encode_record,
)
from corral.ipc.messages import Call, Shutdown, Start, ToWorker

MAX_ENCODABLE = 2**32 - 1


def raw(value: Any) -> msgspec.Raw:
    return msgspec.Raw(msgspec.msgpack.encode(value))


MESSAGES: list[Any] = [
    Start(
        tenant="acme",
        factory="pkg.mod:make",
        factory_blob=None,
        sys_path=["/srv/plugins", "/opt/lib"],
        max_frame_bytes=1 << 20,
    ),
    Call(id=1, method="add", args=raw([[1, 2], {}])),
    Call(id=2, method="echo", args=raw([["x" * 300], {"flag": True}])),
    Shutdown(),
]


def stream(msgs: list[Any]) -> bytes:
    return b"".join(bytes(encode_frame(m)) for m in msgs)


def header(size: int) -> bytes:
    return size.to_bytes(HEADER_BYTES, "big")


def frame_of(body: bytes) -> bytes:
    return header(len(body)) + body


def decoder(max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> FrameDecoder[ToWorker]:
    return FrameDecoder(ToWorker, max_frame_bytes=max_frame_bytes)


def feed_chunks(dec: FrameDecoder[ToWorker], data: bytes, cuts: list[int]) -> list[ToWorker]:
    """Feed ``data`` cut at the given offsets; return every message produced."""
    out: list[ToWorker] = []
    bounds = [0, *cuts, len(data)]
    for lo, hi in itertools.pairwise(bounds):
        out += dec.feed(data[lo:hi])
    return out


# --- encoding --------------------------------------------------------------------------------


def test_encode_frame_is_big_endian_length_then_msgpack_body() -> None:
    msg = MESSAGES[1]
    frame = encode_frame(msg)
    body = msgspec.msgpack.encode(msg)
    assert isinstance(frame, bytes)
    assert bytes(frame) == len(body).to_bytes(4, "big") + body
    assert encode_record(msg) == body


def test_encode_frame_accepts_a_body_of_exactly_the_limit() -> None:
    msg = MESSAGES[2]
    size = len(msgspec.msgpack.encode(msg))
    assert len(encode_frame(msg, max_frame_bytes=size)) == HEADER_BYTES + size


def test_encode_frame_over_the_limit_is_a_value_error() -> None:
    msg = MESSAGES[2]
    size = len(msgspec.msgpack.encode(msg))
    with pytest.raises(ValueError, match=f"frame of {size} bytes exceeds the limit of {size - 1}"):
        encode_frame(msg, max_frame_bytes=size - 1)


# --- feeding: whole, concatenated, in pieces -------------------------------------------------


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: type(m).__name__)
def test_one_frame_fed_whole(msg: Any) -> None:
    dec = decoder()
    assert dec.feed(encode_frame(msg)) == [msg]
    assert dec.buffered == 0


def test_concatenated_frames_fed_whole() -> None:
    dec = decoder()
    assert dec.feed(stream(MESSAGES)) == MESSAGES
    assert dec.buffered == 0


def test_frames_fed_one_byte_at_a_time() -> None:
    data = stream(MESSAGES)
    dec = decoder()
    out: list[ToWorker] = []
    for i in range(len(data)):
        out += dec.feed(data[i : i + 1])
        assert dec.buffered <= HEADER_BYTES + max(len(encode_frame(m)) for m in MESSAGES)
    assert out == MESSAGES
    assert dec.buffered == 0


def test_messages_come_out_as_soon_as_their_frame_is_complete() -> None:
    first, second = bytes(encode_frame(MESSAGES[1])), bytes(encode_frame(MESSAGES[3]))
    dec = decoder()
    assert dec.feed(first[:-1]) == []
    assert dec.buffered == len(first) - 1
    assert dec.feed(first[-1:] + second[:2]) == [MESSAGES[1]]
    assert dec.buffered == 2
    assert dec.feed(second[2:]) == [MESSAGES[3]]
    assert dec.buffered == 0


def test_every_cut_into_two_pieces_gives_the_same_messages() -> None:
    data = stream(MESSAGES)
    for cut in range(len(data) + 1):
        assert feed_chunks(decoder(), data, [cut]) == MESSAGES, f"cut at {cut}"


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_feed_accepts_any_bytes_like(kind: type) -> None:
    data = stream(MESSAGES)
    dec = decoder()
    assert dec.feed(kind(data[:7])) + dec.feed(kind(data[7:])) == MESSAGES


def test_empty_feed_yields_nothing() -> None:
    dec = decoder()
    assert dec.feed(b"") == []
    assert dec.feed(bytes(encode_frame(MESSAGES[3]))[:2]) == []
    assert dec.feed(b"") == []
    assert dec.buffered == 2


def test_header_split_then_body_in_one_chunk() -> None:
    frame = bytes(encode_frame(MESSAGES[1]))
    dec = decoder()
    assert dec.feed(frame[:2]) == []
    assert dec.feed(frame[2:HEADER_BYTES]) == []
    assert dec.feed(frame[HEADER_BYTES:]) == [MESSAGES[1]]


def test_short_body_fed_byte_by_byte_is_judged_when_its_last_byte_arrives() -> None:
    dec = decoder()
    data = frame_of(b"\xc1")
    for i in range(len(data) - 1):
        assert dec.feed(data[i : i + 1]) == []
    with pytest.raises(ProtocolViolation):
        dec.feed(data[-1:])


def test_every_cut_into_three_pieces_gives_the_same_messages() -> None:
    msgs = [MESSAGES[1], MESSAGES[3]]
    data = stream(msgs)
    failed = []
    for a in range(len(data) + 1):
        for b in range(a, len(data) + 1):
            try:
                if feed_chunks(decoder(), data, [a, b]) != msgs:
                    failed.append((a, b))
            except ProtocolViolation:
                failed.append((a, b))
    assert failed == []


def test_decoded_raw_does_not_alias_a_callers_bytearray() -> None:
    msg = MESSAGES[1]
    buf = bytearray(encode_frame(msg))
    [got] = decoder().feed(buf)
    buf[:] = bytes(len(buf))  # the caller reuses its read buffer
    assert got == msg
    buf.clear()


# --- size limits -------------------------------------------------------------------------------


def test_frame_of_exactly_max_frame_bytes_is_accepted() -> None:
    frame = bytes(encode_frame(MESSAGES[2]))
    size = len(frame) - HEADER_BYTES
    assert decoder(max_frame_bytes=size).feed(frame) == [MESSAGES[2]]


def test_frame_one_byte_over_max_frame_bytes_is_a_violation() -> None:
    frame = bytes(encode_frame(MESSAGES[2]))
    size = len(frame) - HEADER_BYTES
    expected = rf"frame length {size} is outside 1\.\.{size - 1} bytes"
    with pytest.raises(ProtocolViolation, match=expected):
        decoder(max_frame_bytes=size - 1).feed(frame)


@pytest.mark.parametrize("declared", [1025, 2**20, MAX_ENCODABLE])
def test_over_cap_length_fails_on_the_header_alone(declared: int) -> None:
    dec = decoder(max_frame_bytes=1024)
    with pytest.raises(ProtocolViolation, match=r"outside 1\.\.1024"):
        dec.feed(header(declared))
    assert dec.buffered == 0


def test_over_cap_length_fed_byte_by_byte_fails_on_the_fourth_byte() -> None:
    dec = decoder(max_frame_bytes=1024)
    hdr = header(MAX_ENCODABLE)
    for i in range(HEADER_BYTES - 1):
        assert dec.feed(hdr[i : i + 1]) == []
        assert dec.buffered == i + 1
    with pytest.raises(ProtocolViolation):
        dec.feed(hdr[-1:])
    assert dec.buffered == 0


def test_over_cap_length_after_a_good_frame_fails_before_buffering_the_body() -> None:
    dec = decoder(max_frame_bytes=1024)
    good = bytes(encode_frame(MESSAGES[3]))
    assert dec.feed(good + header(5000)[:2]) == [MESSAGES[3]]
    with pytest.raises(ProtocolViolation):
        dec.feed(header(5000)[2:])
    assert dec.buffered == 0


def test_over_cap_length_with_a_body_attached_buffers_nothing() -> None:
    dec = decoder(max_frame_bytes=1024)
    with pytest.raises(ProtocolViolation):
        dec.feed(header(4096) + b"\x00" * 4096)
    assert dec.buffered == 0


@pytest.mark.parametrize("chunked", [False, True], ids=["whole", "byte-by-byte"])
def test_zero_length_is_a_violation(chunked: bool) -> None:
    dec = decoder()
    data = header(0) + bytes(encode_frame(MESSAGES[3]))
    with pytest.raises(ProtocolViolation, match="frame length 0"):
        if chunked:
            for i in range(len(data)):
                dec.feed(data[i : i + 1])
        else:
            dec.feed(data)


@pytest.mark.parametrize("value", [0, -1, MAX_ENCODABLE + 1, 2**40])
def test_frame_decoder_rejects_max_frame_bytes_out_of_range(value: int) -> None:
    with pytest.raises(ValueError, match=r"max_frame_bytes must be in 1\.\."):
        FrameDecoder(ToWorker, max_frame_bytes=value)


@pytest.mark.parametrize("value", [1, MAX_ENCODABLE])
def test_frame_decoder_accepts_max_frame_bytes_at_the_bounds(value: int) -> None:
    dec = FrameDecoder(ToWorker, max_frame_bytes=value)
    assert dec.feed(b"") == []


def test_default_limit_is_64_mib() -> None:
    assert DEFAULT_MAX_FRAME_BYTES == 64 * 1024 * 1024
    with pytest.raises(ProtocolViolation):
        decoder().feed(header(DEFAULT_MAX_FRAME_BYTES + 1))


# --- undecodable bodies and poisoning ----------------------------------------------------------

UNDECODABLE = {
    "reserved-byte": b"\xc1",
    "truncated-array": b"\x94\xa4call\x01",
    "not-an-array": msgspec.msgpack.encode(42),
    "unknown-tag": msgspec.msgpack.encode(["launch", 1]),
    "wrong-field-type": msgspec.msgpack.encode(["call", "1", "m", []]),
    "trailing-bytes": msgspec.msgpack.encode(["shutdown"]) + b"\x00",
}


@pytest.mark.parametrize("body", UNDECODABLE.values(), ids=UNDECODABLE.keys())
def test_undecodable_body_is_a_violation(body: bytes) -> None:
    dec = decoder()
    with pytest.raises(ProtocolViolation, match="undecodable frame"):
        dec.feed(frame_of(body))
    assert dec.buffered == 0


LONG_UNDECODABLE = {k: v for k, v in UNDECODABLE.items() if len(v) >= HEADER_BYTES}


@pytest.mark.parametrize("body", LONG_UNDECODABLE.values(), ids=LONG_UNDECODABLE.keys())
def test_undecodable_body_is_a_violation_when_fed_byte_by_byte(body: bytes) -> None:
    dec = decoder()
    data = frame_of(body)
    with pytest.raises(ProtocolViolation, match="undecodable frame"):
        for i in range(len(data)):
            dec.feed(data[i : i + 1])


@pytest.mark.parametrize("bad", [header(0), header(2**31), frame_of(b"\xc1")], ids=repr)
def test_violation_poisons_the_decoder(bad: bytes) -> None:
    dec = decoder(max_frame_bytes=1 << 20)
    with pytest.raises(ProtocolViolation) as first:
        dec.feed(bad)
    good = bytes(encode_frame(MESSAGES[3]))
    for data in (good, b"", good[:1]):
        with pytest.raises(ProtocolViolation) as again:
            dec.feed(data)
        assert again.value is first.value
    assert dec.buffered == 0


def test_violation_message_is_bounded() -> None:
    body = msgspec.msgpack.encode(["x" * 10_000])  # msgspec quotes an unknown tag
    with pytest.raises(ProtocolViolation) as info:
        decoder().feed(frame_of(body))
    assert len(str(info.value)) <= 500


# --- msgpack length bombs and nesting ----------------------------------------------------------

BOMBS = {
    "array32": b"\xdd\xff\xff\xff\xff",
    "map32": b"\xdf\xff\xff\xff\xff",
    "bin32": b"\xc6\xff\xff\xff\xff",
    "str32": b"\xdb\xff\xff\xff\xff",
}
CALL_PREFIX = b"\x94\xa4call\x01\xa1m"  # ["call", 1, "m", <args>]


@pytest.mark.parametrize("where", ["envelope", "raw-field", "str-field"])
@pytest.mark.parametrize("bomb", BOMBS.values(), ids=BOMBS.keys())
def test_length_bombs_are_violations_and_cheap(bomb: bytes, where: str) -> None:
    body = {
        "envelope": bomb,
        "raw-field": CALL_PREFIX + bomb,
        "str-field": b"\x94\xa4call\x01" + bomb,
    }[where]
    dec = decoder()
    tracemalloc.start()
    started = time.perf_counter()
    try:
        with pytest.raises(ProtocolViolation):
            dec.feed(frame_of(body))
        elapsed = time.perf_counter() - started
        _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, f"decoding a {len(body)}-byte bomb allocated {peak} bytes"
    print(f"\nrefused in {elapsed * 1e3:.2f} ms")


def test_raw_payload_is_kept_verbatim_and_not_validated() -> None:
    # A map with non-string keys, an ext type and nesting: nothing ToWorker could hold.
    payload = (
        b"\x83\x01\xc0\xd4\x07\x00\xa1k\xa1n"
        + b"\x91" * 200
        + msgspec.msgpack.encode({"deep": [1.5, b"bin"]})
    )
    body = CALL_PREFIX + payload
    [msg] = decoder().feed(frame_of(body))
    assert isinstance(msg, Call)
    assert (msg.id, msg.method) == (1, "m")
    assert bytes(msg.args) == payload
    assert RecordDecoder(ToWorker).decode(body) == msg


def test_raw_payload_nested_past_the_recursion_limit_is_a_violation_not_recursion_error() -> None:
    # msgspec walks a Raw value (recursively) to find where it ends.
    body = CALL_PREFIX + b"\x91" * 100_000 + b"\xc0"
    with pytest.raises(ProtocolViolation, match="undecodable frame"):
        decoder().feed(frame_of(body))
    with pytest.raises(ProtocolViolation, match="undecodable record"):
        RecordDecoder(ToWorker).decode(body)


@pytest.mark.parametrize(
    "body",
    [
        b"\x91" * 100_000 + b"\xc0",  # the whole envelope nested
        b"\x96\xa5start\xa1t\xc0\xc0" + b"\x91" * 100_000 + b"\xc0" + b"\x01",  # in sys_path
        b"\x81" * 50_000 + b"\xc0",  # nested maps
    ],
    ids=["array", "typed-field", "map"],
)
def test_deeply_nested_envelope_is_a_violation_not_recursion_error(body: bytes) -> None:
    with pytest.raises(ProtocolViolation):
        decoder().feed(frame_of(body))
    with pytest.raises(ProtocolViolation):
        RecordDecoder(ToWorker).decode(body)


# --- RecordDecoder -----------------------------------------------------------------------------


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: type(m).__name__)
def test_record_round_trip(msg: Any) -> None:
    assert RecordDecoder(ToWorker).decode(encode_record(msg)) == msg


@pytest.mark.parametrize("body", UNDECODABLE.values(), ids=UNDECODABLE.keys())
def test_undecodable_record_is_a_violation_chained_to_the_decode_error(body: bytes) -> None:
    with pytest.raises(ProtocolViolation, match="undecodable record") as info:
        RecordDecoder(ToWorker).decode(body)
    assert isinstance(info.value.__cause__, msgspec.DecodeError)


def test_record_decoder_is_not_poisoned_by_a_bad_record() -> None:
    dec: RecordDecoder[ToWorker] = RecordDecoder(ToWorker)
    with pytest.raises(ProtocolViolation):
        dec.decode(b"\xc1")
    assert dec.decode(encode_record(MESSAGES[3])) == MESSAGES[3]


# --- property: arbitrary input never escapes as anything but ProtocolViolation ----------------

_good_frames = st.sampled_from([bytes(encode_frame(m)) for m in MESSAGES])
_pieces = st.lists(
    st.one_of(
        _good_frames,
        st.binary(max_size=64),
        st.builds(header, st.integers(0, 2048)),
    ),
    max_size=8,
)


@given(pieces=_pieces, chunk_sizes=st.lists(st.integers(1, 64), min_size=1, max_size=16))
def test_random_bytes_in_random_chunks_yield_messages_or_protocol_violation(
    pieces: list[bytes], chunk_sizes: list[int]
) -> None:
    data = b"".join(pieces)
    dec = decoder(max_frame_bytes=1024)
    pos, i = 0, 0
    violated = False
    while pos < len(data):
        size = chunk_sizes[i % len(chunk_sizes)]
        chunk = data[pos : pos + size]
        pos, i = pos + size, i + 1
        try:
            msgs = dec.feed(chunk)
        except ProtocolViolation:
            violated = True
            assert dec.buffered == 0
            break
        assert all(isinstance(m, Call | Shutdown | Start) for m in msgs)
        assert dec.buffered <= HEADER_BYTES + 1024
    if violated:
        with pytest.raises(ProtocolViolation):
            dec.feed(b"")


@pytest.mark.parametrize("size", [0, 1, 70_000])
def test_frame_parts_decode_like_a_whole_frame(size: int) -> None:
    """A Call sent as head + payload (the payload not copied) is the same frame."""
    payload = msgspec.msgpack.encode((["x" * size], {"k": 1}))
    head, tail = encode_frame_parts(Call(7, "put", msgspec.Raw(b"\xc0")), payload)
    whole = encode_frame(Call(7, "put", msgspec.Raw(payload)))
    assert head + tail == bytes(whole)
    (msg,) = FrameDecoder(ToWorker).feed(head + tail)
    assert msgspec.msgpack.decode(msg.args) == [["x" * size], {"k": 1}]
    with pytest.raises(ValueError, match="placeholder"):
        encode_frame_parts(Call(7, "put", msgspec.Raw(payload)), payload)


def test_a_big_body_in_many_small_reads_is_joined_once() -> None:
    """16 MiB in 64 KiB pieces: held as received, not re-copied per piece."""
    dec = FrameDecoder(ToWorker)
    body = msgspec.msgpack.encode(b"x" * (16 << 20))
    frame = bytes(encode_frame(Call(1, "put", msgspec.Raw(body))))
    pieces = [frame[i : i + 65536] for i in range(0, len(frame), 65536)]
    for piece in pieces[:-1]:
        assert dec.feed(piece) == []
    assert dec.buffered == len(frame) - len(pieces[-1])
    (msg,) = dec.feed(pieces[-1])
    assert msgspec.msgpack.decode(msg.args) == b"x" * (16 << 20)
    assert dec.buffered == 0
