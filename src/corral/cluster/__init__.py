"""corral on a Ray cluster: :class:`ClusterSupervisor`, the :class:`~corral.Supervisor`
API across many hosts, each tenant active on one node at a time.

Needs the ``ray`` extra (``pip install 'corral[ray]'``). The core never imports this
package; ``corral.ClusterSupervisor`` imports it on first use.

Parts (see ARCHITECTURE.md, "Scale-out on Ray"):

* :mod:`._agent`: the node agent, one per Ray node, holding that node's local Supervisor;
* :mod:`._directory`: tenant -> (node, epoch), on the head node;
* :mod:`._front`: :class:`ClusterSupervisor`, what applications call;
* :mod:`._sync`: :class:`SyncClusterSupervisor`, the same as plain methods;
* :mod:`._wire`: what they send each other.
"""

from corral.cluster._front import ClusterSupervisor
from corral.cluster._sync import SyncClusterSupervisor
from corral.cluster._wire import ClusterStats, NodeStats, NodeWorkerEvent, NodeWorkerInfo

__all__ = [
    "ClusterStats",
    "ClusterSupervisor",
    "NodeStats",
    "NodeWorkerEvent",
    "NodeWorkerInfo",
    "SyncClusterSupervisor",
]
