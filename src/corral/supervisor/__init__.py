"""Parent side of corral: the table, worker handles, lifecycle, launcher, memory
probe, and the public :class:`Supervisor` / :class:`SyncSupervisor`.

Imports ``corral.ipc``; never ``corral.worker`` (that runs in other processes).
"""

from corral.supervisor._api import Supervisor, SupervisorStats, WorkerEvent
from corral.supervisor._sync import SyncSupervisor
from corral.supervisor.config import DEFAULT_ENV_ALLOWLIST
from corral.supervisor.handle import WorkerInfo
from corral.supervisor.lifecycle import Rung, StopReason, StopReport, WorkerState
from corral.supervisor.sandbox import Sandbox, SandboxUnavailableError

__all__ = [
    "DEFAULT_ENV_ALLOWLIST",
    "Rung",
    "Sandbox",
    "SandboxUnavailableError",
    "StopReason",
    "StopReport",
    "Supervisor",
    "SupervisorStats",
    "SyncSupervisor",
    "WorkerEvent",
    "WorkerInfo",
    "WorkerState",
]
