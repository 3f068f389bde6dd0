"""Length-prefixed frames with a hard size cap, and record codecs. Sans-IO.

A frame is a 4-byte big-endian length followed by that many bytes of msgpack.
:class:`FrameDecoder` checks the declared length against ``max_frame_bytes``
*before* buffering the body, so a hostile length costs nothing. Anything over
the cap, a zero length, or a body that does not decode to the declared message
union is a :class:`ProtocolViolation`; the decoder is then poisoned.

This module does no I/O: callers feed it bytes they read and write the bytes
it returns. See :mod:`corral.ipc.messages` for the message types.
"""

from __future__ import annotations

from typing import Any, Generic, TypeVar

import msgspec

__all__ = [
    "DEFAULT_MAX_FRAME_BYTES",
    "HEADER_BYTES",
    "MAX_FRAME_LIMIT",
    "FrameDecoder",
    "ProtocolViolation",
    "RecordDecoder",
    "encode_frame",
    "encode_record",
]

HEADER_BYTES = 4
DEFAULT_MAX_FRAME_BYTES = 64 * 1024 * 1024
MAX_FRAME_LIMIT = 2**32 - 1  # the largest length a 4-byte header can state

M = TypeVar("M")

_encoder = msgspec.msgpack.Encoder()


class ProtocolViolation(Exception):
    """The peer sent bytes that are not a valid frame of the expected messages."""


def encode_frame(msg: Any, *, max_frame_bytes: int = MAX_FRAME_LIMIT) -> bytearray:
    """Encode ``msg`` as one frame (header + msgpack body).

    Raises:
        ValueError: the body is larger than ``max_frame_bytes``.
        TypeError, OverflowError, RecursionError: msgpack cannot carry ``msg``.
    """
    buf = bytearray(HEADER_BYTES)
    _encoder.encode_into(msg, buf, HEADER_BYTES)
    size = len(buf) - HEADER_BYTES
    if size > max_frame_bytes:
        raise ValueError(f"frame of {size} bytes exceeds the limit of {max_frame_bytes} bytes")
    buf[:HEADER_BYTES] = size.to_bytes(HEADER_BYTES, "big")
    return buf


def encode_record(msg: Any) -> bytes:
    """Encode ``msg`` for a message-oriented channel (one record, no header)."""
    return _encoder.encode(msg)


class FrameDecoder(Generic[M]):
    """Turns a byte stream into messages of one declared type.

    Args:
        message_type: the union (or Struct) every frame must decode to.
        max_frame_bytes: largest body accepted; checked before buffering.
    """

    def __init__(
        self, message_type: Any, *, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
    ) -> None:
        if not 1 <= max_frame_bytes <= MAX_FRAME_LIMIT:
            raise ValueError(
                f"max_frame_bytes must be in 1..{MAX_FRAME_LIMIT}, got {max_frame_bytes}"
            )
        self._decoder: msgspec.msgpack.Decoder[M] = msgspec.msgpack.Decoder(message_type)
        self._max = max_frame_bytes
        self._buf = bytearray()
        # Body length of the frame being buffered, or -1 while reading a header.
        self._need = -1
        self._poisoned: ProtocolViolation | None = None

    @property
    def buffered(self) -> int:
        """Bytes held for an incomplete frame (never more than header + max)."""
        return len(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> list[M]:
        """Add bytes; return every message completed by them, in order.

        Raises:
            ProtocolViolation: over-cap or zero length, or an undecodable body.
                The decoder stays poisoned: every later call raises it again.
        """
        if self._poisoned is not None:
            raise self._poisoned
        out: list[M] = []
        buf = self._buf
        if not buf and self._need < 0:
            # Fast path: decode whole frames straight out of ``data``. Decoded Raw payloads
            # point into it, so it must be immutable.
            if not isinstance(data, bytes):
                data = bytes(data)
            view = memoryview(data)
            pos, end = 0, len(view)
            while end - pos >= HEADER_BYTES:
                size = int.from_bytes(view[pos : pos + HEADER_BYTES], "big")
                self._check_size(size)
                if end - pos - HEADER_BYTES < size:
                    break
                start = pos + HEADER_BYTES
                out.append(self._decode(view[start : start + size]))
                pos = start + size
            if pos < end:
                buf += view[pos:]
            return out
        buf += data
        while True:
            if self._need < 0:
                if len(buf) < HEADER_BYTES:
                    return out
                size = int.from_bytes(buf[:HEADER_BYTES], "big")
                self._check_size(size)
                del buf[:HEADER_BYTES]
                self._need = size
            if len(buf) < self._need:
                return out
            body = bytes(buf[: self._need])
            del buf[: self._need]
            self._need = -1
            out.append(self._decode(body))

    def _check_size(self, size: int) -> None:
        if size == 0 or size > self._max:
            self._poison(f"frame length {size} is outside 1..{self._max} bytes")

    def _decode(self, body: bytes | memoryview) -> M:
        try:
            return self._decoder.decode(body)
        except (msgspec.DecodeError, RecursionError, ValueError) as exc:
            self._poison(f"undecodable frame: {exc}"[:500])
            raise  # unreachable: _poison raises

    def _poison(self, message: str) -> None:
        self._poisoned = ProtocolViolation(message)
        self._buf.clear()
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
