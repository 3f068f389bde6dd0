"""Embedding corral in a threaded WSGI app (Flask) through SyncSupervisor.

    python examples/embed_flask.py [--port N]            # N = 0: any free port

    curl -X POST localhost:8000/notes/alice -H 'content-type: application/json' \\
         -d '{"key": "colour", "value": "teal"}'
    curl localhost:8000/notes/alice/colour

One SyncSupervisor serves every request thread: each call blocks only the thread that
makes it, and any number of threads may call at once. It is started before the server
takes requests and closed when the server stops (Ctrl-C or SIGTERM), which stops every
worker. Each tenant's notes live in that tenant's own worker process, in memory, so
they are gone once its worker is stopped (idle TTL, LRU eviction).

Closing matters: a running SyncSupervisor has a (non-daemon) loop thread, so a process
that never calls ``close()`` does not exit, and ``atexit`` handlers run only after
Python has waited for such threads: too late to close it. Under another WSGI server,
start and close it in that server's per-process hooks (gunicorn: ``post_worker_init``
and ``worker_exit``), after any fork, never in a parent that forks afterwards.
"""

from __future__ import annotations

import argparse
import logging
import math
import signal
import sys
from typing import Any

from flask import Flask, request
from flask.typing import ResponseReturnValue
from werkzeug.serving import make_server

import corral

# Made once, with the app. Constructing it starts nothing (no thread, no process):
# start() does, in main() below.
supervisor = corral.SyncSupervisor(
    "corral.examples.demo:create", max_workers=16, idle_ttl=300.0, call_timeout=5.0
)

app = Flask(__name__)


def problem(
    status: int, kind: str, message: str, tenant: str | None, headers: dict[str, str] | None = None
) -> tuple[dict[str, Any], int, dict[str, str]]:
    """An error answer: ``{"error": {"type", "message", "tenant"}}`` (as corral serve's)."""
    return {"error": {"type": kind, "message": message, "tenant": tenant}}, status, headers or {}


@app.post("/notes/<tenant>")
def put_note(tenant: str) -> ResponseReturnValue:
    """Store ``{"key": "...", "value": ...}`` in the tenant's notebook."""
    body = request.get_json(silent=True)
    if not isinstance(body, dict) or not isinstance(body.get("key"), str) or "value" not in body:
        return problem(400, "BadRequest", 'expected {"key": "...", "value": ...}', tenant)
    # Runs Notebook.put(key, value) in this tenant's worker (started on first use);
    # corral's errors go to corral_error() below.
    count = supervisor.call(tenant, "put", body["key"], body["value"])
    return {"tenant": tenant, "notes": count}


@app.get("/notes/<tenant>/<key>")
def get_note(tenant: str, key: str) -> ResponseReturnValue:
    try:
        value = supervisor.call(tenant, "get", key)
    except corral.KernelError as exc:
        # The kernel raised. Its exception arrives as text (type name, message), never as
        # a Python object: a KeyError is this kernel's way of saying "no such note".
        if exc.remote_type == "builtins.KeyError":
            return problem(404, "NoSuchNote", f"{tenant} has no note {key!r}", tenant)
        raise
    return {"tenant": tenant, "key": key, "value": value}


@app.errorhandler(corral.CorralError)
def corral_error(exc: corral.CorralError) -> ResponseReturnValue:
    """corral's errors as HTTP statuses (the mapping of ``corral.server.error_response``,
    which answers with a Starlette response, so a Flask app does its own)."""
    tenant = (request.view_args or {}).get("tenant")
    if isinstance(exc, corral.KernelError):
        status = 422  # the kernel raised; its worker is still up
    elif isinstance(exc, corral.InvalidCallError):
        status = 400  # arguments it cannot carry, too large, ...
    elif isinstance(exc, corral.CallTimeoutError):
        status = 504
    elif isinstance(
        exc,
        corral.BackoffError
        | corral.MemoryPressureError
        | corral.CapacityError
        | corral.SupervisorClosedError,
    ):
        status = 503  # refused before any worker saw it: try again later
    else:
        status = 502  # the worker crashed, misbehaved or was stopped during the call
    retry_after = getattr(exc, "retry_after", None)  # BackoffError, MemoryPressureError
    headers = {"Retry-After": str(max(1, math.ceil(retry_after)))} if retry_after else {}
    return problem(status, type(exc).__name__, str(exc), tenant, headers)


def _exit(_signum: int, _frame: object) -> None:
    sys.exit(0)  # raises SystemExit in the main thread: the server loop unwinds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="A Flask app that embeds corral.")
    parser.add_argument("--port", type=int, default=8000, help="0: any free port")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)  # corral logs each worker's start and stop
    # werkzeug's development server, one thread per request. make_server() binds now,
    # so that with --port 0 we know which port we got.
    server = make_server("127.0.0.1", args.port, app, threaded=True)
    supervisor.start()
    try:
        # SIGTERM (a service manager, kill) unwinds like Ctrl-C, through the finally.
        signal.signal(signal.SIGTERM, _exit)
        print(f"embed_flask: ready on http://127.0.0.1:{server.server_port}/", flush=True)
        server.serve_forever()  # returns on Ctrl-C; closes the socket either way
    finally:
        supervisor.close()  # stops every worker; returns once they are gone


if __name__ == "__main__":
    main()
