"""Checking a Supervisor's options before anything starts.

Covers: the checks :class:`~corral.supervisor.options.SupervisorOptions` runs on its
values (numbers of seconds and counts, memory sizes, the workers' extra environment
variables), the factory (an import string checked for shape, or a callable serialised
with dill here, so that an unpicklable factory fails at construction, not at the first
call), and the workers' environment (allowlist plus extras). Not here: the options
themselves and their help texts (:mod:`corral.supervisor.options`), what they do
(:mod:`corral.supervisor.supervisor`), tenant keys (:mod:`corral.supervisor.tenants`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from typing import Any

__all__ = [
    "DEFAULT_ENV_ALLOWLIST",
    "Factory",
    "check_count",
    "check_env",
    "check_memory",
    "check_number",
    "check_seconds",
    "serialise_factory",
    "worker_environment",
]

DEFAULT_ENV_ALLOWLIST = ("PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ")
"""Host environment variables a worker sees by default (everything else is dropped at exec)."""

Factory = str | Callable[[str], Any]

_FACTORY_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


def check_count(name: str, value: object, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def check_number(name: str, value: object) -> None:
    """A number of seconds: an int or a float, never a bool or NaN (any range)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
        raise ValueError(f"{name} must be a number of seconds, got {value!r}")


def check_seconds(
    name: str, value: float | None, *, allow_none: bool = False, allow_zero: bool = False
) -> None:
    if value is None:
        if allow_none:
            return
        raise ValueError(f"{name} must be a number of seconds, got None")
    check_number(name, value)
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")


def serialise_factory(factory: Factory) -> tuple[str | None, bytes | None]:
    if isinstance(factory, str):
        if not _FACTORY_RE.match(factory):
            raise ValueError(f"factory must look like 'package.module:callable', got {factory!r}")
        return factory, None
    if not callable(factory):
        raise TypeError(
            f"factory must be an import string or a callable, got {type(factory).__name__}"
        )
    import dill  # trusted direction only: supervisor -> worker

    try:
        return None, bytes(dill.dumps(factory, recurse=True))
    except Exception as exc:
        raise TypeError(
            f"factory {factory!r} cannot be carried to the worker by dill: {exc}"
        ) from exc


def check_memory(soft: object, hard: object, min_available: object, max_total: object) -> None:
    """Memory options: byte counts >= 1 MiB, ``min_available`` also a fraction in (0, 1),
    and a soft limit below the hard one (else it could never act first)."""
    for name, value in (
        ("worker_memory_limit", soft),
        ("worker_memory_hard_limit", hard),
        ("max_total_memory", max_total),
    ):
        if value is not None:
            check_count(name, value, minimum=2**20)
    if min_available is not None:
        fraction = isinstance(min_available, float) and 0 < min_available < 1
        if not fraction:
            check_count(
                "min_available_memory (bytes, or a fraction 0 < x < 1)",
                min_available,
                minimum=2**20,
            )
    if isinstance(soft, int) and isinstance(hard, int) and soft >= hard:
        raise ValueError(
            f"worker_memory_limit ({soft}) must be below worker_memory_hard_limit ({hard}): "
            "the soft limit recycles a worker before the OS has to stop it"
        )


def worker_environment(
    allowlist: tuple[str, ...], extra: Mapping[str, str] | None
) -> dict[str, str]:
    """The complete environment of the warden and every worker: the allowlisted host
    variables plus ``extra``. Raises ValueError for a name or value exec would refuse."""
    env = {k: os.environ[k] for k in allowlist if k in os.environ}
    env.update(extra or {})
    check_env(env)
    return env


def check_env(env: Mapping[str, str]) -> None:
    """Raises ValueError for a name or value exec would refuse (not a str, an empty
    name, ``=`` in a name, a NUL anywhere)."""
    for key, setting in env.items():
        if not isinstance(key, str) or not isinstance(setting, str):
            raise ValueError(f"env: names and values must be str, got {key!r}={setting!r}")
        if not key or "=" in key or "\0" in key or "\0" in setting:
            raise ValueError(f"env: {key!r} is not a valid environment variable")
