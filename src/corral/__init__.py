"""corral: run each tenant's kernel in its own supervised worker process.

Public API::

    from corral import Supervisor
    async with Supervisor("myapp.plugins:load_kernel", max_workers=32, idle_ttl=900.0) as sup:
        value = await sup.call("tenant-42", "render", {"page": 1})
"""

from corral.errors import (
    BackoffError,
    CallTimeoutError,
    CapacityError,
    CorralError,
    InvalidCallError,
    KernelError,
    MemoryLimitError,
    MemoryPressureError,
    NodeLostError,
    ProtocolError,
    ResultTypeError,
    StartError,
    SupervisorClosedError,
    WorkerCrashedError,
    WorkerError,
    WorkerStoppedError,
)
from corral.supervisor import (
    LayerStatus,
    Rung,
    Sandbox,
    StopReason,
    StopReport,
    Supervisor,
    SupervisorOptions,
    SupervisorStats,
    SyncSupervisor,
    TenantBackoff,
    TenantPolicy,
    WorkerEvent,
    WorkerInfo,
    WorkerReady,
    WorkerStarting,
    WorkerState,
    WorkerStopped,
)
from corral.supervisor.tenants import TENANT_MAX_BYTES, TENANT_RULE, check_tenant

__version__ = "0.1.0"

__all__ = [
    "TENANT_MAX_BYTES",
    "TENANT_RULE",
    "BackoffError",
    "CallTimeoutError",
    "CapacityError",
    "ClusterSupervisor",
    "CorralError",
    "InvalidCallError",
    "KernelError",
    "LayerStatus",
    "MemoryLimitError",
    "MemoryPressureError",
    "NodeLostError",
    "ProtocolError",
    "ResultTypeError",
    "Rung",
    "Sandbox",
    "StartError",
    "StopReason",
    "StopReport",
    "Supervisor",
    "SupervisorClosedError",
    "SupervisorOptions",
    "SupervisorStats",
    "SyncClusterSupervisor",
    "SyncSupervisor",
    "TenantBackoff",
    "TenantPolicy",
    "WorkerCrashedError",
    "WorkerError",
    "WorkerEvent",
    "WorkerInfo",
    "WorkerReady",
    "WorkerStarting",
    "WorkerState",
    "WorkerStopped",
    "WorkerStoppedError",
    "__version__",
    "check_tenant",
]


def __getattr__(name: str) -> object:
    # The cluster front end needs Ray (the ``corral[ray]`` extra): imported on first use,
    # so that ``import corral`` never imports Ray.
    if name in ("ClusterSupervisor", "SyncClusterSupervisor"):
        import corral.cluster

        return getattr(corral.cluster, name)
    raise AttributeError(f"module 'corral' has no attribute {name!r}")
