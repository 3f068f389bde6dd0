"""The sync façade for threaded hosts: :class:`SyncClusterSupervisor`.

The same as :class:`~corral.SyncSupervisor` (a private event loop on a thread of
its own, any number of host threads calling at once), around a
:class:`~corral.cluster.ClusterSupervisor`.
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from typing import Any, cast

from corral.supervisor import Supervisor, SyncSupervisor

from ._front import ClusterSupervisor
from ._wire import ClusterStats

__all__ = ["SyncClusterSupervisor"]


class SyncClusterSupervisor(SyncSupervisor):
    """Same operations as :class:`ClusterSupervisor`, as plain blocking methods; takes the
    same arguments. Use it as a context manager or call :meth:`start` and :meth:`close`."""

    def start(self) -> None:
        """Start the loop thread and the front end on it (connecting to Ray there)."""
        with self._lock:
            if self._thread is not None:
                return
            loop = asyncio.new_event_loop()
            ready = threading.Event()

            def run() -> None:
                asyncio.set_event_loop(loop)
                loop.call_soon(ready.set)
                loop.run_forever()

            sup = ClusterSupervisor(self._factory, **self._options)
            thread = threading.Thread(target=run, name="corral-cluster-loop")
            thread.start()
            ready.wait()
            try:
                asyncio.run_coroutine_threadsafe(sup.start(), loop).result()
            except BaseException:
                loop.call_soon_threadsafe(loop.stop)
                thread.join()
                loop.close()
                raise
            # The base class's methods forward to whatever runs on the loop: the front end
            # has the Supervisor's methods.
            self._sup, self._loop, self._thread = cast(Supervisor, sup), loop, thread
            ref = weakref.ref(self)

            def close_at_exit() -> None:
                me = ref()
                if me is not None:
                    me.close()

            threading._register_atexit(close_at_exit)  # type: ignore[attr-defined]

    def stats(self) -> ClusterStats:
        return cast(ClusterStats, super().stats())

    def fetch_stats(self) -> ClusterStats:
        """See :meth:`ClusterSupervisor.fetch_stats`."""
        front = cast(Any, self._supervisor)
        return cast(ClusterStats, self._run(front.fetch_stats()))
