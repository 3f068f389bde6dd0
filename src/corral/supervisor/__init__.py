"""Parent side of corral.

Public modules: :mod:`~corral.supervisor.supervisor` (:class:`Supervisor`),
:mod:`~corral.supervisor.sync` (:class:`SyncSupervisor`),
:mod:`~corral.supervisor.records` (what it reports), :mod:`~corral.supervisor.events`
(what it emits), :mod:`~corral.supervisor.sandbox` and
:mod:`~corral.supervisor.tenants`. Underscored modules are the machinery behind them
(the pool, worker handles, lifecycle, launcher, memory watch).

Imports ``corral.ipc``; never ``corral.worker`` (that runs in other processes).
"""

from corral.supervisor._config import DEFAULT_ENV_ALLOWLIST, Factory
from corral.supervisor.events import (
    TenantBackoff,
    WorkerEvent,
    WorkerReady,
    WorkerStarting,
    WorkerStopped,
)
from corral.supervisor.options import SupervisorOptions
from corral.supervisor.policy import Policy, TenantPolicy
from corral.supervisor.records import (
    LayerStatus,
    Rung,
    StopReason,
    StopReport,
    SupervisorStats,
    WorkerInfo,
    WorkerState,
)
from corral.supervisor.sandbox import Sandbox, SandboxUnavailableError
from corral.supervisor.supervisor import Supervisor
from corral.supervisor.sync import SyncSupervisor

__all__ = [
    "DEFAULT_ENV_ALLOWLIST",
    "Factory",
    "LayerStatus",
    "Policy",
    "Rung",
    "Sandbox",
    "SandboxUnavailableError",
    "StopReason",
    "StopReport",
    "Supervisor",
    "SupervisorOptions",
    "SupervisorStats",
    "SyncSupervisor",
    "TenantBackoff",
    "TenantPolicy",
    "WorkerEvent",
    "WorkerInfo",
    "WorkerReady",
    "WorkerStarting",
    "WorkerState",
    "WorkerStopped",
]
