"""Readiness: the factory is checked at start-up, and ``/readyz`` says whether the gateway
can serve a new tenant, with the reason when it cannot (``/healthz`` stays liveness)."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

import corral
from corral.server import create_app
from corral.server._app import CHECK_TENANT
from tests.helpers import SERVE_FAST, Served

pytestmark = pytest.mark.timeout(60)


def test_a_running_gateway_is_ready(tmp_path: Path) -> None:
    gateway = Served(*SERVE_FAST, "--max-workers", "4", log=tmp_path / "log")
    try:
        ready = httpx.get(f"{gateway.url}/readyz", timeout=30)
        workers = httpx.get(f"{gateway.url}/v1/workers", timeout=30).json()
    finally:
        assert gateway.stop() == 0
    assert (ready.status_code, ready.json()) == (
        200,
        {"status": "ready", "workers": 0, "max_workers": 4},
    )
    # The factory was checked in a supervisor of its own: the served one starts clean.
    assert (workers["starts"], workers["stops"], workers["workers"]) == (0, {}, [])
    log = (tmp_path / "log").read_text()
    assert f"worker ready tenant={CHECK_TENANT}" in log


def test_memory_pressure_makes_the_gateway_unready_with_the_reason(tmp_path: Path) -> None:
    # No host has 99.9% of its RAM available: the pressure holds from the first sample.
    gateway = Served(*SERVE_FAST, "--min-available-memory", "0.999", log=tmp_path / "log")
    try:
        ready = httpx.get(f"{gateway.url}/readyz", timeout=30)
        health = httpx.get(f"{gateway.url}/healthz", timeout=30)
        call = httpx.post(f"{gateway.url}/v1/tenants/t/call/whoami", timeout=30)
    finally:
        assert gateway.stop() == 0
    assert ready.status_code == 503
    body = ready.json()
    assert body["status"] == "unavailable"
    assert body["reason"].startswith("memory pressure, new workers are refused: host memory")
    assert health.status_code == 200  # alive, though not ready
    assert call.status_code == 503 and call.json()["error"]["type"] == "MemoryPressureError"
    assert "the factory was not checked at start-up" in (tmp_path / "log").read_text()


async def test_readyz_follows_the_lifespan() -> None:
    app = create_app(options={"start_timeout": 20.0, "max_workers": 2})
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
        before = await client.get("/readyz")
        async with app.router.lifespan_context(app):
            during = await client.get("/readyz")
        after = await client.get("/readyz")
    assert (before.status_code, before.json()["reason"]) == (503, "not started")
    assert (during.status_code, during.json()["status"]) == (200, "ready")
    assert (after.status_code, after.json()["reason"]) == (503, "stopped")


@pytest.mark.parametrize(
    ("factory", "remote_type", "message"),
    [
        ("no_such_module_xyz:create", "builtins.ModuleNotFoundError", "No module named"),
        ("corral.examples.demo:no_such_name", "builtins.AttributeError", "no_such_name"),
    ],
)
async def test_a_broken_factory_fails_the_start_up(
    factory: str, remote_type: str, message: str
) -> None:
    app = create_app(factory, options={"start_timeout": 20.0})
    with pytest.raises(corral.StartError) as caught:
        async with app.router.lifespan_context(app):
            pytest.fail("started with a broken factory")
    assert caught.value.remote_type == remote_type
    assert f"the factory {factory} failed its start-up check" in str(caught.value)
    assert message in str(caught.value)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
        ready = await client.get("/readyz")
    assert (ready.status_code, ready.json()["reason"]) == (503, "stopped")


async def test_the_check_can_be_skipped() -> None:
    app = create_app("no_such_module_xyz:create", options={"start_timeout": 20.0},
                     check_factory=False)  # fmt: skip
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
        async with app.router.lifespan_context(app):
            assert (await client.get("/readyz")).status_code == 200
            call = await client.post("/v1/tenants/t/call/whoami")
    assert call.status_code == 502 and call.json()["error"]["type"] == "StartError"
