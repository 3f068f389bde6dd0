"""Small helpers for tests that run real processes."""

from __future__ import annotations

import psutil


def pid_gone(pid: int) -> bool:
    """True if ``pid`` no longer runs (a zombie counts as gone: it is not running code)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True
