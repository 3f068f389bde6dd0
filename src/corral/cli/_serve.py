"""``corral serve``: the HTTP gateway (``corral.server``) under uvicorn.

Settings come from, in increasing priority: the Supervisor's defaults, the config
file's ``[server]`` and ``[supervisor]`` tables (``--config``), and the flags. One line
``corral serve: ready on http://HOST:PORT/`` goes to stdout once the supervisor has
started (the socket is bound before, so a client may connect at once). SIGTERM or
Ctrl-C stops accepting, lets calls in flight finish for up to ``--grace`` seconds, then
closes the supervisor (which drains and stops every worker).

Logs go to stderr, one line per record, corral's fields (tenant, pid, reason, ...)
appended as ``key=value`` (``--log-format json``: one JSON object per line).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import signal
import socket
import sys
from pathlib import Path
from typing import Any

DESCRIPTION = (
    "Serve tenants' kernels over HTTP: POST /v1/tenants/KEY/call/METHOD with "
    '{"args": [...], "kwargs": {...}}; GET /v1/workers, /v1/events, /healthz, /metrics; '
    "DELETE /v1/tenants/KEY; a live dashboard at /. With no FACTORY, the bundled example "
    "kernel. Every Supervisor option has a flag (and a key in the config file's "
    "[supervisor] table)."
)
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "color_message"}
_SERVER_KEYS = {"host", "port", "factory", "max_body_bytes", "grace", "log_level", "log_format"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from corral.server._options import add_flags

    parser.add_argument(
        "factory", metavar="FACTORY", nargs="?", help="'package.module:callable' (optional)"
    )
    parser.add_argument("--host", help="address to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (default: 8000; 0: any free port)")
    parser.add_argument("--config", type=Path, metavar="FILE", help="a TOML config file")
    parser.add_argument("--max-body-bytes", metavar="SIZE", help="default: 1MiB")
    parser.add_argument(
        "--grace", type=float, metavar="SECONDS", help="for calls in flight at shutdown (30)"
    )
    parser.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
    parser.add_argument("--log-format", choices=("text", "json"))
    add_flags(parser)


class _Formatter(logging.Formatter):
    """A record's message plus the fields corral attaches (``extra=``)."""

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
        return line + "".join(f" {k}={v}" for k, v in fields.items())


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from corral.server import DEFAULT_FACTORY, create_app
        from corral.server._options import from_flags, from_toml, parse_size
    except ImportError as exc:
        print(
            f"corral serve needs the server extra: pip install 'corral[server]' ({exc})",
            file=sys.stderr,
        )
        return 2
    try:
        server: dict[str, Any] = {}
        options: dict[str, Any] = {}
        if args.config is not None:
            server, options = from_toml(args.config.read_text())
            unknown = set(server) - _SERVER_KEYS
            if unknown:
                raise ValueError(f"config file: unknown server setting(s) {sorted(unknown)}")
        options.update(from_flags(args))
        flags = {key: getattr(args, key) for key in _SERVER_KEYS}
        server.update({key: value for key, value in flags.items() if value is not None})
        body = server.get("max_body_bytes", "1MiB")
        max_body = parse_size(body) if isinstance(body, str) else int(body)
        app = create_app(
            server.get("factory") or DEFAULT_FACTORY, options=options, max_body_bytes=max_body
        )
    except (OSError, ValueError, TypeError) as exc:
        print(f"corral serve: {exc}", file=sys.stderr)
        return 2
    level = str(server.get("log_level", "info"))
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter(server.get("log_format") == "json"))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    host, port = str(server.get("host", "127.0.0.1")), int(server.get("port", 8000))
    try:
        sock = _listen(host, port)
    except OSError as exc:
        print(f"corral serve: cannot listen on {host}:{port}: {exc}", file=sys.stderr)
        return 1
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    app.state.gateway.on_ready = lambda: print(
        f"corral serve: ready on http://{shown}:{bound}/", flush=True
    )
    config = uvicorn.Config(
        app,
        lifespan="on",
        log_config=None,  # ours (above)
        log_level=level,
        access_log=level == "debug",
        timeout_graceful_shutdown=math.ceil(float(server.get("grace", 30.0))),
    )
    uv = uvicorn.Server(config)
    # uvicorn handles SIGTERM during serve() (a graceful shutdown), then raises it again
    # with our handler back in place: exit 0 then, as for a SIGTERM before uvicorn runs.
    signal.signal(signal.SIGTERM, lambda _signum, _frame: sys.exit(0))
    with sock:
        asyncio.run(uv.serve(sockets=[sock]))
    return 0 if uv.started else 1


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
