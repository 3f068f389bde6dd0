"""Every error corral raises, rooted at :class:`CorralError`.

The split that matters to a caller:

* :class:`KernelError` -- the tenant's kernel raised; the worker is still up.
* :class:`InvalidCallError` -- the call could not be made as asked (a tenant key
  that breaks the rule, a bad method name, arguments or a result that msgpack cannot
  carry); the worker is still up.
* :class:`WorkerError` subclasses -- the worker is gone or going:
  *Crashed* means it died on its own, *Stopped* means corral decided to stop it
  while the call was in flight, *Timeout* and *Protocol* mean corral killed it.
* :class:`SupervisorClosedError`, :class:`CapacityError`, :class:`BackoffError`
  -- the supervisor refused the call before any worker saw it.

Remote failures arrive as text (type name, message, traceback); nothing the
worker sends is ever unpickled or mapped back to a Python class.
"""

from __future__ import annotations

from corral._text import one_line

__all__ = [
    "BackoffError",
    "CallTimeoutError",
    "CapacityError",
    "CorralError",
    "InvalidCallError",
    "KernelError",
    "MemoryLimitError",
    "MemoryPressureError",
    "NodeLostError",
    "ProtocolError",
    "ResultTypeError",
    "StartError",
    "SupervisorClosedError",
    "WorkerCrashedError",
    "WorkerError",
    "WorkerStoppedError",
]


class CorralError(Exception):
    """Root of every error corral raises."""


class InvariantError(CorralError):
    """A bug in corral: an impossible state transition or bookkeeping mismatch."""


class SupervisorClosedError(CorralError):
    """The supervisor is closing or closed; no new calls or workers."""


class CapacityError(CorralError):
    """``max_workers`` are all busy and none became free within ``pool_timeout``."""


class InvalidCallError(CorralError, ValueError):
    """The call cannot be made as asked: an invalid tenant key, an unknown or private
    method, or arguments or a result that msgpack cannot carry. The worker (if any) is
    still up.

    ``kind`` says which: ``"method"`` (no such public method), ``"arguments"`` (they
    cannot be sent or decoded, or are too large), ``"result"`` (it cannot be sent) or
    ``"tenant"`` (the tenant key breaks the rule: ``corral.TENANT_RULE``; nothing was
    started or sent).
    """

    def __init__(self, message: str, kind: str = "arguments") -> None:
        super().__init__(message)
        self.kind = kind


class BackoffError(CorralError):
    """The tenant's kernel failed too often recently; calls are refused until
    ``retry_after`` seconds have passed."""

    def __init__(self, tenant: str, retry_after: float, level: int, last_error: str) -> None:
        self.tenant = tenant
        self.retry_after = retry_after
        self.level = level  # consecutive backoffs: the delay doubles with each
        self.last_error = last_error
        super().__init__(
            f"tenant {tenant!r} is in backoff after repeated failures (last: {last_error}); "
            f"retry after {retry_after:.1f}s"
        )


class WorkerError(CorralError):
    """Something happened to a tenant's worker process."""

    def __init__(self, message: str, *, tenant: str, pid: int | None) -> None:
        self.tenant = tenant
        self.pid = pid
        super().__init__(message)


class StartError(WorkerError):
    """The worker never became ready: the launcher failed, the factory raised,
    or it did not say hello within ``start_timeout``.

    ``remote_type`` and ``remote_traceback`` are set when the factory raised.
    """

    def __init__(
        self,
        message: str,
        *,
        tenant: str,
        pid: int | None,
        remote_type: str | None = None,
        remote_traceback: str | None = None,
    ) -> None:
        self.remote_type = remote_type
        self.remote_traceback = remote_traceback
        super().__init__(message, tenant=tenant, pid=pid)


class WorkerCrashedError(WorkerError):
    """The worker died on its own while the call was in flight (or closed its pipe).

    ``exitcode`` is set for a normal exit, ``signal`` for death by signal.
    """

    def __init__(
        self,
        message: str,
        *,
        tenant: str,
        pid: int | None,
        exitcode: int | None,
        signal: int | None,
    ) -> None:
        self.exitcode = exitcode
        self.signal = signal
        super().__init__(message, tenant=tenant, pid=pid)


class NodeLostError(WorkerCrashedError):
    """The cluster node that ran the tenant's worker (or corral's agent on it) was lost
    while the call was in flight (``ClusterSupervisor`` only).

    The call may or may not have run on that node, and it is not retried: a
    non-idempotent method must not run twice. The tenant's next call activates it on
    another node. ``node`` is the Ray node id, ``node_address`` its IP address (None if
    unknown); ``exitcode`` and ``signal`` are None (the exit was not seen).
    """

    def __init__(
        self, message: str, *, tenant: str, node: str, node_address: str | None = None
    ) -> None:
        self.node = node
        self.node_address = node_address
        super().__init__(message, tenant=tenant, pid=None, exitcode=None, signal=None)


class WorkerStoppedError(WorkerError):
    """Corral stopped the worker while the call was in flight (``reason`` says why:
    another call's timeout, a protocol violation, supervisor shutdown, ...)."""

    def __init__(self, message: str, *, tenant: str, pid: int | None, reason: str) -> None:
        self.reason = reason
        super().__init__(message, tenant=tenant, pid=pid)


class MemoryLimitError(WorkerError):
    """The worker hit its memory limit during the call: the OS stopped it at
    ``worker_memory_hard_limit`` (killed in its cgroup, or ``MemoryError`` under an
    rlimit). The worker is gone or being replaced. ``limit`` is in bytes."""

    def __init__(self, message: str, *, tenant: str, pid: int | None, limit: int | None) -> None:
        self.limit = limit
        super().__init__(message, tenant=tenant, pid=pid)


class MemoryPressureError(CorralError):
    """The host (or corral's workers together) are short of memory: no new worker is
    started until memory is back above the threshold. Try again later."""

    def __init__(self, message: str, *, reason: str, retry_after: float) -> None:
        self.reason = reason  # "host_pressure" or "total_memory"
        self.retry_after = retry_after
        super().__init__(message)


class CallTimeoutError(WorkerError, TimeoutError):
    """The call ran past its timeout; its worker was killed (the worker cannot be
    trusted to stop itself)."""


class ProtocolError(WorkerError):
    """The worker sent something malformed, unexpected or over the frame limit;
    it was killed."""


class ResultTypeError(CorralError):
    """The kernel's reply does not match the ``result_type`` the caller asked for. The
    worker is still up and keeps serving (its output is untrusted data that failed a
    check, not a broken worker).

    Attributes:
        tenant, pid, method: whose reply it was.
        result_type: the type asked for.
        detail: what did not match, in msgspec's words, e.g. ``"Expected `int`, got
            `str` - at `$.count`"`` (one line, bounded).
    """

    def __init__(
        self, *, tenant: str, pid: int | None, method: str, result_type: object, detail: str
    ) -> None:
        self.tenant = tenant
        self.pid = pid
        self.method = method
        self.result_type = result_type
        self.detail = one_line(detail, 500)
        super().__init__(
            f"{tenant!r}.{method}: the reply is not a {_type_name(result_type)}: {self.detail}"
        )


def _type_name(tp: object) -> str:
    name = getattr(tp, "__qualname__", None)
    return name if isinstance(name, str) and "[" not in repr(tp) else repr(tp)


class KernelError(CorralError):
    """The kernel raised. The worker is still up and keeps serving.

    ``str()`` of it is one line (the kernel's text escaped, see ``corral._text``);
    the attributes hold the kernel's text as it was.

    Attributes:
        remote_type: qualified name of the remote exception type, e.g. ``"builtins.KeyError"``.
        remote_message: ``str()`` of the remote exception (bounded).
        remote_traceback: the formatted remote traceback (bounded).
    """

    def __init__(
        self,
        *,
        tenant: str,
        pid: int | None,
        method: str,
        remote_type: str,
        remote_message: str,
        remote_traceback: str,
    ) -> None:
        self.tenant = tenant
        self.pid = pid
        self.method = method
        self.remote_type = remote_type
        self.remote_message = remote_message
        self.remote_traceback = remote_traceback
        # The message is one line whatever the kernel raised (a host logs it as it is);
        # the remote_* attributes keep the kernel's own text.
        super().__init__(
            f"{one_line(remote_type, 200)}: {one_line(remote_message, 2000)} "
            f"(in {tenant!r}.{method})"
        )
