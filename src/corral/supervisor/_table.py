"""The tenant table: which tenants have a worker, in LRU order, and which of
them are idle, in idle-since order. Sync, pure, O(1) per operation.

Two ordered dicts do the work:

* ``_entries``: every tenant with a live handle, least recently used first
  (touched when a call starts and when a reply completes one, both at that moment,
  so the order is exact whenever a caller looks);
* ``_idle``: tenants whose worker is READY with nothing in flight, ordered by
  when they became idle. Its head is the LRU victim; a TTL sweep pops from its
  head while entries are expired, so it never scans the table.

Decisions come back as lists of tenants to stop; the caller stops them (the
table never awaits). The clock is injected so that tests can drive TTL.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

import msgspec

__all__ = ["TableStatistics", "WorkerTable"]

H = TypeVar("H")


class TableStatistics(msgspec.Struct, frozen=True):
    entries: int
    idle: int
    max_workers: int


class WorkerTable(Generic[H]):
    """Owns the tenant -> handle map and its LRU and idle orders.

    Args:
        max_workers: how many entries may exist at once (>= 1).
        idle_ttl: seconds of idleness before an entry expires; None = never.
        clock: monotonic seconds.
    """

    def __init__(
        self, max_workers: int, idle_ttl: float | None, clock: Callable[[], float]
    ) -> None:
        self.max_workers = max_workers
        self.idle_ttl = idle_ttl
        self._clock = clock
        self._entries: OrderedDict[str, H] = OrderedDict()
        self._idle: OrderedDict[str, float] = OrderedDict()  # tenant -> idle since (monotonic)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, tenant: object) -> bool:
        return tenant in self._entries

    def keys(self) -> list[str]:
        """Tenants, least recently used first."""
        return list(self._entries)

    def handles(self) -> list[H]:
        return list(self._entries.values())

    def peek(self, tenant: str) -> H | None:
        """The handle for ``tenant`` without touching its LRU position."""
        return self._entries.get(tenant)

    def get(self, tenant: str) -> H | None:
        """The handle for ``tenant``, marked most recently used."""
        handle = self._entries.get(tenant)
        if handle is not None:
            self._entries.move_to_end(tenant)
        return handle

    def touch(self, tenant: str) -> None:
        """Mark ``tenant`` most recently used (a call to it completed); no-op if absent."""
        try:
            self._entries.move_to_end(tenant)
        except KeyError:
            pass

    def has_room(self) -> bool:
        return len(self._entries) < self.max_workers

    def add(self, tenant: str, handle: H) -> None:
        """Insert a new entry as most recently used (not idle: it is starting)."""
        if tenant in self._entries:
            raise KeyError(f"tenant {tenant!r} already has an entry")
        if not self.has_room():
            raise OverflowError("table is full")
        self._entries[tenant] = handle

    def replace(self, tenant: str, handle: H) -> None:
        """Put ``handle`` in ``tenant``'s entry, keeping its LRU position (a reload);
        not idle until marked so."""
        if tenant not in self._entries:
            raise KeyError(f"tenant {tenant!r} has no entry")
        self._entries[tenant] = handle
        self._idle.pop(tenant, None)

    def remove(self, tenant: str) -> H | None:
        """Drop the entry (once its process is gone)."""
        self._idle.pop(tenant, None)
        return self._entries.pop(tenant, None)

    def mark_idle(self, tenant: str, handle: H | None = None) -> float | None:
        """The worker is READY with nothing in flight, from now (only if ``tenant``'s entry
        is ``handle``, when given). Returns when it expires if it is now the only idle
        entry (so the next to expire), else None.

        Does not touch the LRU order: the supervisor marks a worker idle one loop
        iteration after its last reply (see invariant 12 in ARCHITECTURE.md), by which
        time its caller may have used another tenant; the reply itself touched it."""
        entry = self._entries.get(tenant)
        if entry is None or (handle is not None and entry is not handle):
            return None
        now = self._idle[tenant] = self._clock()
        self._idle.move_to_end(tenant)
        if self.idle_ttl is not None and len(self._idle) == 1:
            return now + self.idle_ttl
        return None

    def mark_busy(self, tenant: str, handle: H | None = None) -> None:
        """The worker has a call in flight, or is stopping: not a victim, not expiring
        (only if ``tenant``'s entry is ``handle``, when given)."""
        if handle is None or self._entries.get(tenant) is handle:
            self._idle.pop(tenant, None)

    def idle_count(self) -> int:
        return len(self._idle)

    def is_idle(self, tenant: str) -> bool:
        return tenant in self._idle

    def lru_victim(self) -> str | None:
        """The idle tenant that has been idle longest (the one LRU would stop), if any.
        The caller marks it busy (stopping) when it acts on it."""
        return next(iter(self._idle), None)

    def expired(self) -> list[str]:
        """Idle tenants whose idle TTL has run out, oldest first."""
        if self.idle_ttl is None:
            return []
        cutoff = self._clock() - self.idle_ttl
        out: list[str] = []
        for tenant, since in self._idle.items():
            if since > cutoff:
                break
            out.append(tenant)
        return out

    def next_expiry(self) -> float | None:
        """Monotonic time at which the oldest idle entry expires, or None."""
        if self.idle_ttl is None or not self._idle:
            return None
        return next(iter(self._idle.values())) + self.idle_ttl

    def statistics(self) -> TableStatistics:
        return TableStatistics(
            entries=len(self._entries), idle=len(self._idle), max_workers=self.max_workers
        )
