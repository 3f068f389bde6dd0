"""The HTTP gateway: a Starlette app over one :class:`corral.Supervisor`, or over a Ray
cluster through a :class:`corral.ClusterSupervisor` (``ray_address``).

Routes (JSON in and out):

* ``POST /v1/tenants/{key}/call/{method}`` with ``{"args": [...], "kwargs": {...}}``
  -> ``{"result": ...}``; corral's errors become HTTP statuses (:func:`error_response`);
* ``GET /v1/workers``: the ``stats()`` snapshot, plus the memory limits;
* ``GET /v1/events``: the most recent lifecycle events (starts, stops with reasons,
  backoffs), newest last;
* ``DELETE /v1/tenants/{key}``: evict that tenant's worker;
* ``GET /healthz`` (liveness), ``GET /readyz`` (readiness, with the reason when not
  ready), ``GET /metrics`` (Prometheus text), ``GET /openapi.json`` (this list as an
  OpenAPI document), ``GET /`` (the dashboard).

Every request first goes through :class:`corral.server._http.GatewayMiddleware`:
request id, bearer token, the tenant-key rule (a bad key is a JSON 400 before any
route is matched), one log line. Every error answer, 404 and 405 included, is
``{"error": {"type", "message", ...}}``.

The supervisor is started and closed in the app's lifespan. Before it starts, the
factory is checked: a supervisor of its own, with the same options, loads it in one
worker (tenant ``corral-startup-check``) and is closed, so a factory that cannot be
imported or that raises fails the start-up instead of every call. A request body larger
than ``max_body_bytes`` is refused (413) before it is read in full.

Over a cluster, the routes are the same; several gateways (replicas) may serve one
deployment (a Ray namespace) at once, each its own front end. The factory is checked in
the cluster (``get_or_create("corral-startup-check")`` on whichever node the directory
picks, then ``evict``); ``/v1/workers`` and ``/metrics`` ask every node for fresh stats
(each worker with its ``node`` and ``node_address``, and ``nodes``); ``/readyz`` means
"some node is up and not under memory pressure". On exit the gateway either closes
the deployment if it is the last front end (``ray_on_exit="shutdown"``) or only detaches
(``"detach"``), leaving every tenant's worker for the next gateway.

Not here: option parsing (``_options``), the command (``corral.cli._serve``).

Long because one app factory serves a local Supervisor and a cluster: the routes, the
error mapping every front end shares (:func:`error_response`), the lifespan with the
factory check, and the cluster's views of workers, readiness and metrics.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import TYPE_CHECKING, Any, Literal

import msgspec
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp

from corral import Supervisor, SupervisorStats, WorkerEvent
from corral.errors import (
    BackoffError,
    CallTimeoutError,
    CapacityError,
    CorralError,
    InvalidCallError,
    KernelError,
    MemoryPressureError,
    NodeLostError,
    StartError,
    SupervisorClosedError,
)
from corral.server._dashboard import DASHBOARD_HTML
from corral.server._http import (
    GatewayMiddleware,
    annotate,
    check_auth_token,
    http_error,
    json_error,
    json_response,
    server_error,
    tenant_error,
)
from corral.server._metrics import Metrics
from corral.server._openapi import openapi_document
from corral.supervisor import Factory

if TYPE_CHECKING:
    from corral.cluster import ClusterStats, ClusterSupervisor

__all__ = ["DEFAULT_FACTORY", "Gateway", "create_app", "error_response"]

log = logging.getLogger("corral.server")

DEFAULT_FACTORY = "corral.examples.demo:create"
DEFAULT_MAX_BODY_BYTES = 1 << 20
CHECK_TENANT = "corral-startup-check"
"""The tenant the start-up check calls the factory with (in a worker that is then stopped)."""
_RECENT_EVENTS = 200
_CLUSTER_STATS_TIMEOUT = 15.0  # seconds /v1/workers, /metrics and /readyz wait for the nodes


class CallBody(msgspec.Struct, forbid_unknown_fields=True):
    args: list[Any] = msgspec.field(default_factory=list)
    kwargs: dict[str, Any] = msgspec.field(default_factory=dict)


class _BadRequest(Exception):
    def __init__(self, status: int, kind: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind


def error_response(exc: CorralError, tenant: str) -> Response:
    """The HTTP answer for a corral error: status, ``Retry-After`` where waiting helps,
    and ``{"error": {"type", "message", "tenant", ...}}``.

    ==========================================  ======
    KernelError (the kernel raised)             422, with ``remote_type``
    InvalidCallError: no such method            404
    InvalidCallError: a key that breaks the     400, with ``rule`` (and no ``tenant``:
    tenant-key rule                             the message shows it cut and escaped)
    InvalidCallError: arguments                 400
    InvalidCallError: unsendable result         500
    CallTimeoutError                            504
    BackoffError, MemoryPressureError,          503, ``Retry-After``
    CapacityError
    SupervisorClosedError                       503
    any other WorkerError (crash, protocol,     502
    start failure, memory limit, stopped),
    ResultTypeError (a reply not of the type
    asked for)
    NodeLostError (a cluster node was lost      502, with ``node`` and ``node_address``
    during the call)
    ==========================================  ======
    """
    kind = type(exc).__name__
    message = str(exc)
    if isinstance(exc, KernelError):
        return json_error(422, kind, message, tenant=tenant, remote_type=exc.remote_type)
    if isinstance(exc, InvalidCallError):
        if exc.kind == "tenant":
            return tenant_error(exc)
        status = {"method": 404, "result": 500}.get(exc.kind, 400)
        return json_error(status, kind, message, tenant=tenant)
    if isinstance(exc, CallTimeoutError):
        return json_error(504, kind, message, tenant=tenant)
    if isinstance(exc, BackoffError | MemoryPressureError):
        return json_error(503, kind, message, tenant=tenant, retry_after=exc.retry_after)
    if isinstance(exc, CapacityError):
        return json_error(503, kind, message, tenant=tenant, retry_after=1.0)
    if isinstance(exc, SupervisorClosedError):
        return json_error(503, kind, message, tenant=tenant)
    if isinstance(exc, NodeLostError):
        return json_error(
            502, kind, message, tenant=tenant, node=exc.node, node_address=exc.node_address
        )
    return json_error(502, kind, message, tenant=tenant)


def _annotate_error(exc: CorralError) -> None:
    """The request's log line gets what the error knows: the worker's pid, the stop or
    refusal reason, the exit status or signal, the kernel's exception type."""
    annotate(
        pid=getattr(exc, "pid", None),
        reason=getattr(exc, "reason", None),
        exitcode=getattr(exc, "exitcode", None),
        signal=getattr(exc, "signal", None),
        remote_type=getattr(exc, "remote_type", None),
        node=getattr(exc, "node", None),
    )


class ClusterSettings(msgspec.Struct, frozen=True):
    """Where a gateway over a Ray cluster attaches, and what it leaves on exit."""

    address: str | None = "auto"  # "auto", "HOST:PORT", "ray://HOST:PORT"; None: connected
    namespace: str = "corral"
    on_exit: Literal["shutdown", "detach"] = "shutdown"


class Gateway:
    """One app's state: the supervisor (made in the lifespan), metrics, recent events."""

    def __init__(
        self,
        factory: Factory,
        options: Mapping[str, Any],
        max_body_bytes: int,
        check_factory: bool = True,
        cluster: ClusterSettings | None = None,
    ) -> None:
        if max_body_bytes < 1:
            raise ValueError(f"max_body_bytes must be >= 1, got {max_body_bytes!r}")
        if cluster is not None and cluster.on_exit not in ("shutdown", "detach"):
            raise ValueError(f"on_exit must be 'shutdown' or 'detach', got {cluster.on_exit!r}")
        self.factory = factory
        self.options = dict(options)
        if "on_event" in self.options:
            raise ValueError("on_event is the gateway's own; use Supervisor.events() instead")
        self.max_body_bytes = max_body_bytes
        self.cluster = cluster
        self.supervisor: Supervisor | ClusterSupervisor | None = None
        self._owns_ray = False  # this gateway connected this process to Ray (and disconnects)
        self.check_factory_at_start = check_factory
        # Where the lifespan is, for /readyz: "new", "starting", "running", "stopping" or
        # "stopped". Written only by lifespan(); the supervisor's own state says the rest.
        self.phase = "new"
        self.on_ready: Callable[[], None] | None = None  # called once the supervisor runs
        self.metrics = Metrics(self.stats)
        self.recent: collections.deque[WorkerEvent] = collections.deque(maxlen=_RECENT_EVENTS)
        self._new_supervisor()  # now, so that bad options fail before anything listens

    def _new_supervisor(self) -> Supervisor | ClusterSupervisor:
        if self.cluster is None:
            return Supervisor(self.factory, on_event=self._on_event, **self.options)
        from corral.cluster import ClusterSupervisor

        return ClusterSupervisor(
            self.factory,
            address=self.cluster.address,
            namespace=self.cluster.namespace,
            on_event=self._on_event,
            **self.options,
        )

    def stats(self) -> SupervisorStats | None:
        """The current snapshot (over a cluster, the last one fetched)."""
        return self.supervisor.stats() if self.supervisor is not None else None

    async def fresh_stats(self) -> SupervisorStats | None:
        """The stats now: over a cluster, asked of every node (a ``ClusterStats``).

        Raises:
            TimeoutError: the cluster did not answer within 15 s.
            SupervisorClosedError: closing, or the cluster's directory is gone (the head
                node was lost).
        """
        sup = self.supervisor
        if sup is None:
            return None
        if isinstance(sup, Supervisor):
            return self.stats()
        from ray.exceptions import RayActorError  # imported already: sup is Ray's

        try:
            async with asyncio.timeout(_CLUSTER_STATS_TIMEOUT):
                return await sup.fetch_stats()
        except RayActorError as exc:
            raise SupervisorClosedError(f"corral's directory is gone: {exc}") from exc

    def _on_event(self, event: WorkerEvent) -> None:
        self.recent.append(event)
        self.metrics.on_event(event)

    @contextlib.asynccontextmanager
    async def lifespan(self, _app: Starlette) -> AsyncIterator[None]:
        """Check the factory, start the supervisor; on exit, close it.

        Raises:
            StartError: the factory failed its check (``remote_type`` and
                ``remote_traceback`` say why), or the supervisor could not start (a
                sandbox layer or memory limit the host cannot give).
            ValueError: a memory limit at or below a fresh worker's baseline.
        """
        self.phase = "starting"
        sup: Supervisor | ClusterSupervisor
        try:
            if self.cluster is not None:
                sup = await self._start_cluster()
            else:
                if self.check_factory_at_start:
                    await self.check_factory()
                sup = self._new_supervisor()  # one per lifespan: an app may be started again
                await sup.start()
        except BaseException:
            self.phase = "stopped"
            raise
        self.supervisor = sup
        self.phase = "running"
        if isinstance(sup, Supervisor):
            log.info("gateway ready", extra={"sandbox": sup.stats().sandbox})
        else:
            assert self.cluster is not None
            log.info("gateway ready on a Ray cluster", extra={"namespace": self.cluster.namespace})
        if self.on_ready is not None:
            self.on_ready()
        try:
            yield
        finally:
            self.phase = "stopping"
            self.supervisor = None
            try:
                await self._close(sup)
            finally:
                self.phase = "stopped"

    async def _close(self, sup: Supervisor | ClusterSupervisor) -> None:
        if isinstance(sup, Supervisor):
            await sup.aclose()
            return
        assert self.cluster is not None
        try:
            await sup.aclose(keep_running=self.cluster.on_exit == "detach")
        finally:
            await self._disconnect_ray()

    async def _disconnect_ray(self) -> None:
        """Disconnect from Ray if this gateway connected."""
        if self._owns_ray:
            import ray

            self._owns_ray = False
            await asyncio.to_thread(ray.shutdown)

    async def _start_cluster(self) -> ClusterSupervisor:
        """Connect to Ray (unless this process is already), attach to the deployment and
        check the factory there.

        Ray is connected here rather than by the front end so that the Ray workers'
        output (every job's, on every node) is not copied into this gateway's log.

        **On error:** detached again (closing the deployment if this gateway was its only
        front end, whatever ``on_exit`` says: nothing served it) and disconnected.
        """
        import ray

        assert self.cluster is not None
        if not ray.is_initialized():
            address = self.cluster.address
            if address is not None and address.startswith("ray://"):
                await asyncio.to_thread(ray.init, address=address)  # Ray Client: as it is
            else:
                await asyncio.to_thread(
                    ray.init, address=address, log_to_driver=False, configure_logging=False
                )
            self._owns_ray = True
        sup = self._new_supervisor()
        assert not isinstance(sup, Supervisor)
        try:
            await sup.start()
            if self.check_factory_at_start:
                await self.check_factory_in_cluster(sup)
        except BaseException:
            try:
                await sup.aclose()
            finally:
                await self._disconnect_ray()
            raise
        return sup

    async def check_factory_in_cluster(self, sup: ClusterSupervisor) -> None:
        """Load the factory in one worker of the cluster, on whichever node the directory
        places the tenant ``corral-startup-check``, then evict it.

        Unlike the local check, the worker belongs to the served deployment (a Ray
        deployment has one factory and one set of options), so its start and stop show
        in the cluster's stats and events. Replicas starting together share the check
        tenant's one worker.

        Raises:
            StartError: the factory failed (``remote_type``, ``remote_traceback``), or
                its tenant is in backoff after failing so (the message says why).
        """
        try:
            await sup.get_or_create(CHECK_TENANT)
        except MemoryPressureError as exc:
            log.warning("the factory was not checked at start-up: %s", exc)
            return
        except (StartError, BackoffError) as exc:
            name = self.factory if isinstance(self.factory, str) else repr(self.factory)
            raise StartError(
                f"the factory {name} failed its start-up check in the cluster: {exc}",
                tenant=CHECK_TENANT,
                pid=getattr(exc, "pid", None),
                remote_type=getattr(exc, "remote_type", None),
                remote_traceback=getattr(exc, "remote_traceback", None),
            ) from exc
        await sup.evict(CHECK_TENANT)

    async def check_factory(self) -> None:
        """Load the factory in one worker, then stop it, so that a factory that cannot be
        imported (or raises) fails here rather than in every call.

        The worker belongs to a supervisor of its own with the same options (sandbox,
        environment, start method: what decides whether the import works), so the
        serving supervisor's statistics and events start clean. The factory is called
        once, as ``factory("corral-startup-check")``. Under memory pressure no worker
        may start: the check is skipped with a warning (``/readyz`` says why the gateway
        is not ready).

        Raises:
            StartError: the factory failed (``remote_type``, ``remote_traceback``), or
                the supervisor could not start.
            ValueError: a memory limit at or below a fresh worker's baseline.

        **On error:** the checking supervisor is closed; no process is left.
        """
        async with Supervisor(self.factory, **self.options) as sup:
            try:
                await sup.get_or_create(CHECK_TENANT)
            except MemoryPressureError as exc:
                log.warning("the factory was not checked at start-up: %s", exc)
            except StartError as exc:
                name = self.factory if isinstance(self.factory, str) else repr(self.factory)
                if exc.remote_type is None and exc.pid is None:
                    raise  # the supervisor itself could not start: its message says why
                raise StartError(
                    f"the factory {name} failed its start-up check: {exc}",
                    tenant=CHECK_TENANT,
                    pid=exc.pid,
                    remote_type=exc.remote_type,
                    remote_traceback=exc.remote_traceback,
                ) from exc

    # -- routes ------------------------------------------------------------------------------

    async def call(self, request: Request) -> Response:
        tenant = request.path_params["key"]
        method = request.path_params["method"]
        annotate(method=method)
        sup = self.supervisor
        if sup is None:
            return json_error(503, "NotReady", "the gateway is starting", tenant=tenant)
        started = time.perf_counter()
        outcome = "ok"
        try:
            body = await self._read_body(request)
            result = await sup.invoke(tenant, method, body.args, body.kwargs)
            try:
                return json_response({"result": result})
            except (TypeError, ValueError, OverflowError) as exc:
                outcome = "UnencodableResult"
                return json_error(500, outcome, f"the result is not JSON: {exc}", tenant=tenant)
        except _BadRequest as exc:
            outcome = exc.kind
            return json_error(exc.status, exc.kind, str(exc), tenant=tenant)
        except CorralError as exc:
            outcome = type(exc).__name__
            _annotate_error(exc)
            return error_response(exc, tenant)
        finally:
            if outcome != "ok":
                annotate(error=outcome)
            self.metrics.observe_call(outcome, time.perf_counter() - started)

    async def _read_body(self, request: Request) -> CallBody:
        limit = self.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            raise _BadRequest(413, "BodyTooLarge", f"the body is over {limit} bytes")
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise _BadRequest(413, "BodyTooLarge", f"the body is over {limit} bytes")
            chunks.append(chunk)
        raw = b"".join(chunks)
        if not raw.strip():
            return CallBody()
        try:
            return msgspec.json.decode(raw, type=CallBody)
        except (msgspec.DecodeError, RecursionError) as exc:
            raise _BadRequest(
                400, "BadJSON", f'expected {{"args": [...], "kwargs": {{...}}}}: {exc}'
            ) from None

    async def workers(self, _request: Request) -> Response:
        try:
            stats = await self.fresh_stats()
        except (TimeoutError, SupervisorClosedError) as exc:
            return json_error(503, "Unavailable", f"the cluster does not answer: {exc}")
        if stats is None:
            return json_error(503, "NotReady", "the gateway is starting")
        limits = {
            "soft": self.options.get("worker_memory_limit"),
            "hard": self.options.get("worker_memory_hard_limit"),
        }
        return json_response({**msgspec.to_builtins(stats), "limits": limits, "now": time.time()})

    async def events(self, _request: Request) -> Response:
        return json_response({"events": list(self.recent)})

    async def evict(self, request: Request) -> Response:
        tenant = request.path_params["key"]
        if self.supervisor is None:
            return json_error(503, "NotReady", "the gateway is starting", tenant=tenant)
        try:
            evicted = await self.supervisor.evict(tenant)
        except CorralError as exc:
            annotate(error=type(exc).__name__)
            _annotate_error(exc)
            return error_response(exc, tenant)
        return json_response({"tenant": tenant, "evicted": evicted})

    async def reload(self, request: Request) -> Response:
        tenant = request.path_params["key"]
        sup = self.supervisor
        if sup is None:
            return json_error(503, "NotReady", "the gateway is starting", tenant=tenant)
        if not isinstance(sup, Supervisor):
            return json_error(
                501, "NotSupported", "reload is not available over a Ray cluster", tenant=tenant
            )
        try:
            worker = await sup.reload(tenant)
        except CorralError as exc:
            annotate(error=type(exc).__name__)
            _annotate_error(exc)
            return error_response(exc, tenant)
        body = {"tenant": tenant, "reloaded": worker is not None, "worker": worker}
        return json_response(body)

    async def healthz(self, _request: Request) -> Response:
        stats = self.stats()
        if stats is None or stats.state != "running":
            return json_response({"status": "unavailable"}, 503)
        return json_response({"status": "ok", "workers": len(stats.workers)})

    async def readyz(self, _request: Request) -> Response:
        """200 ``{"status": "ready", ...}`` while the gateway can serve a new tenant, else
        503 ``{"status": "unavailable", "reason": ...}``: starting (the factory check and
        the supervisor's start are not done), stopping or stopped, or memory pressure
        (new workers are refused). A dead warden does not count: the next start replaces
        it, and a failure to is that call's ``StartError``."""
        sup = self.supervisor
        if sup is None:
            reason = {
                "new": "not started",
                "starting": "starting: checking the factory and starting the supervisor",
                "stopping": "shutting down",
                "stopped": "stopped",
            }.get(self.phase, self.phase)
            return json_response({"status": "unavailable", "reason": reason}, 503)
        if not isinstance(sup, Supervisor):
            return await self._cluster_ready()
        stats = sup.stats()
        if stats.state != "running":
            return json_response(
                {"status": "unavailable", "reason": f"supervisor {stats.state}"}, 503
            )
        if stats.memory_pressure is not None:
            reason = f"memory pressure, new workers are refused: {stats.memory_pressure}"
            return json_response({"status": "unavailable", "reason": reason}, 503)
        return json_response(
            {"status": "ready", "workers": len(stats.workers), "max_workers": stats.max_workers}
        )

    async def _cluster_ready(self) -> Response:
        """Ready while some node is up without memory pressure (a new tenant goes there)."""
        try:
            stats: ClusterStats | None = await self.fresh_stats()  # type: ignore[assignment]
        except (TimeoutError, SupervisorClosedError) as exc:
            reason = f"the cluster's directory does not answer: {exc or 'timed out'}"
            return json_response({"status": "unavailable", "reason": reason}, 503)
        if stats is None:
            return json_response({"status": "unavailable", "reason": "stopped"}, 503)
        up = [n for n in stats.nodes if n.state == "up"]
        free = [n for n in up if n.memory_pressure is None]
        if not free:
            reason = (
                "no node is up: " + ", ".join(f"{n.address} {n.state}" for n in stats.nodes)
                if not up
                else "memory pressure on every node, new workers are refused: "
                + "; ".join(f"{n.address} ({n.node[:8]}): {n.memory_pressure}" for n in up)
            )
            return json_response({"status": "unavailable", "reason": reason}, 503)
        return json_response(
            {
                "status": "ready",
                "workers": len(stats.workers),
                "max_workers": stats.max_workers,
                "nodes": len(free),
            }
        )

    async def metrics_text(self, _request: Request) -> Response:
        if self.cluster is not None:
            # The gauges read stats() at scrape time: over a cluster, fetch them first.
            with contextlib.suppress(TimeoutError, SupervisorClosedError):
                await self.fresh_stats()
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def dashboard(self, _request: Request) -> Response:
        return HTMLResponse(DASHBOARD_HTML)

    async def openapi(self, request: Request) -> Response:
        app = request.app
        assert isinstance(app, _GatewayApp)
        return json_response(app.openapi)


class _GatewayApp(Starlette):
    """The Starlette app with :class:`GatewayMiddleware` outermost, around Starlette's
    own error middleware too, so that a 500 also carries the request id and is logged
    with it. ``openapi`` is the document ``GET /openapi.json`` serves."""

    def __init__(self, *, auth_token: str | None, openapi: dict[str, Any], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.auth_token = auth_token
        self.openapi = openapi

    def build_middleware_stack(self) -> ASGIApp:
        return GatewayMiddleware(super().build_middleware_stack(), self.auth_token)


def create_app(
    factory: Factory | None = None,
    *,
    options: Mapping[str, Any] | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    check_factory: bool = True,
    auth_token: str | None = None,
    ray_address: str | None = None,
    ray_namespace: str = "corral",
    ray_on_exit: Literal["shutdown", "detach"] = "shutdown",
) -> Starlette:
    """The gateway app over a new Supervisor, or over a Ray cluster.

    Args:
        factory: the kernel factory (default: the bundled example kernel).
        options: keyword arguments for :class:`corral.Supervisor` (not ``on_event``:
            the gateway uses it; read ``Supervisor.events()`` instead).
        max_body_bytes: larger request bodies get 413.
        check_factory: load the factory in one throwaway worker when the app starts
            (:meth:`Gateway.check_factory`), so that a broken factory fails the
            start-up; False skips it (the factory is then first run by a call).
        auth_token: every request but ``/``, ``/healthz`` and ``/readyz`` must carry
            ``Authorization: Bearer <auth_token>`` (else 401); None: no token needed.
        ray_address: serve through a :class:`corral.ClusterSupervisor` on this Ray
            cluster (``"auto"``, ``"HOST:PORT"``, ``"ray://HOST:PORT"``; needs the ``ray``
            extra): ``options`` then apply on every node. If this process is connected
            to Ray already, that connection is used. None: a local Supervisor.
        ray_namespace: the deployment's Ray namespace (replicas share it, and must pass
            the same factory and options).
        ray_on_exit: ``"shutdown"``: when the app stops as the deployment's last front
            end, stop every node's agent and workers; ``"detach"``: leave them running
            for the next gateway (:meth:`corral.ClusterSupervisor.aclose`'s
            ``keep_running``).

    Raises:
        ValueError, TypeError: a bad option (before anything starts), or a token that
            is empty or not visible ASCII.
        ImportError: ``ray_address`` without Ray installed.
    """
    if auth_token is not None:
        check_auth_token(auth_token)
    cluster = (
        None
        if ray_address is None
        else ClusterSettings(address=ray_address, namespace=ray_namespace, on_exit=ray_on_exit)
    )
    gateway = Gateway(
        factory or DEFAULT_FACTORY, options or {}, max_body_bytes, check_factory, cluster
    )
    routes = [
        Route("/", gateway.dashboard, methods=["GET"]),
        Route("/healthz", gateway.healthz, methods=["GET"]),
        Route("/readyz", gateway.readyz, methods=["GET"]),
        Route("/metrics", gateway.metrics_text, methods=["GET"]),
        Route("/openapi.json", gateway.openapi, methods=["GET"]),
        Route("/v1/workers", gateway.workers, methods=["GET"]),
        Route("/v1/events", gateway.events, methods=["GET"]),
        Route("/v1/tenants/{key}", gateway.evict, methods=["DELETE"]),
        Route("/v1/tenants/{key}/call/{method}", gateway.call, methods=["POST"]),
        Route("/v1/tenants/{key}/reload", gateway.reload, methods=["POST"]),
    ]
    from corral import __version__

    document = openapi_document(
        ((r.path, r.methods or ()) for r in routes),
        version=__version__,
        auth=auth_token is not None,
    )
    app = _GatewayApp(
        routes=routes,
        lifespan=gateway.lifespan,
        exception_handlers={HTTPException: http_error, Exception: server_error},
        auth_token=auth_token,
        openapi=document,
    )
    app.state.gateway = gateway
    return app
