"""The sync façade for threaded hosts: :class:`SyncClusterSupervisor`.

The same as :class:`~corral.SyncSupervisor` (a private event loop on a thread of
its own, any number of host threads calling at once), around a
:class:`~corral.cluster.ClusterSupervisor`.
"""

from __future__ import annotations

from typing import Any, cast

from corral.supervisor import Supervisor, SyncSupervisor

from ._front import ClusterSupervisor
from ._wire import ClusterStats

__all__ = ["SyncClusterSupervisor"]


class SyncClusterSupervisor(SyncSupervisor):
    """Same operations as :class:`ClusterSupervisor`, as plain blocking methods; takes the
    same arguments. Use it as a context manager or call :meth:`start` and :meth:`close`."""

    _thread_name = "corral-cluster-loop"

    def _new_supervisor(self) -> Supervisor:
        # The base class's methods forward to whatever runs on the loop: the front end has
        # the Supervisor's methods. Its start() connects to Ray, on the loop thread.
        return cast(Supervisor, ClusterSupervisor(self._factory, **self._options))

    def stats(self) -> ClusterStats:
        return cast(ClusterStats, super().stats())

    def fetch_stats(self) -> ClusterStats:
        """See :meth:`ClusterSupervisor.fetch_stats`."""
        front = cast(Any, self._supervisor)
        return cast(ClusterStats, self._run(front.fetch_stats()))
