"""Kernels for the supervisor's tests whose stop the test holds, loaded in real workers
by import string ("tests.supervisor.stop_kernels:<factory>")."""

from __future__ import annotations

import os
import signal


class HeldStopKernel:
    """Its ``shutdown()`` hook returns only once the worker receives SIGUSR1, so a stop
    stays at its first rung (ASK) for as long as the test wants. The signal is blocked
    from the start and taken with ``sigwait``: one sent before the hook runs waits for it
    rather than killing the worker."""

    def __init__(self, tenant: str) -> None:
        self.tenant = tenant
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})

    def pid(self) -> int:
        return os.getpid()

    def shutdown(self) -> None:
        signal.sigwait({signal.SIGUSR1})


def held_stop(tenant: str) -> HeldStopKernel:
    return HeldStopKernel(tenant)
