"""Embedding corral in an existing Starlette app: one Supervisor for the app's lifetime.

    uvicorn examples.embed_starlette:app [--port N]      # N = 0: any free port

    curl -X POST localhost:8000/notes/alice -d '{"key": "colour", "value": "teal"}'
    curl localhost:8000/notes/alice/colour

The supervisor starts in the app's lifespan, before the first request is served, and is
closed there when the server shuts down (Ctrl-C or SIGTERM): calls in flight finish,
then every worker stops. Each tenant's notes live in that tenant's own worker process,
in memory, so they are gone once its worker is stopped (idle TTL, LRU eviction). Any
ASGI server that runs lifespans serves ``app`` the same way.

The kernel is the bundled example one; a real application passes its own factory, e.g.
``corral.Supervisor("myapp.plugins:load_kernel")``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

import corral
from corral.server import error_response  # corral's errors -> HTTP statuses (as the gateway)

# corral logs each worker's start and stop on the "corral" logger (uvicorn configures only
# its own loggers).
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    sup = corral.Supervisor(
        "corral.examples.demo:create", max_workers=16, idle_ttl=300.0, call_timeout=5.0
    )
    await sup.start()  # a bad option or an unusable sandbox fails here, before serving
    app.state.kernels = sup
    try:
        yield  # the app serves requests
    finally:
        await sup.aclose()  # drains calls in flight, then stops every worker


def kernels(request: Request) -> corral.Supervisor:
    sup: corral.Supervisor = request.app.state.kernels
    return sup


def problem(status: int, kind: str, message: str, tenant: str) -> Response:
    """An error of the app's own, in the same shape as ``error_response``'s."""
    return JSONResponse({"error": {"type": kind, "message": message, "tenant": tenant}}, status)


async def put_note(request: Request) -> Response:
    """``POST /notes/{tenant}`` with ``{"key": "...", "value": ...}``: store a note."""
    tenant = request.path_params["tenant"]
    try:
        body: Any = await request.json()
        key, value = body["key"], body["value"]
    except (ValueError, TypeError, KeyError):  # not JSON, not an object, fields missing
        return problem(400, "BadRequest", 'expected {"key": ..., "value": ...}', tenant)
    try:
        # Runs Notebook.put(key, value) in this tenant's worker (started on first use). The
        # kernel, not the app, decides which keys it takes: one it cannot use (a list)
        # comes back as a KernelError, answered 422 by error_response.
        count = await kernels(request).call(tenant, "put", key, value)
    except corral.CorralError as exc:  # crashed, timed out, backoff, ...: see error_response
        return error_response(exc, tenant)
    return JSONResponse({"tenant": tenant, "notes": count})


async def get_note(request: Request) -> Response:
    """``GET /notes/{tenant}/{key}``: one note, or 404."""
    tenant, key = request.path_params["tenant"], request.path_params["key"]
    try:
        value = await kernels(request).call(tenant, "get", key)
    except corral.KernelError as exc:
        # The kernel raised. Its exception arrives as text (type name, message), never as
        # a Python object: a KeyError is this kernel's way of saying "no such note".
        if exc.remote_type == "builtins.KeyError":
            return problem(404, "NoSuchNote", f"{tenant} has no note {key!r}", tenant)
        return error_response(exc, tenant)  # any other kernel error: 422
    except corral.CorralError as exc:
        return error_response(exc, tenant)
    return JSONResponse({"tenant": tenant, "key": key, "value": value})


app = Starlette(
    routes=[
        Route("/notes/{tenant}", put_note, methods=["POST"]),
        Route("/notes/{tenant}/{key}", get_note, methods=["GET"]),
    ],
    lifespan=lifespan,
)
