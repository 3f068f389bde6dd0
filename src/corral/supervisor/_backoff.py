"""Restart intensity and exponential backoff per tenant (invariant 13).

A tenant may fail (crash, start failure, timeout kill, protocol violation) at
most ``intensity`` times within ``period`` seconds. One more failure opens
backoff: calls are refused with ``BackoffError`` for ``base * 2**n`` seconds
(capped at ``cap``), ``n`` counting consecutive backoffs. A tenant whose
worker then serves a call successfully is forgiven. Sync, clock injected.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping

__all__ = ["BackoffPolicy", "RestartTracker"]


class BackoffPolicy:
    def __init__(
        self, intensity: int = 5, period: float = 60.0, base: float = 1.0, cap: float = 60.0
    ) -> None:
        if intensity < 0:
            raise ValueError("restart_intensity must be >= 0")
        if period <= 0 or base <= 0 or cap < base:
            raise ValueError("restart_period and backoff times must be positive, cap >= base")
        self.intensity = intensity
        self.period = period
        self.base = base
        self.cap = cap


class _TenantRecord:
    __slots__ = ("failures", "last_error", "last_failure", "level", "until")

    def __init__(self) -> None:
        self.failures: deque[float] = deque()  # failure times inside the current period
        self.last_failure = 0.0
        self.level = 0
        self.until = 0.0
        self.last_error = ""


class RestartTracker:
    """Remembers recent failures of tenants that failed; forgets the rest."""

    def __init__(self, policy: BackoffPolicy, clock: Callable[[], float]) -> None:
        self._policy = policy
        self._clock = clock
        self._records: dict[str, _TenantRecord] = {}
        # Read-only view for the warm path: ``tenant in failing`` costs no method call.
        self.failing: Mapping[str, object] = self._records

    def __len__(self) -> int:
        return len(self._records)

    def record_failure(self, tenant: str, description: str) -> float | None:
        """Note a failure; return the backoff (seconds) it opens, if any."""
        now = self._clock()
        rec = self._records.setdefault(tenant, _TenantRecord())
        rec.last_error = description
        rec.last_failure = now
        rec.failures.append(now)
        while rec.failures and rec.failures[0] <= now - self._policy.period:
            rec.failures.popleft()
        if len(rec.failures) <= self._policy.intensity:
            return None
        delay = float(min(self._policy.cap, self._policy.base * 2.0**rec.level))
        rec.level += 1
        rec.until = now + delay
        rec.failures.clear()
        return delay

    def retry_after(self, tenant: str) -> tuple[float, int, str] | None:
        """(seconds left, backoff level, last error) while ``tenant`` is in backoff."""
        rec = self._records.get(tenant)
        if rec is None:
            return None
        left = rec.until - self._clock()
        if left <= 0:
            return None
        return left, rec.level, rec.last_error

    def in_backoff(self) -> int:
        """How many tenants are refused right now (O(tenants with failures))."""
        now = self._clock()
        return sum(1 for r in self._records.values() if r.until > now)

    def record_success(self, tenant: str) -> None:
        """A call succeeded: the tenant is healthy again."""
        if self._records:
            self._records.pop(tenant, None)

    def prune(self) -> None:
        """Forget tenants with no failure in the last period and no backoff running."""
        now = self._clock()
        stale = [
            t
            for t, r in self._records.items()
            if r.until <= now and r.last_failure <= now - self._policy.period
        ]
        for tenant in stale:
            del self._records[tenant]
