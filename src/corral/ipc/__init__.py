"""Sans-IO protocol: message Structs, framing and codec limits.

No asyncio, subprocess, psutil or os imports live here; both sides of the
pipes (``corral.supervisor`` and ``corral.worker``) build on this package.
"""

from corral.ipc.bound import DECODE_BUDGET_FACTOR, decoded_size_bound
from corral.ipc.framing import (
    DEFAULT_MAX_FRAME_BYTES,
    HEADER_BYTES,
    MAX_FRAME_LIMIT,
    FrameDecoder,
    ProtocolViolation,
    RecordDecoder,
    encode_frame,
    encode_frame_parts,
    encode_record,
    frame_header,
)
from corral.ipc.messages import *  # noqa: F403
from corral.ipc.messages import __all__ as _messages_all

__all__ = [
    "DECODE_BUDGET_FACTOR",
    "DEFAULT_MAX_FRAME_BYTES",
    "HEADER_BYTES",
    "MAX_FRAME_LIMIT",
    "FrameDecoder",
    "ProtocolViolation",
    "RecordDecoder",
    "decoded_size_bound",
    "encode_frame",
    "encode_frame_parts",
    "encode_record",
    "frame_header",
    *_messages_all,
]
