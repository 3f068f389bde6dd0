"""Parent side of corral: the table, worker handles, lifecycle, launcher, memory
probe, and the public :class:`Supervisor` / :class:`SyncSupervisor`.

Imports ``corral.ipc``; never ``corral.worker`` (that runs in other processes).
"""

from corral.supervisor._config import DEFAULT_ENV_ALLOWLIST
from corral.supervisor._handle import WorkerInfo
from corral.supervisor._lifecycle import Rung, StopReason, StopReport, WorkerState
from corral.supervisor.options import SupervisorOptions
from corral.supervisor.sandbox import Sandbox, SandboxUnavailableError
from corral.supervisor.supervisor import Supervisor, SupervisorStats, WorkerEvent
from corral.supervisor.sync import SyncSupervisor

__all__ = [
    "DEFAULT_ENV_ALLOWLIST",
    "Rung",
    "Sandbox",
    "SandboxUnavailableError",
    "StopReason",
    "StopReport",
    "Supervisor",
    "SupervisorOptions",
    "SupervisorStats",
    "SyncSupervisor",
    "WorkerEvent",
    "WorkerInfo",
    "WorkerState",
]
