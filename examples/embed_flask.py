"""Embedding corral in a threaded WSGI app (Flask) through SyncSupervisor.

    flask --app examples/embed_flask run [--port N]      # N = 0: any free port

    curl -X POST localhost:5000/notes/alice -H 'content-type: application/json' \\
         -d '{"key": "colour", "value": "teal"}'
    curl localhost:5000/notes/alice/colour

Any WSGI server serves it the same way, from the app factory, e.g.
``gunicorn 'examples.embed_flask:create_app()'``.

One SyncSupervisor serves every request thread: each call blocks only the thread that
makes it, and any number of threads may call at once. Each tenant's notes live in that
tenant's own worker process, in memory, so they are gone once its worker is stopped
(idle TTL, LRU eviction).

**When it starts and stops.** The supervisor is made with the app, which starts nothing
(no thread, no process), and is started by the first request that needs it: in the
process that serves, after any fork. That matters because WSGI servers load apps in
processes that never serve: ``flask run --reload`` loads the app in its watcher process
too, and a server that preloads the app forks its workers afterwards (a thread does not
survive a fork, so a supervisor started before it would hang every call). Once started,
SyncSupervisor closes itself when the process exits normally (Ctrl-C under ``flask run``,
a server's graceful stop): every worker is asked to stop and its ``shutdown()`` runs. A
process killed outright (SIGKILL, or SIGTERM under ``flask run``, which has no handler
for it) takes its workers down with it too: corral's warden kills them when its host
goes, without running their ``shutdown()``.

corral's errors are answered as ``corral serve`` answers them, through the gateway's own
:func:`corral.server.error_response` (so this app needs the ``server`` extra as well).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from flask import Flask, Response, current_app, request
from flask.typing import ResponseReturnValue

import corral
from corral.server import error_response  # corral's errors -> HTTP statuses (as the gateway)

# corral logs each worker's start and stop on the "corral" logger; configured before the
# app is made, as Flask advises.
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")


class Kernels:
    """The app's one SyncSupervisor, started by the first request that asks for it and
    never started again once it was (after its close at exit, calls get
    ``SupervisorClosedError``: 503)."""

    def __init__(self, supervisor: corral.SyncSupervisor) -> None:
        self._supervisor = supervisor
        self._lock = threading.Lock()
        self._started = False  # True from the first successful start() on

    def get(self) -> corral.SyncSupervisor:
        with self._lock:  # concurrent first requests: one starts it, the others wait
            if not self._started:
                self._supervisor.start()  # closes itself at exit from now on
                self._started = True
        return self._supervisor


def kernels() -> corral.SyncSupervisor:
    """The current app's supervisor, running."""
    found: Kernels = current_app.extensions["corral"]
    return found.get()


def problem(status: int, kind: str, message: str, tenant: str) -> ResponseReturnValue:
    """An error of the app's own, in the shape of ``error_response``'s:
    ``{"error": {"type", "message", "tenant"}}``."""
    return {"error": {"type": kind, "message": message, "tenant": tenant}}, status


def put_note(tenant: str) -> ResponseReturnValue:
    """``POST /notes/<tenant>`` with ``{"key": ..., "value": ...}``: store a note."""
    body: Any = request.get_json(silent=True)
    if not isinstance(body, dict) or "key" not in body or "value" not in body:
        return problem(400, "BadRequest", 'expected {"key": ..., "value": ...}', tenant)
    # Runs Notebook.put(key, value) in this tenant's worker (started on first use). The
    # kernel, not the app, decides which keys it takes: one it cannot use (a list)
    # comes back as a KernelError, answered 422 by corral_error() below.
    count = kernels().call(tenant, "put", body["key"], body["value"])
    return {"tenant": tenant, "notes": count}


def get_note(tenant: str, key: str) -> ResponseReturnValue:
    """``GET /notes/<tenant>/<key>``: one note, or 404."""
    try:
        value = kernels().call(tenant, "get", key)
    except corral.KernelError as exc:
        # The kernel raised. Its exception arrives as text (type name, message), never as
        # a Python object: a KeyError is this kernel's way of saying "no such note".
        if exc.remote_type == "builtins.KeyError":
            return problem(404, "NoSuchNote", f"{tenant} has no note {key!r}", tenant)
        raise  # any other kernel error: corral_error(), 422
    return {"tenant": tenant, "key": key, "value": value}


def corral_error(exc: corral.CorralError) -> ResponseReturnValue:
    """Any corral error a view let through, answered as the gateway answers it: the same
    status, ``Retry-After`` and JSON body (``error_response`` builds a Starlette response;
    its parts carry over as they are)."""
    tenant = str((request.view_args or {}).get("tenant", ""))
    answer = error_response(exc, tenant)
    return Response(bytes(answer.body), answer.status_code, headers=list(answer.headers.items()))


def create_app() -> Flask:
    """The app (``flask --app`` finds this factory). Starts nothing: see the module
    docstring."""
    app = Flask(__name__)
    supervisor = corral.SyncSupervisor(
        "corral.examples.demo:create", max_workers=16, idle_ttl=300.0, call_timeout=5.0
    )
    app.extensions["corral"] = Kernels(supervisor)
    app.add_url_rule("/notes/<tenant>", view_func=put_note, methods=["POST"])
    app.add_url_rule("/notes/<tenant>/<key>", view_func=get_note, methods=["GET"])
    app.register_error_handler(corral.CorralError, corral_error)
    return app
