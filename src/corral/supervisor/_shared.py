"""What the local :class:`~corral.Supervisor` and the cluster front end
(:mod:`corral.cluster._front`) share, so that both refuse and deliver the same way:
the method-name rule of a call, and one reader's bounded buffer for ``events()``.

Not here: the tenant key rule (:mod:`corral.supervisor.tenants`), argument encoding
(each front end sends its own frame; the local one keeps it inline on the warm path).
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator
from typing import Generic, TypeVar

from corral.errors import InvalidCallError

__all__ = ["Subscription", "check_method", "read_events"]

E = TypeVar("E")

_METHOD_NAMES_KEPT = 4096  # names remembered as checked; beyond, each is checked again


def check_method(method: object, checked: set[str]) -> None:
    """Refuse a method name that is not a public identifier; remember a good one in
    ``checked`` (a caller tests ``method in checked`` first, so a known name costs a set
    lookup only).

    Raises:
        InvalidCallError: with ``kind == "method"``.
    """
    if not isinstance(method, str) or not method.isidentifier() or method.startswith("_"):
        raise InvalidCallError(f"method must be a public identifier, got {method!r}", kind="method")
    if len(checked) < _METHOD_NAMES_KEPT:
        checked.add(method)


class Subscription(Generic[E]):
    """One reader of ``events()``: a bounded buffer that drops the oldest."""

    def __init__(self, buffer: int) -> None:
        self.events: collections.deque[E] = collections.deque(maxlen=buffer)
        self.closed = False
        self.wakeup = asyncio.Event()

    def put(self, event: E) -> None:
        self.events.append(event)  # full: the oldest goes
        self.wakeup.set()

    def close(self) -> None:
        self.closed = True
        self.wakeup.set()


async def read_events(subscriptions: list[Subscription[E]], buffer: int) -> AsyncIterator[E]:
    """Subscribe (into ``subscriptions``, which the owner feeds and closes), yield each
    event as it comes until the subscription is closed, then unsubscribe.

    Raises:
        ValueError: ``buffer`` < 1.
    """
    if buffer < 1:
        raise ValueError(f"buffer must be >= 1, got {buffer!r}")
    subscription: Subscription[E] = Subscription(buffer)
    subscriptions.append(subscription)
    try:
        while True:
            while subscription.events:
                yield subscription.events.popleft()
            if subscription.closed:
                return
            subscription.wakeup.clear()
            await subscription.wakeup.wait()
    finally:
        subscriptions.remove(subscription)
