"""Length-prefixed frames with a hard size cap, and record codecs. Sans-IO.

A frame is a 4-byte big-endian length followed by that many bytes of msgpack.
:class:`FrameDecoder` checks the declared length against ``max_frame_bytes``
*before* buffering the body, so a hostile length costs nothing; given
``max_decoded_bytes``, it also refuses a body that could decode into more memory than
that (see :mod:`corral.ipc.bound`) before decoding it. Anything over the caps, a
zero length, or a body that does not decode to the declared message union is a
:class:`ProtocolViolation`; the decoder is then poisoned.

This module does no I/O: callers feed it bytes they read and write the bytes
it returns. See :mod:`corral.ipc.messages` for the message types.
"""

from __future__ import annotations

import struct
from typing import Any, Generic, NoReturn, TypeVar

import msgspec

from corral.ipc.bound import MAX_WEIGHT, decoded_size_bound

__all__ = [
    "DEFAULT_MAX_FRAME_BYTES",
    "HEADER_BYTES",
    "MAX_FRAME_LIMIT",
    "FrameDecoder",
    "ProtocolViolation",
    "RecordDecoder",
    "encode_frame",
    "encode_record",
    "frame_header",
]

HEADER_BYTES = 4
DEFAULT_MAX_FRAME_BYTES = 64 * 1024 * 1024
MAX_FRAME_LIMIT = 2**32 - 1  # the largest length a 4-byte header can state

M = TypeVar("M")

_encoder = msgspec.msgpack.Encoder()
# A frame's header for a body of the given size (HEADER_BYTES, big-endian), without a
# Python frame: for warm paths that encode the body themselves.
frame_header = struct.Struct(">I").pack
_unpack_header = struct.Struct(">I").unpack_from


class ProtocolViolation(Exception):
    """The peer sent bytes that are not a valid frame of the expected messages."""


def encode_frame(msg: Any, *, max_frame_bytes: int = MAX_FRAME_LIMIT) -> bytes:
    """Encode ``msg`` as one frame (header + msgpack body).

    Raises:
        ValueError: the body is larger than ``max_frame_bytes``.
        TypeError, OverflowError, RecursionError: msgpack cannot carry ``msg``.
    """
    body = _encoder.encode(msg)
    size = len(body)
    if size > max_frame_bytes:
        _check_limit(size, max_frame_bytes)
    return frame_header(size) + body


def encode_frame_parts(
    msg: Any, tail: bytes, *, max_frame_bytes: int = MAX_FRAME_LIMIT
) -> tuple[bytes, bytes]:
    """``encode_frame`` for a message whose last field is a ``msgspec.Raw`` holding
    ``tail``, without copying ``tail``: ``msg`` carries ``Raw(b"\\xc0")`` (msgpack nil) in
    its place, and the frame is ``head + tail``. For large call arguments."""
    body = _encoder.encode(msg)
    if not body.endswith(b"\xc0"):
        raise ValueError("the message must end with a Raw(b'\\xc0') placeholder")
    head = body[:-1]
    size = len(head) + len(tail)
    _check_limit(size, max_frame_bytes)
    return frame_header(size) + head, tail


def _check_limit(size: int, max_frame_bytes: int) -> None:
    if size > max_frame_bytes:
        raise ValueError(f"frame of {size} bytes exceeds the limit of {max_frame_bytes} bytes")


def encode_record(msg: Any) -> bytes:
    """Encode ``msg`` for a message-oriented channel (one record, no header)."""
    return _encoder.encode(msg)


class FrameDecoder(Generic[M]):
    """Turns a byte stream into messages of one declared type.

    Args:
        message_type: the union (or Struct) every frame must decode to.
        max_frame_bytes: largest body accepted; checked before buffering.
        max_decoded_bytes: most memory a body may decode into (an upper bound found
            before decoding; see :func:`corral.ipc.bound.decoded_size_bound`); None: no
            limit (the peer is trusted not to send nests of tiny containers).
    """

    def __init__(
        self,
        message_type: Any,
        *,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        max_decoded_bytes: int | None = None,
    ) -> None:
        if not 1 <= max_frame_bytes <= MAX_FRAME_LIMIT:
            raise ValueError(
                f"max_frame_bytes must be in 1..{MAX_FRAME_LIMIT}, got {max_frame_bytes}"
            )
        if max_decoded_bytes is not None and max_decoded_bytes < 1:
            raise ValueError(f"max_decoded_bytes must be >= 1, got {max_decoded_bytes}")
        self._decoder: msgspec.msgpack.Decoder[M] = msgspec.msgpack.Decoder(message_type)
        self._max = max_frame_bytes
        self._max_decoded = max_decoded_bytes or 0
        # Bodies up to this size cannot decode into more than max_decoded_bytes, whatever
        # they hold: they are decoded without a look (every reply of a usual size).
        self._unchecked = (
            MAX_FRAME_LIMIT if max_decoded_bytes is None else max_decoded_bytes // MAX_WEIGHT
        )
        # Bytes of an incomplete frame, as received (joined once, when it is complete:
        # a 16 MiB body in 64 KiB reads is copied once, not once per read).
        self._chunks: list[bytes] = []
        self._held = 0
        # Bytes the held frame needs in all: its header's, until the header is known.
        self._wanted = HEADER_BYTES
        self._poisoned: ProtocolViolation | None = None

    @property
    def buffered(self) -> int:
        """Bytes held for an incomplete frame (never more than header + max)."""
        return self._held

    def feed(self, data: bytes | bytearray | memoryview) -> list[M]:
        """Add bytes; return every message completed by them, in order.

        Raises:
            ProtocolViolation: over-cap or zero length, or an undecodable body.
                The decoder stays poisoned: every later call raises it again.
        """
        if self._poisoned is not None:
            raise self._poisoned
        if not data:
            return []
        # Decoded Raw payloads point into the bytes they came from: keep only immutable ones.
        data = data if isinstance(data, bytes) else bytes(data)
        if self._chunks:
            self._chunks.append(data)
            self._held += len(data)
            if self._held < self._wanted:
                return []
            data = b"".join(self._chunks)
            self._chunks.clear()
            self._held = 0
        # Every whole frame in ``data`` is decoded; what is left is held (after checking
        # its header, if it has one, so that an over-cap length is refused before buffering).
        out: list[M] = []
        view = memoryview(data)
        pos, end = 0, len(data)
        decode, limit, unchecked = self._decoder.decode, self._max, self._unchecked
        while end - pos >= HEADER_BYTES:
            start = pos + HEADER_BYTES
            size = _unpack_header(data, pos)[0]
            if size == 0 or size > limit:
                self._poison(f"frame length {size} is outside 1..{limit} bytes")
            if end - start < size:
                self._wanted = start - pos + size
                break
            pos = start + size
            if size > unchecked:
                bound = decoded_size_bound(data, self._max_decoded, start, pos)
                if bound > self._max_decoded:
                    self._poison(
                        f"a frame of {size} bytes could decode into more than "
                        f"{self._max_decoded} bytes of objects, the decoding limit"
                    )
            try:
                out.append(decode(view[start:pos]))
            except (msgspec.DecodeError, RecursionError, ValueError) as exc:
                self._poison(f"undecodable frame: {exc}"[:500])
        else:
            self._wanted = HEADER_BYTES
        if pos < end:
            rest = data[pos:] if pos else data
            self._chunks.append(rest)
            self._held = len(rest)
        return out

    def _poison(self, message: str) -> NoReturn:
        self._poisoned = ProtocolViolation(message)
        self._chunks.clear()
        self._held = 0
        raise self._poisoned


class RecordDecoder(Generic[M]):
    """Decodes one record of a message-oriented channel to the declared type."""

    def __init__(self, message_type: Any) -> None:
        self._decoder: msgspec.msgpack.Decoder[M] = msgspec.msgpack.Decoder(message_type)

    def decode(self, record: bytes) -> M:
        """Raises:
        ProtocolViolation: the record does not decode to the declared type."""
        try:
            return self._decoder.decode(record)
        except (msgspec.DecodeError, RecursionError, ValueError) as exc:
            raise ProtocolViolation(f"undecodable record: {exc}"[:500]) from exc
