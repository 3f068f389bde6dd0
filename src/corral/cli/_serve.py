"""``corral serve``: the HTTP gateway (``corral.server``) under uvicorn.

Settings come from, in increasing priority: the defaults, the config file's ``[server]``
and ``[supervisor]`` tables (``--config``), ``CORRAL_*`` environment variables, and the
flags (all declared once, in ``corral.server._options``). A bad value, a factory that
fails its start-up check, or a sandbox or memory limit the host cannot give ends the
command with one line on stderr and exit status 2, before anything listens. One line
``corral serve: ready on http://HOST:PORT/`` goes to stdout once the supervisor has
started (the socket is bound before, so a client may connect at once). SIGTERM or
Ctrl-C stops accepting, lets calls in flight finish for up to ``--grace`` seconds, then
closes the supervisor (which drains and stops every worker); exit status 0.

The gateway's lifespan (factory check, supervisor start and close) runs here, around
uvicorn (whose own lifespan handling is off): a start-up failure is then an exception
this code turns into one line, where uvicorn would log a traceback and exit 3.

Logs go to stderr, one line per record, corral's fields (tenant, pid, reason,
request_id, ...) appended as ``key=value`` unless the message already says them
(``--log-format json``: one JSON object per line). Every record made while a request is
in flight gets its ``request_id``; the gateway logs one line per request itself (DEBUG,
WARNING for a 5xx), in place of uvicorn's access log.

With ``--host`` beyond loopback and no ``--auth-token``, a warning says that anyone who
can reach the port can call every tenant's kernel (it still serves: a proxy in front may
be what authenticates).

``--ray ADDRESS`` serves through a Ray cluster (``corral.ClusterSupervisor``). Ray is
imported only then; without it installed, one line and exit status 2. For a cluster on
this host's loopback address (``127.0.0.1:PORT``, or ``auto`` finding one), Ray is told
to keep that address (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, before it is imported):
by default it replaces a loopback address with the host's other interface address,
which a cluster that listens on loopback only does not answer on.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import ipaddress
import json
import logging
import math
import os
import signal
import socket
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import uvicorn
    from starlette.applications import Starlette

DESCRIPTION = (
    "Serve tenants' kernels over HTTP: POST /v1/tenants/KEY/call/METHOD with "
    '{"args": [...], "kwargs": {...}}; GET /v1/workers, /v1/events, /healthz, /readyz, '
    "/metrics, /openapi.json; DELETE /v1/tenants/KEY; a live dashboard at /. With no "
    "FACTORY, the bundled example kernel. Every setting has a flag, a CORRAL_* "
    "environment variable and a key in the config file (flag > variable > file > "
    "default). Bad settings, a factory that cannot be loaded and a sandbox the host "
    "cannot give exit with status 2."
)
EXIT_USAGE = 2
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "color_message"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from corral.server._options import add_flags

    add_flags(parser)


class _Formatter(logging.Formatter):
    """A record's message plus the fields corral attaches (``extra=``), each as
    ``key=value`` unless the message already has that text."""

    def __init__(self, as_json: bool) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.as_json = as_json

    def format(self, record: logging.LogRecord) -> str:
        fields = {k: v for k, v in vars(record).items() if k not in _STANDARD}
        if self.as_json:
            entry = {
                "time": self.formatTime(record),
                "level": record.levelname,
                "logger": record.name,
                "message": record.getMessage(),
                **fields,
            }
            if record.exc_info:
                entry["exception"] = self.formatException(record.exc_info)
            return json.dumps(entry, default=str)
        line = super().format(record)
        message = record.getMessage()
        pairs = (f"{k}={v}" for k, v in fields.items())
        return line + "".join(f" {pair}" for pair in pairs if pair not in message)


def run(args: argparse.Namespace) -> int:
    """``corral serve``: the exit status (0 after a graceful stop, 2 for anything refused
    before serving, 1 if uvicorn could not serve)."""
    try:
        import uvicorn

        from corral.server import create_app
        from corral.server._options import resolve
    except ImportError as exc:
        return _refuse(f"needs the server extra: pip install 'corral[server]' ({exc})")
    try:
        server, options = resolve(args, os.environ)
        if server["ray"] is not None:
            if importlib.util.find_spec("ray") is None:
                return _refuse("--ray needs Ray: pip install 'corral[ray]'")
            if _is_local_ray(server["ray"], os.environ):
                # Before Ray is imported (its constants are read then); see the docstring.
                os.environ.setdefault(_RAY_KEEP_LOOPBACK, "0")
        app = create_app(
            server["factory"],
            options=options,
            max_body_bytes=server["max_body_bytes"],
            auth_token=server["auth_token"],
            ray_address=server["ray"],
            ray_namespace=server["ray_namespace"],
            ray_on_exit=server["ray_on_exit"],
        )
    except (ValueError, TypeError) as exc:
        return _refuse(str(exc))
    except ImportError as exc:  # Ray is there but does not import
        return _refuse(f"--ray needs Ray: pip install 'corral[ray]' ({exc})")
    from corral.server._http import RequestIdFilter

    level = str(server["log_level"])
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter(server["log_format"] == "json"))
    handler.addFilter(RequestIdFilter())
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    host, port = str(server["host"]), int(server["port"])
    if server["auth_token"] is None and not _is_loopback(host):
        logging.getLogger("corral.server").warning(
            "listening on %s without --auth-token: anyone who can reach this port can "
            "call every tenant's kernel; set CORRAL_AUTH_TOKEN, or keep it on loopback "
            "behind a proxy that authenticates",
            host,
        )
    try:
        sock = _listen(host, port)
    except OSError as exc:
        return _refuse(f"cannot listen on {host}:{port}: {exc.strerror or exc}")
    config = uvicorn.Config(
        app,
        lifespan="off",  # the gateway's lifespan runs in _serve(), around uvicorn
        log_config=None,  # ours (above)
        log_level=level,
        access_log=False,  # the gateway logs each request itself, with its request id
        timeout_graceful_shutdown=math.ceil(float(server["grace"])),
    )
    # A SIGTERM before the loop runs ends the command at once (there is nothing to stop).
    signal.signal(signal.SIGTERM, lambda _signum, _frame: sys.exit(0))
    with sock:
        return asyncio.run(_serve(app, uvicorn.Server(config), sock, host))


async def _serve(app: Starlette, uv: uvicorn.Server, sock: socket.socket, host: str) -> int:
    """Start the gateway (factory check, supervisor), serve until SIGTERM or Ctrl-C, then
    close it.

    **Cancellation:** a SIGTERM (or Ctrl-C) during the start cancels it; the start leaves
    nothing running (``Supervisor.start``'s guarantee) and the exit status is 0 (130).
    """
    from corral.errors import CorralError

    gateway = app.state.gateway
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    assert main is not None
    terminated: list[int] = []  # the SIGTERM that cancelled the start, if one did

    def terminate() -> None:
        terminated.append(signal.SIGTERM)
        main.cancel()

    loop.add_signal_handler(signal.SIGTERM, terminate)
    try:
        async with contextlib.AsyncExitStack() as stack:
            try:
                await stack.enter_async_context(gateway.lifespan(app))
            except asyncio.CancelledError:
                if terminated:
                    return 0  # a SIGTERM while starting; a Ctrl-C goes on as KeyboardInterrupt
                raise
            except (CorralError, ValueError, OSError) as exc:
                # StartError: the factory check failed, or a sandbox layer or memory limit
                # the host cannot give; ValueError: a limit below a worker's baseline.
                return _refuse(str(exc))
            loop.remove_signal_handler(signal.SIGTERM)
            # uvicorn handles SIGTERM and SIGINT while it serves, then raises them again
            # once it is done: with these in place that is harmless, and the supervisor
            # is closed below (leaving the context) whichever signal it was.
            for signum in (signal.SIGTERM, signal.SIGINT):
                signal.signal(signum, lambda _signum, _frame: None)
            shown = f"[{host}]" if ":" in host else host
            print(f"corral serve: ready on http://{shown}:{sock.getsockname()[1]}/", flush=True)
            await uv.serve(sockets=[sock])
    finally:
        with contextlib.suppress(RuntimeError):  # already removed, or the loop is closing
            loop.remove_signal_handler(signal.SIGTERM)
    return 0 if uv.started else 1


_RAY_KEEP_LOOPBACK = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def _is_local_ray(address: str, environ: Mapping[str, str]) -> bool:
    """Whether ``--ray ADDRESS`` is a cluster on this host's loopback address. ``auto`` is
    resolved as Ray resolves it: ``RAY_ADDRESS``, else the address file of the cluster
    started last on this host. A Ray Client address (``ray://``) never is: the driver
    then runs on the cluster."""
    if address == "auto":
        address = environ.get("RAY_ADDRESS") or ""
        if not address:
            temp = environ.get("RAY_TMPDIR") or environ.get("TMPDIR") or "/tmp"
            try:
                with open(os.path.join(temp, "ray", "ray_current_cluster")) as file:
                    address = file.read().strip()
            except OSError:
                return False
    if not address or address.startswith("ray://") or address == "auto":
        return False
    host = address.rpartition(":")[0] or address
    return _is_loopback(host)


def _is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ``::1``)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _refuse(message: str) -> int:
    """Refuse to serve: one line on stderr, exit status 2."""
    print(f"corral serve: error: {_one_line(message)}", file=sys.stderr)
    return EXIT_USAGE


def _listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket. Made with proto=IPPROTO_TCP (``socket.create_server``
    leaves it 0): asyncio sets TCP_NODELAY only on sockets that say they are TCP, and
    without it a response written in two parts waits ~40 ms for a delayed ACK."""
    info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    family, kind, proto, _name, address = info[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind(address)
        sock.listen(1024)
    except OSError:
        sock.close()
        raise
    return sock
