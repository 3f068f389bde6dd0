"""A kernel module that says Hello itself when imported, before corral's worker does:
a forged frame on the worker's reply pipe (fd 4), as hostile code imported by a factory
could write. Used to show that a spare's extra Hello kills that spare only."""

from __future__ import annotations

import os

from corral.ipc import PROTOCOL_VERSION, Hello, encode_frame
from tests.kernels import Kernel

os.write(4, bytes(encode_frame(Hello(PROTOCOL_VERSION, os.getpid(), None))))


def make(tenant: str) -> Kernel:
    return Kernel(tenant)
