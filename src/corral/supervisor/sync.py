"""The sync façade for threaded hosts: :class:`SyncSupervisor`.

It owns one private event loop on a thread of its own and forwards every call
to the async :class:`~corral.supervisor.Supervisor` running there. Any number
of host threads may call it at once.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import threading
import weakref
from collections.abc import Callable, Coroutine, Mapping
from typing import Any, Literal, TypeVar, overload

from corral.errors import CorralError, SupervisorClosedError
from corral.supervisor._config import Factory
from corral.supervisor.options import SupervisorOptions
from corral.supervisor.records import SupervisorStats, WorkerInfo
from corral.supervisor.supervisor import Supervisor

__all__ = ["SyncSupervisor"]

T = TypeVar("T")


class SyncSupervisor:
    """Same operations as :class:`Supervisor`, as plain blocking methods.

    Takes the same arguments as :class:`Supervisor`. Use it as a context manager
    or call :meth:`start` and :meth:`close`.
    """

    _thread_name = "corral-loop"

    def __init__(
        self, factory: Factory, options: SupervisorOptions | None = None, **overrides: Any
    ) -> None:
        self._factory = factory
        self._options = dict(overrides) if options is None else {"options": options, **overrides}
        self._at_exit: Callable[[], None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._sup: Supervisor | None = None
        self._closed = False  # close() was called: no start() from then on
        self._lock = threading.Lock()

    def start(self) -> None:
        """Start the loop thread and the supervisor on it; returns once it is running
        (also when another thread started it concurrently).

        Raises:
            SupervisorClosedError: :meth:`close` was called (create a new one).
            StartError, ValueError: as :meth:`Supervisor.start`.

        **On error:** nothing is left running (no loop thread, no process), and
        ``start()`` may be called again: each attempt builds a fresh :class:`Supervisor`.
        """
        with self._lock:
            if self._thread is not None:
                return
            if self._closed:
                raise SupervisorClosedError("this SyncSupervisor has been closed; create a new one")
            sup = self._new_supervisor()  # bad options: nothing started
            loop = asyncio.new_event_loop()
            ready = threading.Event()

            def run() -> None:
                asyncio.set_event_loop(loop)
                loop.call_soon(ready.set)
                loop.run_forever()

            # A daemon: a host that never calls close() must still exit. Python runs atexit
            # handlers (close_at_exit below) while daemon threads still run, and joins
            # only non-daemon threads before them.
            thread = threading.Thread(target=run, name=self._thread_name, daemon=True)
            thread.start()
            ready.wait()
            # Under the lock: a concurrent start() returns only after this, and no call can
            # be submitted before the supervisor runs.
            ended = threading.Event()

            async def start_or_close() -> None:
                try:
                    await sup.start()
                except BaseException:
                    # A failed start releases what it started; a cancelled one (the host
                    # interrupted below) may have got further: close it.
                    await asyncio.shield(sup.aclose())
                    raise
                finally:
                    ended.set()

            future = asyncio.run_coroutine_threadsafe(start_or_close(), loop)
            try:
                future.result()
            except BaseException:
                # close() will not see the loop thread: end it here (each retry would
                # otherwise leave one more).
                if not future.done():  # interrupted (Ctrl-C): cancel the start, let it clean up
                    future.cancel()
                    ended.wait()
                _stop_loop(loop, thread)
                raise
            self._sup, self._loop, self._thread = sup, loop, thread
            # A host that never calls close(): its workers are stopped at exit.
            ref = weakref.ref(self)

            def close_at_exit() -> None:
                me = ref()
                if me is not None:
                    me.close()

            self._at_exit = close_at_exit
            atexit.register(close_at_exit)

    def _new_supervisor(self) -> Supervisor:
        """The async object :meth:`start` runs on the loop thread, built from the
        constructor's arguments; a subclass may return another with the same methods
        (``SyncClusterSupervisor``: a ``ClusterSupervisor``)."""
        return Supervisor(self._factory, **self._options)

    def close(self) -> None:
        """Stop every worker and the loop thread; returns once all are gone. Closed for
        good, as :meth:`Supervisor.aclose`: a later :meth:`start` is refused."""
        with self._lock:
            # Detach first, under the lock: from here no new call can be submitted.
            thread, loop, sup = self._thread, self._loop, self._sup
            self._thread = self._loop = None
            self._closed = True
            at_exit, self._at_exit = self._at_exit, None
        if at_exit is not None:
            atexit.unregister(at_exit)
        if thread is None or loop is None or sup is None:
            return
        try:
            asyncio.run_coroutine_threadsafe(sup.aclose(), loop).result()
        finally:
            _stop_loop(loop, thread)

    def __enter__(self) -> SyncSupervisor:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        with self._lock:  # submit atomically with respect to close()
            loop, thread = self._loop, self._thread
            if loop is None or thread is None:
                coro.close()
                raise SupervisorClosedError("SyncSupervisor is not running (use 'with' or start())")
            if threading.current_thread() is thread:
                coro.close()
                raise RuntimeError("SyncSupervisor called from its own loop thread")
            future: concurrent.futures.Future[T] = asyncio.run_coroutine_threadsafe(coro, loop)
        return future.result()

    @property
    def _supervisor(self) -> Supervisor:
        if self._sup is None:
            raise SupervisorClosedError("SyncSupervisor is not running (use 'with' or start())")
        return self._sup

    @overload
    def call(
        self, tenant: str, method: str, /, *args: Any, result_type: type[T], **kwargs: Any
    ) -> T: ...

    @overload
    def call(
        self, tenant: str, method: str, /, *args: Any, result_type: Any = None, **kwargs: Any
    ) -> Any: ...

    def call(
        self, tenant: str, method: str, /, *args: Any, result_type: Any = None, **kwargs: Any
    ) -> Any:
        """See :meth:`Supervisor.call`."""
        return self._run(
            self._supervisor.invoke(tenant, method, args, kwargs, result_type=result_type)
        )

    def invoke(
        self,
        tenant: str,
        method: str,
        args: tuple[Any, ...] | list[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        *,
        timeout: float | Literal["default"] | None = "default",
        result_type: Any = None,
    ) -> Any:
        """See :meth:`Supervisor.invoke`."""
        return self._run(
            self._supervisor.invoke(
                tenant, method, args, kwargs, timeout=timeout, result_type=result_type
            )
        )

    def get_or_create(self, tenant: str) -> WorkerInfo:
        return self._run(self._supervisor.get_or_create(tenant))

    def evict(self, tenant: str) -> bool:
        return self._run(self._supervisor.evict(tenant))

    def reload(self, tenant: str) -> WorkerInfo | None:
        """See :meth:`Supervisor.reload`."""
        return self._run(self._supervisor.reload(tenant))

    def reload_all(self) -> dict[str, WorkerInfo | CorralError]:
        """See :meth:`Supervisor.reload_all`."""
        return self._run(self._supervisor.reload_all())

    def evict_all(self) -> int:
        return self._run(self._supervisor.evict_all())

    def keys(self) -> list[str]:
        return self._run(_value(self._supervisor.keys))

    def stats(self) -> SupervisorStats:
        return self._run(_value(self._supervisor.stats))

    def __len__(self) -> int:
        return self._run(_value(self._supervisor.__len__))

    def __contains__(self, tenant: object) -> bool:
        return self._run(_value(lambda: tenant in self._supervisor))


def _stop_loop(loop: asyncio.AbstractEventLoop, thread: threading.Thread) -> None:
    """Stop the loop running on ``thread``, wait for the thread to end, close the loop."""
    loop.call_soon_threadsafe(loop.stop)
    thread.join()
    loop.close()


async def _value(fn: Callable[[], T]) -> T:
    """Read the supervisor's state on its own loop thread (it is not thread-safe)."""
    return fn()
