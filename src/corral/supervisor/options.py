"""A Supervisor's options as data: :class:`SupervisorOptions`.

Covers every option of :class:`~corral.Supervisor` whose value can be written down
(numbers, sizes, durations, names, the sandbox, the environment): its name, type,
default and help text, each declared once, on its field, and the checks the values
must pass, run whenever an instance is made (constructor, :meth:`SupervisorOptions.with_`,
decoding). ``corral serve`` derives its flags, ``CORRAL_*`` variables and TOML keys from
these fields (:mod:`corral.server._options`); :class:`~corral.ClusterSupervisor` checks
its nodes' options with them.

Not here: options that take code (``factory``, ``on_event``, ``launcher``, ``probe``,
``clock``), which stay arguments of the Supervisor; the check helpers themselves
(:mod:`corral.supervisor._config`); what each option does at run time
(:mod:`corral.supervisor.supervisor`).
"""

from __future__ import annotations

import typing
from collections.abc import Mapping
from types import MappingProxyType
from typing import Annotated, Any, Literal

import msgspec

from corral.ipc import DEFAULT_MAX_FRAME_BYTES
from corral.supervisor._backoff import BackoffPolicy
from corral.supervisor._config import (
    DEFAULT_ENV_ALLOWLIST,
    check_count,
    check_env,
    check_memory,
    check_number,
    check_seconds,
)
from corral.supervisor.sandbox import Sandbox

__all__ = ["SupervisorOptions"]

_MAX_FRAME_LIMIT = 2**32 - 1  # the frame header's length field is 32 bits


def _help(text: str) -> msgspec.Meta:
    """A field's help text: one plain-text paragraph (flags and ``--help`` show it as is)."""
    return msgspec.Meta(description=text)


class SupervisorOptions(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Every data option of a :class:`~corral.Supervisor`, checked when it is made.

    ``SupervisorOptions()`` holds the defaults. Each field's help text is
    :meth:`help`'s answer (``SupervisorOptions.help("idle_ttl")``).

    Raises:
        ValueError: a value out of range or of the wrong kind (the message names the
            option and the value), e.g. ``"max_workers must be an int >= 1, got 0"``.
        TypeError: an unknown option name, or ``env``, ``env_allowlist`` or ``sandbox``
            not of its type.

    Example::

        options = SupervisorOptions(max_workers=8, idle_ttl=60.0)
        tighter = options.with_(call_timeout=5.0)  # checked again
    """

    max_workers: Annotated[
        int, _help("live worker processes never exceed this (stopping ones count).")
    ] = 32
    idle_ttl: Annotated[
        float | None,
        _help(
            "seconds without a call in flight before a worker is stopped, timed from the "
            "last completion; None = never."
        ),
    ] = 900.0
    call_timeout: Annotated[
        float | None,
        _help(
            "default seconds a call may run; a call still running then kills its worker. "
            "None = no limit."
        ),
    ] = 30.0
    start_method: Annotated[
        Literal["forkserver", "spawn"],
        _help(
            '"forkserver" (fork of corral\'s own clean, preloaded warden process) or '
            '"spawn" (a fresh interpreter per worker).'
        ),
    ] = "forkserver"
    start_timeout: Annotated[float, _help("seconds from spawn until the kernel is loaded.")] = 30.0
    shutdown_timeout: Annotated[
        float, _help("seconds a worker gets to run shutdown() and exit.")
    ] = 5.0
    term_timeout: Annotated[float, _help("seconds after SIGTERM before SIGKILL.")] = 2.0
    kill_timeout: Annotated[
        float, _help("seconds after SIGKILL before corral logs an error (it keeps waiting).")
    ] = 5.0
    drain_timeout: Annotated[
        float | None,
        _help(
            "seconds an evicted busy worker may finish its calls; None = the calls' own "
            "timeouts bound it."
        ),
    ] = 30.0
    pool_timeout: Annotated[
        float,
        _help(
            "seconds a call for a new tenant may wait for a free slot when every worker is "
            "busy; then CapacityError."
        ),
    ] = 30.0
    spare_workers: Annotated[
        int,
        _help(
            "workers kept started and sandboxed but bound to no tenant yet: a new tenant's "
            "first call takes one and only loads its kernel. Counted against max_workers "
            "and memory, refilled in the background, each used once. 0 = none."
        ),
    ] = 0
    max_frame_bytes: Annotated[
        int,
        _help(
            "largest message either way (arguments, results). A result may also decode "
            "into at most DECODE_BUDGET_FACTOR (8) times this of Python objects, as "
            "estimated before it is decoded (a one-byte empty list becomes 64 bytes); a "
            "reply beyond is a protocol violation (ProtocolError, worker killed). Dense "
            "results (bytes, str, floats) fit whatever their size; a result of many tiny "
            "items near the cap may need a larger cap."
        ),
    ] = DEFAULT_MAX_FRAME_BYTES
    restart_intensity: Annotated[
        int,
        _help(
            "failures allowed per tenant per restart_period before calls are refused with "
            "BackoffError."
        ),
    ] = 5
    restart_period: Annotated[
        float,
        _help(
            "seconds in which a tenant may fail restart_intensity times before calls are "
            "refused with BackoffError."
        ),
    ] = 60.0
    backoff_base: Annotated[
        float, _help("first backoff, seconds (doubling with each backoff in a row).")
    ] = 1.0
    backoff_max: Annotated[float, _help("largest backoff, seconds.")] = 60.0
    env: Annotated[
        Mapping[str, str] | None,
        _help("extra environment variables for workers (on top of env_allowlist)."),
    ] = None
    env_allowlist: Annotated[
        tuple[str, ...], _help("names copied from the host's environment into the workers'.")
    ] = DEFAULT_ENV_ALLOWLIST
    worker_memory_limit: Annotated[
        int | None,
        _help(
            "bytes (soft): a worker whose process tree's RSS is above this at a sample is "
            "replaced once its calls in flight finish."
        ),
    ] = None
    worker_memory_hard_limit: Annotated[
        int | None,
        _help(
            "bytes (hard): enforced by the OS, so that a worker can never exceed it, not "
            "even between samples: a memory cgroup of its own where corral can make one "
            "(root), else RLIMIT_DATA (see memory_method)."
        ),
    ] = None
    min_available_memory: Annotated[
        float | None,
        _help(
            "bytes, or a fraction of total RAM (0 < x < 1): while the host has less "
            "available, idle workers are stopped one at a time (least recently used "
            "first) and no new worker starts (MemoryPressureError)."
        ),
    ] = None
    max_total_memory: Annotated[
        int | None,
        _help(
            "bytes for all workers' trees together; above it, the same response as below "
            "min_available_memory."
        ),
    ] = None
    memory_method: Annotated[
        Literal["auto", "cgroup", "rlimit"],
        _help(
            'how the hard limit is enforced: "auto" (cgroup if possible, else rlimit, with '
            'a warning), "cgroup" (refuse to start without one) or "rlimit".'
        ),
    ] = "auto"
    memory_check_interval: Annotated[float, _help("seconds between memory samples.")] = 1.0
    sandbox: Annotated[
        Sandbox | None,
        _help(
            "isolation for the kernels (default Sandbox.default(): every layer that needs no "
            "privileges, where the host has it); see Sandbox."
        ),
    ] = None

    def __post_init__(self) -> None:
        check_count("max_workers", self.max_workers, minimum=1)
        check_count("spare_workers", self.spare_workers, minimum=0)
        if self.spare_workers > self.max_workers:
            raise ValueError(
                f"spare_workers ({self.spare_workers}) must be at most max_workers "
                f"({self.max_workers})"
            )
        check_memory(
            self.worker_memory_limit,
            self.worker_memory_hard_limit,
            self.min_available_memory,
            self.max_total_memory,
        )
        if self.memory_method not in ("auto", "cgroup", "rlimit"):
            raise ValueError(
                f"memory_method must be 'auto', 'cgroup' or 'rlimit', got {self.memory_method!r}"
            )
        check_seconds("idle_ttl", self.idle_ttl, allow_none=True, allow_zero=True)
        check_seconds("call_timeout", self.call_timeout, allow_none=True)
        check_seconds("drain_timeout", self.drain_timeout, allow_none=True, allow_zero=True)
        for name, value in (
            ("start_timeout", self.start_timeout),
            ("shutdown_timeout", self.shutdown_timeout),
            ("term_timeout", self.term_timeout),
            ("kill_timeout", self.kill_timeout),
            ("memory_check_interval", self.memory_check_interval),
        ):
            check_seconds(name, value)
        check_seconds("pool_timeout", self.pool_timeout, allow_zero=True)
        if self.start_method not in ("forkserver", "spawn"):
            raise ValueError(
                f"start_method must be 'forkserver' or 'spawn', got {self.start_method!r} "
                "(workers are never forked from the host)"
            )
        frame = self.max_frame_bytes
        if (
            isinstance(frame, bool)
            or not isinstance(frame, int)
            or not 1024 <= frame <= _MAX_FRAME_LIMIT
        ):
            raise ValueError(f"max_frame_bytes must be in 1024..{_MAX_FRAME_LIMIT}, got {frame!r}")
        self._check_backoff()
        self._check_environment()
        if self.sandbox is not None:
            if not isinstance(self.sandbox, Sandbox):
                raise TypeError(
                    f"sandbox must be a Sandbox or None, got {type(self.sandbox).__name__}"
                )
            self.sandbox.validate()

    def _check_backoff(self) -> None:
        """Types here; the ranges (and their messages) are the restart policy's own."""
        intensity = self.restart_intensity
        if isinstance(intensity, bool) or not isinstance(intensity, int):
            raise ValueError(f"restart_intensity must be an int >= 0, got {intensity!r}")
        check_number("restart_period", self.restart_period)
        check_number("backoff_base", self.backoff_base)
        check_number("backoff_max", self.backoff_max)
        BackoffPolicy(intensity, self.restart_period, self.backoff_base, self.backoff_max)

    def _check_environment(self) -> None:
        allowlist = self.env_allowlist
        if not isinstance(allowlist, tuple) or not all(isinstance(n, str) for n in allowlist):
            raise TypeError(f"env_allowlist must be a tuple of variable names, got {allowlist!r}")
        if self.env is not None:
            if not isinstance(self.env, Mapping):
                raise TypeError(
                    f"env must be a mapping of names to values, got {type(self.env).__name__}"
                )
            check_env(self.env)

    def with_(self, **changes: Any) -> SupervisorOptions:
        """These options with ``changes``, checked as a new instance is (whatever the
        msgspec version: ``msgspec.structs.replace`` runs the checks only in recent ones).

        Raises:
            ValueError: a changed value is out of range (see the class).
            TypeError: an unknown option name, naming it.
        """
        return SupervisorOptions(**{**msgspec.structs.asdict(self), **changes})

    @classmethod
    def help(cls, name: str) -> str:
        """The help text of option ``name``: one plain-text paragraph.

        Raises:
            KeyError: no option has that name.
        """
        try:
            return _HELP[name]
        except KeyError:
            raise KeyError(f"SupervisorOptions has no option {name!r}") from None


def _help_texts() -> Mapping[str, str]:
    """Each field's help text, read from its ``Annotated`` metadata (once, at import)."""
    hints = typing.get_type_hints(SupervisorOptions, include_extras=True)
    out: dict[str, str] = {}
    for field in msgspec.structs.fields(SupervisorOptions):
        texts = [
            meta.description
            for meta in typing.get_args(hints[field.name])[1:]
            if isinstance(meta, msgspec.Meta) and meta.description
        ]
        if not texts:
            raise TypeError(f"SupervisorOptions.{field.name} has no help text")
        out[field.name] = texts[0]
    return MappingProxyType(out)


_HELP = _help_texts()
