"""``GET /openapi.json``: a valid OpenAPI 3.1 document that lists every route the app
has, whose schemas the gateway's real answers match."""

from __future__ import annotations

import urllib.parse
from collections.abc import AsyncIterator
from typing import Any

import httpx
import jsonschema
import pytest
from openapi_spec_validator import validate
from starlette.routing import Route

from corral import check_tenant
from corral.errors import InvalidCallError
from corral.server import create_app
from tests.server.test_http import BAD_KEYS

pytestmark = pytest.mark.timeout(60)

TOKEN = "openapi-Token-0123456789"


def app_operations(app: Any) -> set[tuple[str, str]]:
    return {
        (route.path, method.lower())
        for route in app.routes
        if isinstance(route, Route)
        for method in route.methods or ()
        if method != "HEAD"
    }


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(options={"start_timeout": 20.0}, check_factory=False)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gw", timeout=30) as c:
        async with app.router.lifespan_context(app):
            yield c


async def test_the_document_is_valid_and_lists_every_route(client: httpx.AsyncClient) -> None:
    answer = await client.get("/openapi.json")
    assert answer.status_code == 200 and answer.headers["content-type"] == "application/json"
    document = answer.json()
    validate(document)
    listed = {(path, method) for path, item in document["paths"].items() for method in item}
    app = client._transport.app  # type: ignore[attr-defined]
    assert listed == app_operations(app)
    assert ("/v1/tenants/{key}/call/{method}", "post") in listed  # not an empty comparison
    assert "security" not in document  # no token configured
    for item in document["paths"].values():
        for operation in item.values():
            names = [p["name"] for p in operation["parameters"]]
            assert "X-Request-ID" in names


def test_with_a_token_the_document_says_which_routes_need_it() -> None:
    app = create_app(check_factory=False, auth_token=TOKEN)
    document = app.openapi  # type: ignore[attr-defined]
    validate(document)
    assert document["security"] == [{"bearer": []}]
    assert document["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    for path, item in document["paths"].items():
        for operation in item.values():
            if path in ("/", "/healthz", "/readyz"):
                assert operation["security"] == [] and "401" not in operation["responses"]
            else:
                assert "security" not in operation and "401" in operation["responses"], path
    assert TOKEN not in str(document)


def test_the_key_pattern_is_the_tenant_key_rule() -> None:
    app = create_app(check_factory=False)
    document = app.openapi  # type: ignore[attr-defined]
    call = document["paths"]["/v1/tenants/{key}/call/{method}"]["post"]
    (key,) = [p for p in call["parameters"] if p["name"] == "key"]
    schema = key["schema"]
    good = ["a", "A9", "k" * 128, "alice+eu@example.com", "org:proj.v2_x-1", "0"]
    bad = [urllib.parse.unquote(k) for k, _ in BAD_KEYS] + ["", "k" * 129, "a b", "é"]
    for text in good + bad:
        try:
            check_tenant(text)
            allowed = True
        except InvalidCallError:
            allowed = False
        assert jsonschema.Draft202012Validator(schema).is_valid(text) == allowed, text
        assert allowed == (text in good), text


async def test_real_answers_match_their_schemas(client: httpx.AsyncClient) -> None:
    document = (await client.get("/openapi.json")).json()

    def check(path: str, method: str, answer: httpx.Response) -> None:
        responses = document["paths"][path][method]["responses"]
        described = responses[str(answer.status_code)]
        schema = described["content"]["application/json"]["schema"]
        root = {**schema, "components": document["components"]}
        jsonschema.Draft202012Validator(root).validate(answer.json())

    call = "/v1/tenants/{key}/call/{method}"
    check(call, "post", await client.post("/v1/tenants/t/call/whoami"))
    check(call, "post", await client.post("/v1/tenants/t/call/get", json={"args": ["nope"]}))
    check(call, "post", await client.post("/v1/tenants/t/call/nope"))
    check(call, "post", await client.post("/v1/tenants/a%0Ab/call/whoami"))
    check(call, "post", await client.post("/v1/tenants/t/call/put", content=b"{"))
    check("/v1/workers", "get", await client.get("/v1/workers"))
    check("/v1/events", "get", await client.get("/v1/events"))
    check("/v1/tenants/{key}", "delete", await client.delete("/v1/tenants/t"))
    check("/healthz", "get", await client.get("/healthz"))
    check("/readyz", "get", await client.get("/readyz"))
