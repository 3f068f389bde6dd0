"""The HTTP gateway as operators run it: ``corral serve`` in a real process on a
loopback port, driven by a real HTTP client."""

from __future__ import annotations

import asyncio
import concurrent.futures
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from corral.server import create_app
from tests.helpers import SERVE_FAST, Served

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def served(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Served]:
    """A gateway with the flags of the test's ``serve_args`` marker (if any)."""
    marker = request.node.get_closest_marker("serve_args")
    args = marker.args if marker else ()
    gateway = Served(*SERVE_FAST, *args, log=tmp_path / "serve.log")
    try:
        yield gateway
    finally:
        assert gateway.stop() == 0, (tmp_path / "serve.log").read_text()


def call(url: str, tenant: str, method: str, *args: Any, **kwargs: Any) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/tenants/{tenant}/call/{method}",
        json={"args": list(args), "kwargs": kwargs},
        timeout=30,
    )


def error_of(response: httpx.Response) -> dict[str, Any]:
    body = response.json()
    assert set(body) == {"error"}, body
    error: dict[str, Any] = body["error"]
    return error


def test_calls_reach_each_tenants_own_worker(served: Served) -> None:
    assert call(served.url, "alice", "put", "k", "from alice").json() == {"result": 1}
    assert call(served.url, "bob", "put", "k", {"from": "bob"}).json() == {"result": 1}
    assert call(served.url, "alice", "get", "k").json() == {"result": "from alice"}
    assert call(served.url, "bob", "get", key="k").json() == {"result": {"from": "bob"}}
    alice = call(served.url, "alice", "whoami").json()["result"]
    bob = call(served.url, "bob", "whoami").json()["result"]
    assert (alice["tenant"], bob["tenant"]) == ("alice", "bob")
    assert alice["pid"] != bob["pid"]


# The gateway has one call timeout for every call: short enough that the runaway spin
# below meets it soon, long enough (5000x an answer here) that no other call does on a
# busy host.
@pytest.mark.serve_args(
    "--call-timeout", "5", "--restart-intensity", "1", "--backoff-base", "30",
    "--max-body-bytes", "4KiB",
)  # fmt: skip
def test_errors_become_fitting_statuses(served: Served) -> None:
    missing = call(served.url, "t", "get", "nope")
    assert missing.status_code == 422
    assert error_of(missing)["remote_type"] == "builtins.KeyError"
    assert error_of(missing)["type"] == "KernelError"
    for method in ("no_such_method", "_private", "__init__"):
        assert call(served.url, "t", method).status_code == 404, method
    assert error_of(call(served.url, "t", "nope"))["type"] == "InvalidCallError"
    bad = [
        b"{not json",
        b'{"args": {"a": 1}}',  # args must be a list
        b'{"args": [], "extra": 1}',  # unknown field
        b"[" * 100_000 + b"]" * 100_000,  # deep nesting, past the body limit too
        b'"just a string"',
    ]
    for body in bad:
        response = httpx.post(f"{served.url}/v1/tenants/t/call/put", content=body, timeout=30)
        assert response.status_code in (400, 413), (body[:20], response.text)
    big = httpx.post(
        f"{served.url}/v1/tenants/t/call/put", json={"args": ["k", "x" * 8192]}, timeout=30
    )
    assert big.status_code == 413 and error_of(big)["type"] == "BodyTooLarge"
    slow = call(served.url, "slow", "spin", 30.0)
    assert slow.status_code == 504 and error_of(slow)["type"] == "CallTimeoutError"
    crashed = call(served.url, "c", "crash", 3)
    assert crashed.status_code == 502 and error_of(crashed)["type"] == "WorkerCrashedError"
    again = call(served.url, "c", "crash", 3)  # the second failure: backoff
    assert again.status_code == 502
    refused = call(served.url, "c", "whoami")
    assert refused.status_code == 503 and error_of(refused)["type"] == "BackoffError"
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    assert call(served.url, "t", "put", "still", "fine").status_code == 200  # the rest go on


def test_workers_events_evict_health_and_metrics(served: Served) -> None:
    for tenant in ("a", "b", "c"):
        assert call(served.url, tenant, "whoami").status_code == 200
    workers = httpx.get(f"{served.url}/v1/workers").json()
    assert sorted(w["tenant"] for w in workers["workers"]) == ["a", "b", "c"]
    assert workers["state"] == "running" and workers["starts"] == 3
    evicted = httpx.delete(f"{served.url}/v1/tenants/b").json()
    assert evicted == {"tenant": "b", "evicted": True}
    assert httpx.delete(f"{served.url}/v1/tenants/b").json()["evicted"] is False
    events = httpx.get(f"{served.url}/v1/events").json()["events"]
    assert {"kind": "stopped", "tenant": "b", "reason": "evicted"}.items() <= events[-1].items()
    assert httpx.get(f"{served.url}/healthz").json() == {"status": "ok", "workers": 2}
    metrics = httpx.get(f"{served.url}/metrics").text
    assert re.search(r'^corral_calls_total\{outcome="ok"\} 3\.0$', metrics, re.M), metrics
    assert re.search(r'^corral_worker_stops_total\{reason="evicted"\} 1\.0$', metrics, re.M)
    assert re.search(r'^corral_workers\{state="ready"\} 2\.0$', metrics, re.M)
    assert re.search(r"^corral_worker_starts_total 3\.0$", metrics, re.M)
    assert re.search(r"^corral_call_duration_seconds_count 3\.0$", metrics, re.M)
    assert "corral_worker_memory_bytes" in metrics


def test_reload_replaces_a_tenants_worker(served: Served) -> None:
    assert call(served.url, "r", "put", "k", 1).status_code == 200
    before = httpx.get(f"{served.url}/v1/workers").json()["workers"][0]
    reloaded = httpx.post(f"{served.url}/v1/tenants/r/reload").json()
    assert reloaded["tenant"] == "r" and reloaded["reloaded"] is True
    assert reloaded["worker"]["pid"] != before["pid"] and reloaded["worker"]["state"] == "ready"
    workers = httpx.get(f"{served.url}/v1/workers").json()["workers"]
    assert [w["pid"] for w in workers] == [reloaded["worker"]["pid"]]
    # a new worker: the old one's state went with it
    assert call(served.url, "r", "whoami").json()["result"]["notes"] == 0
    nobody = httpx.post(f"{served.url}/v1/tenants/nobody/reload").json()
    assert nobody == {"tenant": "nobody", "reloaded": False, "worker": None}
    assert httpx.post(f"{served.url}/v1/tenants/a%2Fb/reload").status_code == 400
    events = httpx.get(f"{served.url}/v1/events").json()["events"]
    stopped = [e for e in events if e["kind"] == "stopped"]
    assert stopped[-1]["reason"] == "reloaded" and stopped[-1]["pid"] == before["pid"]


@pytest.mark.serve_args("--max-workers", "8")
async def test_many_tenants_at_once_each_get_their_own_answers(served: Served) -> None:
    """40 tenants x 5 calls, 200 requests in flight at once, through 8 workers (constant
    LRU churn): every answer is the right tenant's."""

    async def tenant(client: httpx.AsyncClient, name: str) -> None:
        for i in range(5):
            r = await client.post(
                f"{served.url}/v1/tenants/{name}/call/put", json={"args": [f"k{i}", name]}
            )
            assert r.status_code == 200, r.text
            r = await client.post(
                f"{served.url}/v1/tenants/{name}/call/get", json={"args": [f"k{i}"]}
            )
            # The worker may have been evicted in between (LRU): then it is a new,
            # empty notebook, and the key is missing; never another tenant's value.
            assert r.status_code in (200, 422), r.text
            if r.status_code == 200:
                assert r.json() == {"result": name}

    limits = httpx.Limits(max_connections=200)
    async with httpx.AsyncClient(limits=limits, timeout=60) as client:
        await asyncio.gather(*(tenant(client, f"tenant-{n}") for n in range(40)))
        stats = (await client.get(f"{served.url}/v1/workers")).json()
    assert len(stats["workers"]) <= 8 and stats["starts"] >= 40
    assert stats["stops"].get("lru", 0) >= 32


def test_config_file_and_flags(tmp_path: Path) -> None:
    config = tmp_path / "corral.toml"
    config.write_text(
        '[server]\nhost = "127.0.0.1"\nmax_body_bytes = "64KiB"\n\n'
        '[supervisor]\nmax_workers = 3\nidle_ttl = "none"\nworker_memory_limit = "1GiB"\n'
        'sandbox = "default"\nenv_allowlist = ["PATH", "LANG"]\n'
    )
    gateway = Served(
        *SERVE_FAST, "--config", str(config), "--max-workers", "5", log=tmp_path / "log"
    )
    try:
        stats = httpx.get(f"{gateway.url}/v1/workers").json()
    finally:
        assert gateway.stop() == 0
    assert stats["max_workers"] == 5  # the flag wins over the file
    assert stats["limits"] == {"soft": 1 << 30, "hard": None}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--max-workers", "many"), "--max-workers"),
        (("--max-workers", "0"), "max_workers"),
        (("--sandbox", "paranoid"), "--sandbox: must be one of none, default, strict"),
        (("--worker-memory-limit", "12 parsecs"), "not a size"),
        (("--config", "/nonexistent.toml"), "nonexistent"),
    ],
)
def test_bad_options_are_refused_with_the_reason(
    args: tuple[str, ...], message: str, tmp_path: Path
) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "corral", "serve", "--port", "0", *args],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 2, out
    assert message in out.stderr, out.stderr


def test_sigterm_lets_calls_in_flight_finish(tmp_path: Path) -> None:
    gateway = Served(*SERVE_FAST, "--grace", "10", log=tmp_path / "log")
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(call, gateway.url, "t", "slow_echo", "done", 1.5)
        deadline = time.monotonic() + 20
        while not any(
            w["in_flight"] for w in httpx.get(f"{gateway.url}/v1/workers").json()["workers"]
        ):
            assert time.monotonic() < deadline and not pending.done(), "the call never started"
        assert gateway.stop() == 0  # SIGTERM; returns once the server has exited
        answer = pending.result(timeout=10)
    assert answer.status_code == 200 and answer.json() == {"result": "done"}


def test_the_listening_socket_is_tcp_with_nodelay() -> None:
    """Regression: a socket from socket.create_server has proto 0, so asyncio never set
    TCP_NODELAY on its connections and every response waited ~40 ms for a delayed ACK
    (23 requests/s for one client instead of about 1,000)."""
    from corral.cli._serve import _listen

    with _listen("127.0.0.1", 0) as sock:
        assert sock.proto == socket.IPPROTO_TCP
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1


def test_the_load_test_runs_and_reports(tmp_path: Path) -> None:
    """The bounded load test (its smoke mode: a second, a few clients)."""
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "gateway_load.py"
    out = subprocess.run(
        [sys.executable, str(script), "--seconds", "1", "--clients", "4", "--tenants", "2"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    assert re.search(r"requests/s, p50 [0-9.]+ ms, p99 [0-9.]+ ms, errors 0;", out.stdout)


async def test_an_app_can_be_started_again() -> None:
    """Regression: the app made its Supervisor once, so a second lifespan (a restarted
    app, a second test client) failed with SupervisorClosedError."""
    app = create_app(options={"start_timeout": 20.0})
    transport = httpx.ASGITransport(app=app)
    pids = []
    async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
        for _ in range(2):
            async with app.router.lifespan_context(app):
                response = await client.post("/v1/tenants/t/call/whoami")
                assert response.status_code == 200, response.text
                pids.append(response.json()["result"]["pid"])
            assert (await client.get("/healthz")).status_code == 503  # closed with it
    assert pids[0] != pids[1]
