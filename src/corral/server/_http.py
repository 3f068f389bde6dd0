"""What every request to the gateway goes through around its route: a request id, the
bearer token, the tenant key in the path, JSON error bodies and one log line.

:class:`GatewayMiddleware` wraps the whole Starlette app (so it sees every response,
404, 405 and 500 included) and, in this order:

1. takes the client's ``X-Request-ID`` if it is sane (1 to 128 characters from
   ``A-Z a-z 0-9 . _ : + = @ / -``), else makes one (32 hex digits), and echoes it on
   the response, whatever the status;
2. with a token configured, refuses a request without ``Authorization: Bearer TOKEN``
   (compared in constant time) with 401 and ``WWW-Authenticate: Bearer``, except for
   the paths that need none (:data:`OPEN_PATHS`);
3. refuses a path under ``/v1/tenants/`` whose key breaks the tenant-key rule with a
   JSON 400 naming the rule, before any route is matched (so ``/v1/tenants/a/b`` is a
   bad key, not an unknown route);
4. logs one line when the response is done: method, path (percent-encoded and cut),
   status, time, request id, and what the route added (:func:`annotate`): tenant,
   error type, pid, reason. DEBUG, or WARNING for a 5xx.

The request id is also given to every log record made while the request is in flight,
whatever logger made it (:class:`RequestIdFilter`, installed on ``corral serve``'s
handler): a worker that a call starts logs ``worker ready`` with that call's id.

Not here: the routes and corral's errors as statuses (``_app``), the log format
(``corral.cli._serve``).
"""

from __future__ import annotations

import asyncio
import contextvars
import hmac
import logging
import math
import re
import time
import urllib.parse
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import msgspec
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from corral import TENANT_RULE, check_tenant
from corral.errors import InvalidCallError

__all__ = [
    "OPEN_PATHS",
    "GatewayMiddleware",
    "RequestIdFilter",
    "annotate",
    "json_error",
    "json_response",
    "loggable",
]

log = logging.getLogger("corral.server")

OPEN_PATHS = frozenset({"/", "/healthz", "/readyz"})
"""Paths served without the bearer token: the probes (an orchestrator's liveness and
readiness checks carry no secret) and the dashboard's page, which holds no data (its
script fetches ``/v1/workers`` and ``/v1/events`` with the token)."""

REQUEST_ID_HEADER = "X-Request-ID"
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:+=@/-]{1,128}")
_TENANTS = "/v1/tenants/"
_SUB = re.compile(r"(.*)/(?:call/[^/]*|reload)", re.S)  # a tenant's routes below its key
_LOGGED_PATH_CHARS = 200


@dataclass(eq=False)
class RequestContext:
    """One request, as log records made during it see it."""

    request_id: str  # e.g. "3f2b9c0e6a1d4e5f8a7b6c5d4e3f2a1b"
    task: asyncio.Task[Any] | None  # the task serving the request (its own log lines)
    in_flight: bool = True  # False once the response is done
    fields: dict[str, object] = field(default_factory=dict)  # e.g. {"tenant": "alice"}


_request: contextvars.ContextVar[RequestContext | None] = contextvars.ContextVar(
    "corral_server_request", default=None
)


def current_request() -> RequestContext | None:
    """The request the caller is serving, if one is in flight.

    A task started during a request (a worker's reader, started by the call that made
    the worker) inherits its context; once the response is done that task's records no
    longer belong to the request. The request's own task still does, so that the
    server's record of an exception that ended it carries the id too."""
    context = _request.get()
    if context is None:
        return None
    if context.in_flight:
        return context
    try:
        task = asyncio.current_task()
    except RuntimeError:  # no running loop: a thread
        return None
    return context if task is not None and task is context.task else None


def annotate(**fields: object) -> None:
    """Add ``key=value`` fields to the current request's log line (None is left out)."""
    context = current_request()
    if context is not None:
        context.fields.update((k, v) for k, v in fields.items() if v is not None)


class RequestIdFilter(logging.Filter):
    """Gives every record made while a request is in flight a ``request_id`` attribute
    (unless it has one). Put it on a handler: it then sees every logger's records."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            context = current_request()
            if context is not None:
                record.request_id = context.request_id
        return True


# -- responses ---------------------------------------------------------------------------------


def json_response(
    body: object, status: int = 200, headers: Mapping[str, str] | None = None
) -> Response:
    encoded = msgspec.json.encode(body)
    return Response(encoded, status, headers=dict(headers or {}), media_type="application/json")


def json_error(
    status: int,
    error_type: str,
    message: str,
    /,
    headers: Mapping[str, str] | None = None,
    **extra: Any,
) -> Response:
    """``{"error": {"type": error_type, "message": message, **extra}}``; a
    ``retry_after`` extra also becomes a ``Retry-After`` header (whole seconds, at
    least 1)."""
    headers = dict(headers or {})
    retry_after = extra.get("retry_after")
    if retry_after is not None:
        headers["Retry-After"] = str(max(1, math.ceil(retry_after)))
    body = {"error": {"type": error_type, "message": message, **extra}}
    return json_response(body, status, headers)


def tenant_error(exc: InvalidCallError) -> Response:
    """400 for a key that breaks the rule. The key itself is not echoed: the message
    shows at most its first 32 characters, escaped."""
    return json_error(400, type(exc).__name__, str(exc), kind="tenant", rule=TENANT_RULE)


async def http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own errors (no route: 404; a route without that method: 405) as JSON."""
    assert isinstance(exc, HTTPException)
    where = f"{request.method} {loggable(request.url.path)}"
    if exc.status_code == 404:
        return json_error(404, "NotFound", f"no route for {where}; see /openapi.json")
    if exc.status_code == 405:
        allowed = (exc.headers or {}).get("Allow", "")
        return json_error(
            405,
            "MethodNotAllowed",
            f"{where}: the method is not allowed here (allowed: {allowed})",
            headers=exc.headers,
            allowed=[m.strip() for m in allowed.split(",") if m.strip()],
        )
    return json_error(exc.status_code, "HTTPError", exc.detail, headers=exc.headers)


async def server_error(_request: Request, exc: Exception) -> Response:
    """A route that raised (a bug): 500 as JSON; the traceback goes to the log."""
    context = current_request()
    rid = f" (request id {context.request_id})" if context is not None else ""
    annotate(error=type(exc).__name__)
    return json_error(500, "InternalError", f"the gateway failed; its log has the traceback{rid}")


def loggable(text: str, limit: int = _LOGGED_PATH_CHARS) -> str:
    """``text`` fit for a log line or a message: percent-encoded (no control character,
    space, quote or non-ASCII letter survives) and cut to about ``limit`` characters."""
    quoted = urllib.parse.quote(text[: limit + 1], safe="/:@+.,-_~=;!*()$'")
    return quoted if len(quoted) <= limit else quoted[:limit] + "..."


# -- the middleware ----------------------------------------------------------------------------


class GatewayMiddleware:
    """See the module docstring.

    Args:
        app: the Starlette app.
        auth_token: the bearer token every request but :data:`OPEN_PATHS` must carry;
            None: no token needed.
    """

    def __init__(self, app: ASGIApp, auth_token: str | None = None) -> None:
        if auth_token is not None:
            check_auth_token(auth_token)
        self.app = app
        self._token = None if auth_token is None else auth_token.encode("ascii")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = _headers(scope)
        given = headers.get(b"x-request-id", b"").decode("latin-1")
        request_id = given if _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        try:
            task = asyncio.current_task()
        except RuntimeError:
            task = None
        context = RequestContext(request_id, task)
        _request.set(context)  # the task's own: uvicorn serves each request in a task
        status = 0
        started = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [
                    *message.get("headers", ()),
                    (b"x-request-id", request_id.encode("ascii")),
                ]
            await send(message)

        try:
            refusal = self._refusal(scope, headers, context)
            if refusal is not None:
                await refusal(scope, receive, send_with_id)
            else:
                await self.app(scope, receive, send_with_id)
        except BaseException as exc:
            context.fields.setdefault("error", type(exc).__name__)
            raise
        finally:
            context.in_flight = False
            _log_request(scope, context, status, time.perf_counter() - started)

    def _refusal(
        self, scope: Scope, headers: Mapping[bytes, bytes], context: RequestContext
    ) -> Response | None:
        path: str = scope["path"]
        if self._token is not None and path not in OPEN_PATHS:
            refusal = self._unauthorized(headers.get(b"authorization"))
            if refusal is not None:
                context.fields["error"] = "Unauthorized"
                return refusal
        if path.startswith(_TENANTS):
            rest = path[len(_TENANTS) :]
            below = _SUB.fullmatch(rest)
            tenant = below.group(1) if below else rest
            try:
                check_tenant(tenant)
            except InvalidCallError as exc:
                context.fields["error"] = "InvalidTenant"
                return tenant_error(exc)
            context.fields["tenant"] = tenant
        return None

    def _unauthorized(self, authorization: bytes | None) -> Response | None:
        assert self._token is not None
        scheme, _, presented = (authorization or b"").strip().partition(b" ")
        if authorization is None:
            why, challenge = "no Authorization header", 'Bearer realm="corral"'
        elif scheme.lower() != b"bearer":
            why, challenge = "the Authorization header is not Bearer", 'Bearer realm="corral"'
        elif hmac.compare_digest(presented.strip(), self._token):
            return None
        else:
            why = "the bearer token is wrong"
            challenge = 'Bearer realm="corral", error="invalid_token"'
        return json_error(
            401,
            "Unauthorized",
            f"{why}: this gateway needs Authorization: Bearer TOKEN (its --auth-token)",
            headers={"WWW-Authenticate": challenge},
        )


def check_auth_token(token: str) -> None:
    """Refuse a token that cannot travel in an ``Authorization`` header as is.

    Raises:
        ValueError: empty, or a character that is not visible ASCII (the token is not
            shown).
    """
    if not token:
        raise ValueError("the auth token is empty")
    if not all("!" <= c <= "~" for c in token):
        raise ValueError(
            "the auth token must be visible ASCII characters only (no space, control "
            "character or non-ASCII letter)"
        )


def _headers(scope: Scope) -> dict[bytes, bytes]:
    """Request headers by lower-case name; the first of repeated ones."""
    out: dict[bytes, bytes] = {}
    for name, value in scope["headers"]:
        out.setdefault(name.lower(), value)
    return out


def _log_request(scope: Scope, context: RequestContext, status: int, seconds: float) -> None:
    level = logging.WARNING if status >= 500 or status == 0 else logging.DEBUG
    if not log.isEnabledFor(level):
        return
    # Every value is escaped: a method name, a kernel's exception type or an error's
    # reason may come from a client or a kernel.
    fields = {k: loggable(str(v), 100) for k, v in context.fields.items()}
    fields = {"request_id": context.request_id, **fields}
    text = "".join(f" {k}={v}" for k, v in fields.items())
    log.log(
        level,
        "%s %s %s %.1fms%s",
        scope["method"],
        loggable(scope["path"]),
        status or "(no response)",
        seconds * 1000,
        text,
        extra=fields,
    )
