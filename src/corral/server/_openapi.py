"""The gateway's OpenAPI 3.1 document, served at ``GET /openapi.json``.

The operations (summary, parameters, statuses) are written here, one per route and
method; the body schemas are generated from the types the gateway encodes
(``SupervisorStats``, ``WorkerEvent``) and decodes (``CallBody``) by msgspec, so they
cannot drift from what is sent. :func:`openapi_document` builds the document from the
app's own routes and fails if one has no operation here (so a new route cannot go
undocumented). ``tests/server/test_openapi.py`` validates the result.

Not here: the routes themselves (``_app``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import msgspec

from corral import TENANT_MAX_BYTES, TENANT_RULE, SupervisorStats, WorkerEvent, WorkerInfo

__all__ = ["openapi_document"]

_REF = "#/components/schemas/{name}"
_JSON = "application/json"


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": _REF.format(name=name)}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {_JSON: {"schema": schema}}}


def _error(description: str) -> dict[str, Any]:
    return _json(_ref("Error"), description)


_TENANT = {
    "name": "key",
    "in": "path",
    "required": True,
    "description": f"The tenant key: {TENANT_RULE}. Any other key gets 400.",
    "schema": {
        "type": "string",
        "minLength": 1,
        "maxLength": TENANT_MAX_BYTES,
        "pattern": rf"^[A-Za-z0-9][A-Za-z0-9._:@+-]{{0,{TENANT_MAX_BYTES - 1}}}$",
    },
}
_METHOD = {
    "name": "method",
    "in": "path",
    "required": True,
    "description": "A public method of the tenant's kernel (no leading underscore).",
    "schema": {"type": "string"},
}
_REQUEST_ID = {
    "name": "X-Request-ID",
    "in": "header",
    "required": False,
    "description": "Kept if 1 to 128 characters of A-Z a-z 0-9 . _ : + = @ / -, else "
    "replaced; echoed on every response and in the gateway's log lines about the call.",
    "schema": {"type": "string", "maxLength": 128, "pattern": r"^[A-Za-z0-9._:+=@/-]{1,128}$"},
}
_RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait.", "schema": {"type": "integer"}}}

_UNAVAILABLE = {"503": _error("The gateway is starting or stopping.")}

_OPERATIONS: dict[tuple[str, str], dict[str, Any]] = {
    ("/", "GET"): {
        "summary": "The live dashboard (HTML). Needs no token; its script does.",
        "responses": {
            "200": {"description": "The page.", "content": {"text/html": {"schema": {}}}}
        },
    },
    ("/healthz", "GET"): {
        "summary": "Liveness: 200 while the supervisor runs. Needs no token.",
        "responses": {
            "200": _json(_ref("Health"), "The supervisor runs."),
            "503": _json(_ref("Health"), "It does not (starting, stopping)."),
        },
    },
    ("/readyz", "GET"): {
        "summary": "Readiness: 200 while a new tenant can be served. Needs no token.",
        "responses": {
            "200": _json(_ref("Ready"), "Ready."),
            "503": _json(_ref("Unready"), "Not ready, and why."),
        },
    },
    ("/metrics", "GET"): {
        "summary": "Prometheus metrics (text exposition format).",
        "responses": {
            "200": {"description": "The metrics.", "content": {"text/plain": {"schema": {}}}}
        },
    },
    ("/openapi.json", "GET"): {
        "summary": "This document.",
        "responses": {"200": _json({"type": "object"}, "OpenAPI 3.1.")},
    },
    ("/v1/workers", "GET"): {
        "summary": "The supervisor's statistics, with the memory limits and the time.",
        "responses": {"200": _json(_ref("Workers"), "The snapshot."), **_UNAVAILABLE},
    },
    ("/v1/events", "GET"): {
        "summary": "The most recent lifecycle events, newest last.",
        "responses": {"200": _json(_ref("Events"), "Up to 200 events.")},
    },
    ("/v1/tenants/{key}", "DELETE"): {
        "summary": "Stop the tenant's worker, if it has one.",
        "parameters": [_TENANT],
        "responses": {
            "200": _json(_ref("Evicted"), "Whether a worker was stopped."),
            "400": _error("The key breaks the tenant-key rule."),
            **_UNAVAILABLE,
        },
    },
    ("/v1/tenants/{key}/reload", "POST"): {
        "summary": "Replace the tenant's worker with one started anew (its policy asked "
        "again: a new version); the old one finishes its calls in flight.",
        "parameters": [_TENANT],
        "responses": {
            "200": _json(_ref("Reloaded"), "The new worker, or reloaded false if none."),
            "400": _error("The key breaks the tenant-key rule."),
            "501": _error("Not over a Ray cluster (--ray)."),
            "502": _error("The new worker failed to start; the old one still serves."),
            **_UNAVAILABLE,
        },
    },
    ("/v1/tenants/{key}/call/{method}", "POST"): {
        "summary": "Call a method of the tenant's kernel, starting its worker if needed.",
        "parameters": [_TENANT, _METHOD],
        "requestBody": {
            "required": False,
            "description": "Positional and keyword arguments; an empty body means none.",
            "content": {_JSON: {"schema": _ref("CallBody")}},
        },
        "responses": {
            "200": _json(_ref("Result"), "What the method returned."),
            "400": _error("Bad JSON, bad arguments, or a key that breaks the rule."),
            "404": _error("No such public method."),
            "413": _error("The body is over --max-body-bytes."),
            "422": _error("The kernel raised (remote_type names the exception)."),
            "500": _error("The result could not be sent back."),
            "502": _error("The worker crashed, failed to start, or was stopped."),
            "503": {
                **_error("Backoff, memory pressure, no free slot, or shutting down."),
                "headers": _RETRY_AFTER,
            },
            "504": _error("The call ran past --call-timeout; the worker was stopped."),
        },
    },
}


class Result(msgspec.Struct):
    """A call's answer: the method's return value, as JSON."""

    result: Any


class Evicted(msgspec.Struct):
    tenant: str
    evicted: bool


class Reloaded(msgspec.Struct):
    tenant: str
    reloaded: bool  # False: the tenant had no worker (nothing to reload)
    worker: WorkerInfo | None  # the new worker


class Events(msgspec.Struct):
    events: list[WorkerEvent]


class Health(msgspec.Struct):
    status: str
    workers: int | None = None


class Ready(msgspec.Struct):
    status: str
    workers: int
    max_workers: int


class Unready(msgspec.Struct):
    status: str
    reason: str


class ErrorDetail(msgspec.Struct):
    """``type`` is corral's error class (``KernelError``, ``BackoffError``...) or the
    gateway's (``BadJSON``, ``BodyTooLarge``, ``Unauthorized``, ``NotFound``,
    ``MethodNotAllowed``...); other fields depend on it (``tenant``, ``remote_type``,
    ``retry_after``, ``rule``, ``allowed``)."""

    type: str
    message: str


class Error(msgspec.Struct):
    """Every error answer, whatever the status."""

    error: ErrorDetail


_NODE = {  # corral.cluster.NodeStats, written out: importing it would import Ray
    "type": "object",
    "properties": {
        "node": {"type": "string", "description": "Ray node id (hex)."},
        "address": {"type": "string", "description": "The node's IP address."},
        "state": {"enum": ["starting", "up", "failed", "lost"]},
        "placed": {"type": "integer", "description": "Tenants placed on it."},
        "workers": {"type": "integer", "description": "Live workers, as last reported."},
        "max_workers": {"type": "integer"},
        "memory_pressure": {"type": ["string", "null"]},
        "error": {"type": ["string", "null"], "description": "Why its agent could not start."},
    },
    "required": ["node", "address", "state", "placed", "workers", "max_workers"],
}


def _components() -> dict[str, Any]:
    from corral.server._app import CallBody  # what the call route decodes

    types = (
        CallBody,
        Result,
        Evicted,
        Reloaded,
        Events,
        Health,
        Ready,
        Unready,
        Error,
        SupervisorStats,
    )
    _, schemas = msgspec.json.schema_components(types, ref_template=_REF)
    schemas["ErrorDetail"]["additionalProperties"] = True
    schemas["Workers"] = {
        "allOf": [
            _ref("SupervisorStats"),
            {
                "type": "object",
                "properties": {
                    "limits": {
                        "type": "object",
                        "properties": {
                            "soft": {"type": ["integer", "null"]},
                            "hard": {"type": ["integer", "null"]},
                        },
                    },
                    "now": {"type": "number", "description": "The gateway's time.time()."},
                    "nodes": {
                        "type": "array",
                        "description": "With --ray only (a ClusterStats): every node the "
                        "cluster's directory knows. Each worker then also has node (the "
                        "Ray node id) and node_address.",
                        "items": _NODE,
                    },
                    "node_sandbox": {
                        "type": "object",
                        "description": "With --ray only: each node's sandbox layers.",
                        "additionalProperties": {"type": "object"},
                    },
                    "placements": {
                        "type": "integer",
                        "description": "With --ray only: tenants placed cluster-wide.",
                    },
                },
                "required": ["limits", "now"],
            },
        ]
    }
    return schemas


def openapi_document(
    routes: Iterable[tuple[str, Iterable[str]]], *, version: str, auth: bool
) -> dict[str, Any]:
    """The document for ``routes`` (path, methods), ``HEAD`` left out.

    Args:
        routes: each route's path and methods, as the app has them.
        version: the gateway's version (``info.version``).
        auth: whether a bearer token is required (then every operation but the open
            paths says so, and may answer 401).

    Raises:
        KeyError: a route with no operation written here.
    """
    from corral.server._http import OPEN_PATHS

    paths: dict[str, dict[str, Any]] = {}
    for path, methods in routes:
        for method in sorted(set(methods) - {"HEAD"}):
            operation = dict(_OPERATIONS[(path, method)])
            operation["parameters"] = [*operation.get("parameters", ()), _REQUEST_ID]
            if auth and path not in OPEN_PATHS:
                operation["responses"] = {
                    **operation["responses"],
                    "401": _error("No bearer token, or a wrong one."),
                }
            else:
                operation["security"] = []
            paths.setdefault(path, {})[method.lower()] = operation
    document: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {
            "title": "corral gateway",
            "version": version,
            "description": "Each tenant's kernel in its own supervised worker process. "
            "Every response carries X-Request-ID; every error is JSON: "
            '{"error": {"type": ..., "message": ...}}.',
        },
        "paths": paths,
        "components": {"schemas": _components()},
    }
    if auth:
        document["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        document["security"] = [{"bearer": []}]
    return document
