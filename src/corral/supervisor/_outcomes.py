"""What a worker's end means, in words and as errors: pure functions, no I/O.

Covers: how a process ended in words (:func:`describe_exit`), the status line of a
stop (:func:`exit_status`), and which error a call still in flight gets when its
worker is gone (:func:`call_error`), or a caller waiting for it to start
(:func:`start_error`). The record these read (reason, rung, return code, why) is
:class:`corral.supervisor._lifecycle.Ending`; who acts on them is the handle
(:mod:`corral.supervisor._handle`).
"""

from __future__ import annotations

import signal

from corral.errors import (
    MemoryLimitError,
    ProtocolError,
    StartError,
    WorkerCrashedError,
    WorkerError,
    WorkerStoppedError,
)
from corral.supervisor.records import StopReason, StopReport

__all__ = [
    "FAILURES",
    "call_error",
    "describe_exit",
    "exit_status",
    "mib",
    "signal_name",
    "start_error",
]

# Stops that count towards a tenant's restart intensity (the tenant's fault).
FAILURES = frozenset(
    {
        StopReason.CRASHED,
        StopReason.START_FAILED,
        StopReason.START_TIMEOUT,
        StopReason.CALL_TIMEOUT,
        StopReason.PROTOCOL_ERROR,
        StopReason.PIPE_CLOSED,
    }
)

_HINTS = {
    signal.SIGKILL: "out of memory, or killed from outside?",
    signal.SIGSEGV: "segmentation fault in native code?",
    signal.SIGABRT: "abort() in native code?",
    signal.SIGBUS: "bus error in native code?",
    signal.SIGXCPU: "CPU time limit reached?",
    signal.SIGTERM: "terminated from outside?",
}


def signal_name(signum: int) -> str:
    """``9`` -> ``"SIGKILL"``; a number Python has no name for -> ``"signal 77"``."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def describe_exit(returncode: int | None) -> str:
    """Say in words how a process ended, with the likely cause.

    Args:
        returncode: as from ``waitpid``: >= 0 an exit code, < 0 a signal number,
            None unknown (the process was not reaped by us).
    """
    if returncode is None:
        return "exit status unknown"
    if returncode >= 0:
        return f"exited with code {returncode}"
    hint = _HINTS.get(-returncode)  # type: ignore[call-overload]
    return f"killed by {signal_name(-returncode)}" + (f" ({hint})" if hint else "")


def mib(n: int | None) -> str:
    return "no limit" if n is None else f"{n / 2**20:.0f} MiB"


def exit_status(report: StopReport, *, oom_killed: bool, memory_hard_limit: int | None) -> str:
    """The stop in corral's own words (no worker text), for the log and for errors."""
    reason, returncode = report.reason, report.returncode
    if reason is StopReason.MEMORY_HARD_LIMIT and oom_killed:
        return f"killed by the OS for exceeding worker_memory_hard_limit ({mib(memory_hard_limit)})"
    if returncode is None:
        return "its warden process died"
    if reason is StopReason.PIPE_CLOSED:
        return "it closed its pipe to the supervisor and was killed"
    if reason is not StopReason.CRASHED and returncode in (-signal.SIGTERM, -signal.SIGKILL):
        return f"killed by {signal_name(-returncode)} sent by corral ({reason.value})"
    if returncode == 0 and reason is StopReason.CRASHED:
        return "exited with code 0 without being asked (sys.exit() in the kernel?)"
    return describe_exit(returncode)


def call_error(
    report: StopReport,
    status: str,
    *,
    tenant: str,
    pid: int | None,
    method: str,
    detail: str,
    memory_hard_limit: int | None,
) -> WorkerError:
    """The error of a call still in flight when its worker ended as ``report`` says.

    Args:
        status: :func:`exit_status`'s words for it.
        detail: what the worker did wrong, for a protocol error ("sent an undecodable
            frame").
    """
    where = f"{tenant!r}.{method}: worker pid {pid}"
    reason = report.reason
    if reason in (StopReason.CRASHED, StopReason.WARDEN_DIED, StopReason.PIPE_CLOSED):
        return WorkerCrashedError(
            f"{where} died during the call: {status}",
            tenant=tenant,
            pid=pid,
            exitcode=report.exitcode,
            signal=report.signal,
        )
    if reason is StopReason.PROTOCOL_ERROR:
        return protocol_error(tenant, pid, method, detail)
    if reason is StopReason.MEMORY_HARD_LIMIT:
        return MemoryLimitError(
            f"{where} hit its memory limit: {status}",
            tenant=tenant,
            pid=pid,
            limit=memory_hard_limit,
        )
    return WorkerStoppedError(
        f"{where} was stopped while the call was in flight ({reason.value})",
        tenant=tenant,
        pid=pid,
        reason=reason.value,
    )


def protocol_error(tenant: str, pid: int | None, method: str, detail: str) -> ProtocolError:
    return ProtocolError(
        f"{tenant!r}.{method}: worker pid {pid} {detail}; it was killed", tenant=tenant, pid=pid
    )


def start_error(
    report: StopReport, status: str, *, tenant: str, pid: int | None, detail: str
) -> StartError:
    """The error of callers waiting for a worker that ended before it was ready (when
    nothing more specific was recorded as it failed)."""
    if report.reason in (StopReason.EVICTED, StopReason.CLOSED):
        why = f"was stopped before it was ready ({report.reason.value})"
    else:
        why = f"exited while starting: {detail or status}"
    return StartError(f"worker for {tenant!r} (pid {pid}) {why}", tenant=tenant, pid=pid)
