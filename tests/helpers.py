"""Small helpers for tests that run real processes."""

from __future__ import annotations

import asyncio
import os

import psutil


def pid_gone(pid: int) -> bool:
    """True if ``pid`` no longer runs (a zombie counts as gone: it is not running code)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


async def wait_pid_gone(pid: int, timeout: float = 5.0) -> None:
    """Wait until ``pid`` exits, via a pidfd (works for processes that are not our children)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    loop = asyncio.get_running_loop()
    exited = loop.create_future()
    loop.add_reader(fd, lambda: exited.done() or exited.set_result(None))
    try:
        async with asyncio.timeout(timeout):
            await exited
    finally:
        loop.remove_reader(fd)
        os.close(fd)
