"""The bundled example kernel: a tiny per-tenant key/value notebook.

``corral.examples.demo:create`` is the factory ``corral demo`` uses. Each tenant
gets its own process and its own state; some methods misbehave on purpose so
that the demo can show what corral does about it.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any


class Notebook:
    """One tenant's kernel."""

    def __init__(self, tenant: str) -> None:
        self.tenant = tenant
        self.notes: dict[str, Any] = {}
        self.hoard: list[bytes] = []

    def put(self, key: str, value: Any) -> int:
        """Store a value; returns how many notes the tenant has."""
        self.notes[key] = value
        return len(self.notes)

    def get(self, key: str) -> Any:
        return self.notes[key]  # KeyError travels back as a KernelError

    def whoami(self) -> dict[str, Any]:
        return {"tenant": self.tenant, "pid": os.getpid(), "notes": len(self.notes)}

    async def slow_echo(self, value: Any, seconds: float) -> Any:
        await asyncio.sleep(seconds)
        return value

    def spin(self, seconds: float) -> float:
        """Busy-loop (a runaway request when ``seconds`` exceeds the call timeout)."""
        end = time.monotonic() + seconds
        n = 0.0
        while time.monotonic() < end:
            n += 1
        return n

    def crash(self, code: int = 3) -> None:
        """Die without a word, as native code or a bad plugin might."""
        os._exit(code)

    def grow(self, megabytes: int) -> int:
        """Keep ``megabytes`` more memory alive (a leak across calls)."""
        self.hoard.append(b"x" * (megabytes * 1024 * 1024))
        return sum(len(b) for b in self.hoard)

    def shutdown(self) -> None:
        print(f"notebook for {self.tenant} closing with {len(self.notes)} notes", flush=True)


def create(tenant: str) -> Notebook:
    return Notebook(tenant)
