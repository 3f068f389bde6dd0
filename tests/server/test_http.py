"""What every request meets around its route (``corral.server._http``): JSON error
bodies for every status, the request id, the bearer token, the tenant-key rule before
routing, and log lines that name the call and cannot be forged by it. Run in process,
through httpx's ASGI transport, against a real supervisor (so the worker lines are real)."""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest

from corral import TENANT_RULE
from corral.server import create_app
from corral.server._http import loggable

pytestmark = pytest.mark.timeout(60)

TOKEN = "s3cret-Token_0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
PLAIN = "%(levelname)s:%(name)s:%(message)s"  # logging.basicConfig's format


class Lines(logging.Handler):
    """Every record as ``logging.basicConfig`` would print it."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(logging.Formatter(PLAIN))
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.fixture
def lines() -> Iterator[Lines]:
    handler = Lines()
    corral = logging.getLogger("corral")
    old = corral.level
    corral.addHandler(handler)
    corral.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        corral.removeHandler(handler)
        corral.setLevel(old)


@contextlib.asynccontextmanager
async def client_for(auth_token: str | None = None) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(
        options={"start_timeout": 20.0, "max_workers": 2},
        check_factory=False,
        auth_token=auth_token,
    )
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gw", timeout=30) as c:
        async with app.router.lifespan_context(app):
            yield c


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with client_for() as c:
        yield c


@pytest.fixture
async def guarded() -> AsyncIterator[httpx.AsyncClient]:
    async with client_for(TOKEN) as c:
        yield c


def error_of(response: httpx.Response) -> dict[str, Any]:
    assert response.headers["content-type"] == "application/json", response.text
    body = response.json()
    assert set(body) == {"error"}, body
    error: dict[str, Any] = body["error"]
    assert isinstance(error["type"], str) and isinstance(error["message"], str)
    return error


# -- JSON for every status ---------------------------------------------------------------------


async def test_unknown_routes_and_methods_are_json(client: httpx.AsyncClient) -> None:
    missing = await client.get("/no/such/route")
    assert missing.status_code == 404
    assert error_of(missing)["type"] == "NotFound"
    assert "/openapi.json" in error_of(missing)["message"]
    wrong = await client.get("/v1/tenants/alice/call/whoami")
    assert wrong.status_code == 405 and wrong.headers["allow"] == "POST"
    assert error_of(wrong) == {
        "type": "MethodNotAllowed",
        "message": "GET /v1/tenants/alice/call/whoami: the method is not allowed here "
        "(allowed: POST)",
        "allowed": ["POST"],
    }
    assert (await client.put("/healthz")).status_code == 405
    odd = await client.get("/x%0A%00" + "y" * 5000)
    assert odd.status_code == 404 and len(error_of(odd)["message"]) < 300
    assert "\n" not in error_of(odd)["message"] and "\x00" not in error_of(odd)["message"]


async def test_a_route_that_fails_is_a_json_500_with_its_request_id(
    client: httpx.AsyncClient, lines: Lines
) -> None:
    app = client._transport.app  # type: ignore[attr-defined]

    def broken() -> None:
        raise RuntimeError("a bug")

    app.state.gateway.stats = broken
    with pytest.raises(RuntimeError, match="a bug"):  # the ASGI transport re-raises it
        await client.get("/v1/workers", headers={"X-Request-ID": "req-500"})
    line = next(line for line in lines.lines if "GET /v1/workers" in line)
    assert line.startswith("WARNING:corral.server:GET /v1/workers 500 "), line
    assert "request_id=req-500" in line and "error=RuntimeError" in line


async def test_the_500_body(client: httpx.AsyncClient) -> None:
    app = client._transport.app  # type: ignore[attr-defined]
    app.state.gateway.stats = lambda: 1 / 0
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://gw") as quiet:
        answer = await quiet.get("/v1/workers", headers={"X-Request-ID": "req-500"})
    assert answer.status_code == 500 and answer.headers["x-request-id"] == "req-500"
    assert error_of(answer) == {
        "type": "InternalError",
        "message": "the gateway failed; its log has the traceback (request id req-500)",
    }


# -- request ids -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "method", "status"),
    [("/healthz", "GET", 200), ("/nope", "GET", 404), ("/healthz", "POST", 405),
     ("/v1/tenants/a%0Ab", "DELETE", 400), ("/v1/tenants/t/call/nope", "POST", 404)],
)  # fmt: skip
async def test_every_response_echoes_a_sane_request_id(
    client: httpx.AsyncClient, path: str, method: str, status: int
) -> None:
    given = "0b6e1c2d-9f8a-4c3b-8e7d-6a5b4c3d2e1f"
    answer = await client.request(method, path, headers={"X-Request-ID": given})
    assert answer.status_code == status
    assert answer.headers["x-request-id"] == given
    made = (await client.request(method, path)).headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", made)


@pytest.mark.parametrize(
    "given", ["", "x" * 129, "has space", "semi;colon", 'quote"', "é", "a\tb", "<b>"]
)
async def test_an_insane_request_id_is_replaced(client: httpx.AsyncClient, given: str) -> None:
    answer = await client.get("/healthz", headers={"X-Request-ID": given.encode("utf-8")})
    made = answer.headers["x-request-id"]
    assert made != given and re.fullmatch(r"[0-9a-f]{32}", made)


async def test_every_log_line_about_a_call_has_its_tenant_and_request_id(
    client: httpx.AsyncClient, lines: Lines
) -> None:
    from corral.server._http import RequestIdFilter

    lines.addFilter(RequestIdFilter())
    lines.setFormatter(logging.Formatter(PLAIN + " %(request_id)s", defaults={"request_id": "-"}))
    answer = await client.post("/v1/tenants/alice/call/whoami", headers={"X-Request-ID": "r-1"})
    assert answer.status_code == 200 and answer.headers["x-request-id"] == "r-1"
    crashed = await client.post(
        "/v1/tenants/bob/call/crash", json={"args": [3]}, headers={"X-Request-ID": "r-2"}
    )
    assert crashed.status_code == 502
    # The worker's own records during the call carry the call's id (through the filter).
    ready = [line for line in lines.lines if line.startswith("INFO:corral:worker ready")]
    assert [line.rsplit(" ", 1)[1] for line in ready] == ["r-1", "r-2"], lines.lines
    # The gateway's own line says it all in its message text.
    (ok,) = [line for line in lines.lines if "request_id=r-1" in line and "corral.server" in line]
    assert re.fullmatch(
        r"DEBUG:corral\.server:POST /v1/tenants/alice/call/whoami 200 [0-9.]+ms "
        r"request_id=r-1 tenant=alice method=whoami r-1",
        ok,
    ), ok
    (bad,) = [line for line in lines.lines if "request_id=r-2" in line and "corral.server" in line]
    assert bad.startswith("WARNING:corral.server:POST /v1/tenants/bob/call/crash 502 "), bad
    assert "tenant=bob method=crash " in bad and "error=WorkerCrashedError" in bad
    assert re.search(r" pid=\d+ ", bad) and " exitcode=3 " in bad, bad


# -- the bearer token --------------------------------------------------------------------------


async def test_a_token_guards_every_route_but_the_probes_and_the_page(
    guarded: httpx.AsyncClient,
) -> None:
    for path in ("/v1/workers", "/v1/events", "/metrics", "/openapi.json", "/nope"):
        refused = await guarded.get(path)
        assert refused.status_code == 401, path
        assert refused.headers["www-authenticate"] == 'Bearer realm="corral"'
        assert error_of(refused)["type"] == "Unauthorized"
        assert refused.headers["x-request-id"]
    call = await guarded.post("/v1/tenants/a/call/whoami")
    assert call.status_code == 401
    for header in (f"Bearer {TOKEN}x", "Bearer ", f"Basic {TOKEN}", TOKEN, f"Bearer {TOKEN[:-1]}"):
        wrong = await guarded.get("/v1/workers", headers={"Authorization": header})
        assert wrong.status_code == 401, header
        assert TOKEN not in wrong.text
    wrong = await guarded.get("/v1/workers", headers={"Authorization": "Bearer nope"})
    assert wrong.headers["www-authenticate"] == 'Bearer realm="corral", error="invalid_token"'
    for path in ("/", "/healthz", "/readyz"):
        assert (await guarded.get(path)).status_code == 200, path
    assert (await guarded.get("/v1/workers", headers=AUTH)).status_code == 200
    assert (
        await guarded.get("/v1/workers", headers={"authorization": f"bearer {TOKEN}"})
    ).is_success
    answer = await guarded.post("/v1/tenants/a/call/whoami", headers=AUTH)
    assert answer.status_code == 200 and answer.json()["result"]["tenant"] == "a"


async def test_a_bad_key_is_not_looked_at_before_the_token(guarded: httpx.AsyncClient) -> None:
    assert (await guarded.post("/v1/tenants/a%0Ab/call/whoami")).status_code == 401
    assert (await guarded.post("/v1/tenants/a%0Ab/call/whoami", headers=AUTH)).status_code == 400


@pytest.mark.parametrize("token", ["", "with space", "tab\there", "ünïcode", "new\nline"])
def test_a_token_that_cannot_be_sent_is_refused(token: str) -> None:
    with pytest.raises(ValueError, match="auth token") as caught:
        create_app(check_factory=False, auth_token=token)
    assert not token or token not in str(caught.value)


# -- tenant keys -------------------------------------------------------------------------------

BAD_KEYS = [
    ("a/b", "it contains '/'"),
    ("a%2Fb", "it contains '/'"),
    ("a%0Ab", "it contains '\\n'"),
    ("a%0D%0AINFO:corral:forged", "it contains '\\r'"),
    ("a%00b", "it contains '\\x00'"),
    ("x" * 129, "it is 129 characters long"),
    ("x" * 20_000, "it is 20000 characters long"),
    ("%2E%2E", "it starts with '.'"),
    ("-rf", "it starts with '-'"),
    ("a%20b", "it contains ' '"),
    ("caf%C3%A9", "it contains 'é'"),
    ("a%E2%80%AEb", "it contains '\\u202e'"),
    ("a%FFb", "it contains '\ufffd'"),  # not UTF-8: the replacement character
    ("%1B%5B2J", "it starts with '\\x1b'"),
]


@pytest.mark.parametrize(("key", "why"), BAD_KEYS, ids=lambda v: v[:20])
async def test_a_bad_key_is_a_json_400_naming_the_rule(
    client: httpx.AsyncClient, lines: Lines, key: str, why: str
) -> None:
    for method, path in (
        ("POST", f"/v1/tenants/{key}/call/whoami"),
        ("DELETE", f"/v1/tenants/{key}"),
    ):
        answer = await client.request(method, path, headers={"X-Request-ID": "bad-key"})
        assert answer.status_code == 400, (method, answer.text)
        error = error_of(answer)
        assert error["type"] == "InvalidCallError" and error["kind"] == "tenant"
        assert error["rule"] == TENANT_RULE and why in error["message"], error
        assert "tenant" not in error and len(error["message"]) < 400
        for name, value in answer.headers.items():
            assert "\n" not in value and len(value) < 200, name
    logged = [line for line in lines.lines if "request_id=bad-key" in line]
    assert len(logged) == 2 and all("error=InvalidTenant" in line for line in logged)
    for line in lines.lines:
        assert line.isprintable() and len(line) < 400, line
    stats = (await client.get("/v1/workers")).json()
    assert stats["workers"] == [] and stats["starts"] == 0


async def test_the_longest_key_is_fine(client: httpx.AsyncClient) -> None:
    key = "k" * 128
    answer = await client.post(f"/v1/tenants/{key}/call/whoami")
    assert answer.status_code == 200 and answer.json()["result"]["tenant"] == key
    evicted = await client.delete(f"/v1/tenants/{key}")
    assert evicted.json() == {"tenant": key, "evicted": True}


async def test_metric_labels_are_bounded_and_printable(client: httpx.AsyncClient) -> None:
    for key, _ in BAD_KEYS:
        await client.post(f"/v1/tenants/{key}/call/whoami")
    for key in ("alice", "bob+eu@example.com", "org:proj.v2"):
        assert (await client.post(f"/v1/tenants/{key}/call/whoami")).status_code == 200
    await client.post("/v1/tenants/alice/call/nope")
    text = (await client.get("/metrics")).text
    labels = re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', text)
    tenants = {value for name, value in labels if name == "tenant"}
    assert tenants <= {"bob+eu@example.com", "org:proj.v2", "alice"}  # live workers only
    assert len(tenants) <= 2  # max_workers
    for name, value in labels:
        assert value.isprintable() and "\\" not in value and len(value) <= 128, (name, value)
    outcomes = {value for name, value in labels if name == "outcome"}
    assert outcomes == {"ok", "InvalidCallError"}


def test_loggable_text_is_one_bounded_line() -> None:
    assert loggable("/v1/tenants/alice/call/put") == "/v1/tenants/alice/call/put"
    assert loggable("a\nb\x00c\x1b[2J é\u202e") == "a%0Ab%00c%1B%5B2J%20%C3%A9%E2%80%AE"
    long = loggable("x" * 10_000)
    assert len(long) == 203 and long.endswith("...")
