"""The work every contender in ``compare.py`` does, so that they all do the same.

* ``make(tenant)`` is a corral factory (``"_kernel:make"``): its kernel echoes byte
  payloads and stores notes, all in plain methods; ``make_async`` adds one ``async def``
  method, which puts corral's worker on asyncio. corral workers import this module by
  name; ``compare.py`` puts its own directory on ``sys.path``, and corral hands the
  host's ``sys.path`` to its workers.
* ``put``, ``echo`` and ``getpid`` are the same operations as plain functions, for the
  process pools (ProcessPoolExecutor, loky, pebble), which pickle a function by
  reference and call it in any of their workers.

``put`` (store a value, return how many there are) is what the warm-call scenarios call,
on every contender.
"""

from __future__ import annotations

import os
from typing import Any

# A pool worker has no per-tenant object to keep state in: the module is its state.
_NOTES: dict[str, Any] = {}


class Echo:
    """One tenant's kernel for the payload scenario."""

    def __init__(self, tenant: str) -> None:
        self.tenant = tenant
        self.notes: dict[str, Any] = {}

    def echo(self, data: bytes) -> bytes:
        return data

    def put(self, key: str, value: Any) -> int:
        self.notes[key] = value
        return len(self.notes)

    def getpid(self) -> int:
        return os.getpid()


class AsyncEcho(Echo):
    """The same kernel with one ``async def`` method: corral serves it on asyncio (sync
    methods included) rather than with its blocking loop."""

    async def pause(self) -> None:
        return None


def make(tenant: str) -> Echo:
    return Echo(tenant)


def make_async(tenant: str) -> Echo:
    return AsyncEcho(tenant)


def put(key: str, value: Any) -> int:
    _NOTES[key] = value
    return len(_NOTES)


def echo(data: bytes) -> bytes:
    return data


def getpid() -> int:
    return os.getpid()
