"""Per-tenant policy: :class:`TenantPolicy`, what one tenant's workers get that differs
from the supervisor's options.

``Supervisor(..., policy=fn)`` calls ``fn(tenant)`` (sync, on the event loop) each time
a worker is activated for a tenant (its first call, after an eviction, on
:meth:`~corral.Supervisor.reload`), and that worker keeps what it returned for its
whole life. A field left unset falls back to the supervisor's option of that name.
Not here: where each setting takes effect (:mod:`corral.supervisor._pool` builds the
worker's settings, :mod:`corral.supervisor._handle` and the launcher apply them).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec

from corral.supervisor._config import (
    Factory,
    check_memory,
    check_seconds,
    serialise_factory,
)
from corral.supervisor.sandbox import Sandbox

__all__ = ["Policy", "TenantPolicy"]

_UNSET = msgspec.UNSET


class TenantPolicy(msgspec.Struct, frozen=True, kw_only=True):
    """What one tenant's workers get; every field optional (unset: the supervisor's).

    Attributes:
        factory: the kernel factory for this tenant (an import string or a callable,
            as the Supervisor's ``factory``); e.g. one per plugin package, or a
            ``functools.partial`` carrying this tenant's arguments.
        call_timeout: seconds a call may run (None: no limit).
        worker_memory_limit: bytes, soft (None: none).
        worker_memory_hard_limit: bytes, hard, enforced by the OS (None: none).
        sandbox: the sandbox for this tenant's workers (e.g. ``Sandbox.strict()`` for
            the untrusted ones). Resolved against the layers the warden checked for the
            supervisor's own sandbox: give the supervisor the strongest preset any tenant
            asks for (a layer it never checked is "unknown" and fails the start, unless
            best effort).
        extra_read_paths: more paths this tenant's workers may read (under Landlock),
            on top of the sandbox's: e.g. this tenant's plugin directory, and no one
            else's.
        version: a label for the code this tenant runs (``stats()`` shows it per
            worker); change it and :meth:`~corral.Supervisor.reload` to roll out.

    Raises:
        ValueError: a value out of range, as the Supervisor's options are checked.
        TypeError: a factory that is neither an import string nor a callable dill can
            carry, or a field of the wrong type.
    """

    factory: Factory | None = None
    call_timeout: float | msgspec.UnsetType | None = _UNSET
    worker_memory_limit: int | msgspec.UnsetType | None = _UNSET
    worker_memory_hard_limit: int | msgspec.UnsetType | None = _UNSET
    sandbox: Sandbox | None = None
    extra_read_paths: tuple[str, ...] = ()
    version: str = ""

    def __post_init__(self) -> None:
        if self.factory is not None:
            serialise_factory(self.factory)  # refused here, not in the worker
        if self.call_timeout is not _UNSET:
            check_seconds("call_timeout", self.call_timeout, allow_none=True)
        soft = None if self.worker_memory_limit is _UNSET else self.worker_memory_limit
        hard = None if self.worker_memory_hard_limit is _UNSET else self.worker_memory_hard_limit
        check_memory(soft, hard, None, None)
        if self.sandbox is not None:
            if not isinstance(self.sandbox, Sandbox):
                raise TypeError(f"sandbox must be a Sandbox, got {type(self.sandbox).__name__}")
            self.sandbox.validate()
        if not isinstance(self.extra_read_paths, tuple) or not all(
            isinstance(p, str) and p.startswith("/") for p in self.extra_read_paths
        ):
            raise ValueError(
                f"extra_read_paths must be a tuple of absolute paths, got {self.extra_read_paths!r}"
            )
        if not isinstance(self.version, str) or len(self.version) > 128:
            raise ValueError(
                f"version must be a str of at most 128 characters, got {self.version!r}"
            )

    @property
    def is_default(self) -> bool:
        """Nothing set but, perhaps, ``version``: a spare worker (which loaded the
        supervisor's factory in the supervisor's sandbox) may serve this tenant."""
        return (
            self.factory is None
            and self.sandbox is None
            and not self.extra_read_paths
            and self.worker_memory_hard_limit is _UNSET
        )


Policy = Callable[[str], TenantPolicy]
"""``policy(tenant) -> TenantPolicy``: sync, called once per activation."""


def pick(value: Any, fallback: Any) -> Any:
    """A policy's value, or the supervisor's where the policy leaves it unset."""
    return fallback if value is _UNSET else value
