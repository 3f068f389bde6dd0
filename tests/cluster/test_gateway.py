"""The HTTP gateway over the module's Ray cluster (see conftest.py): ``corral serve --ray``
replicas serving one deployment, and the app in this process attaching, detaching and
attaching again.

The replicas are real ``corral serve`` processes, started without the variable that
keeps Ray's addresses on loopback (conftest.py sets it for this process): the command
must set it itself for a cluster on 127.0.0.1. Each test has a namespace of its own and
leaves no gateway, no corral actor and no corral process behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import ray

from corral.server import create_app
from tests.cluster.conftest import LOOPBACK, RayCluster
from tests.helpers import Served

K = "tests.cluster.kernels:make"
FAST = ("--start-timeout", "30", "--shutdown-timeout", "2", "--term-timeout", "1")
FAST_OPTIONS: dict[str, Any] = {"start_timeout": 30.0, "shutdown_timeout": 2.0, "term_timeout": 1.0}
_DEADLINE = 60.0


def namespace() -> str:
    return f"corral-gw-{uuid.uuid4().hex[:8]}"


def ray_env() -> dict[str, str]:
    """This environment without the loopback setting: ``corral serve`` must make it."""
    return {k: v for k, v in os.environ.items() if k != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"}


class Replica(Served):
    """``corral serve --ray ...`` started at once, ready after :meth:`wait_ready`, in the
    environment without the loopback setting (the command must make it)."""

    def __init__(self, *args: str, log: Path) -> None:
        super().__init__(*args, log=log, env=ray_env(), wait=False)

    def wait_ready(self, timeout: float = _DEADLINE) -> str:
        return super().wait_ready(timeout)

    def stop(self, timeout: float = _DEADLINE) -> int:
        return super().stop(timeout)


def named_actors(ns: str) -> list[dict[str, Any]]:
    return [a for a in ray.util.list_named_actors(all_namespaces=True) if a["namespace"] == ns]


def wait_for(predicate: Callable[[], Any], what: str, timeout: float = _DEADLINE) -> Any:
    """Poll ``predicate`` until it returns something true: what it looks at lives in other
    processes (a gateway, the cluster's actors), which offer nothing to wait on."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)  # ok-sleep: polling another process's state, with a deadline


def call(client: httpx.Client, url: str, tenant: str, method: str, *args: Any) -> Any:
    answer = client.post(f"{url}/v1/tenants/{tenant}/call/{method}", json={"args": list(args)})
    assert answer.status_code == 200, answer.text
    return answer.json()["result"]


@pytest.mark.timeout(180)
def test_two_replicas_serve_one_deployment(ray_cluster: RayCluster, tmp_path: Path) -> None:
    ns = namespace()
    args = ("--ray", ray_cluster.cluster.address, "--ray-namespace", ns, *FAST, K)
    # Started together: both attach and both run the factory check at once.
    first, second = (Replica(*args, log=tmp_path / f"{n}.log") for n in ("a", "b"))
    codes: list[int] = []
    try:
        a, b = first.wait_ready(), second.wait_ready()
        with httpx.Client(timeout=60) as http:
            # State is the tenant's, wherever it is called from.
            assert call(http, a, "alice", "put", {"from": "a"}) == 1
            assert call(http, b, "alice", "get") == {"from": "a"}
            assert call(http, a, "alice", "whoami") == call(http, b, "alice", "whoami")
            for tenant in ("bob", "carol", "dave"):
                call(http, b, tenant, "whoami")

            workers = http.get(f"{a}/v1/workers").json()
            by_tenant = {w["tenant"]: w for w in workers["workers"]}
            assert set(by_tenant) == {"alice", "bob", "carol", "dave"}, workers  # no check left
            node_ids = {n["node"] for n in workers["nodes"]}
            assert len(node_ids) == 3, workers["nodes"]
            assert all(n["state"] == "up" and n["address"] == LOOPBACK for n in workers["nodes"])
            for w in by_tenant.values():
                assert w["node"] in node_ids and w["node_address"] == LOOPBACK, w
            assert {"limits", "now", "placements"} <= set(workers)

            for url in (a, b):
                ready = http.get(f"{url}/readyz")
                assert ready.status_code == 200, ready.text
                assert ready.json()["status"] == "ready" and ready.json()["nodes"] == 3

            bad = http.post(f"{a}/v1/tenants/bad%20key/call/get")
            assert bad.status_code == 400 and bad.json()["error"]["kind"] == "tenant", bad.text

            # The per-worker series carry the node (memory once the node has sampled it).
            alice = by_tenant["alice"]
            series = f'corral_worker_memory_bytes{{node="{alice["node"]}",tenant="alice"}}'

            def scraped() -> str | None:
                text = http.get(f"{b}/metrics").text
                return text if series in text else None

            text = wait_for(scraped, "alice's memory series")
            for node in node_ids:
                assert f'corral_node_up{{address="{LOOPBACK}",node="{node}"}} 1.0' in text
            # Each replica hears every node's events, each with its node.
            events = wait_for(
                lambda: [
                    e
                    for e in http.get(f"{a}/v1/events").json()["events"]
                    if e["kind"] == "starting" and e["tenant"] == "dave"
                ],
                "dave's start event on the other replica",
            )
            assert events[0]["node"] == by_tenant["dave"]["node"], events
            page = http.get(f"{a}/")
            assert page.status_code == 200 and 'id="nodes-panel"' in page.text

            # A replica with other options cannot join this deployment.
            other = subprocess.run(
                [sys.executable, "-m", "corral", "serve", "--port", "0", *args,
                 "--max-workers", "3"],
                capture_output=True, text=True, timeout=_DEADLINE, env=ray_env(),
            )  # fmt: skip
            assert other.returncode == 2, other
            assert other.stderr.splitlines()[-1].startswith(
                f"corral serve: error: namespace '{ns}' already runs corral with another"
            ), other.stderr

            # One replica goes (a rolling restart): the other keeps serving every tenant.
            codes.append(first.stop())
            assert call(http, b, "alice", "get") == {"from": "a"}
    finally:
        codes += [first.stop(), second.stop()]
    assert codes[0] == 0 and codes[-1] == 0, (first.tail(), second.tail())
    # The last replica out closed the deployment: no corral actor is left (and the
    # conftest checks that no corral process is).
    wait_for(lambda: not named_actors(ns), "corral's actors to go")


@pytest.mark.timeout(120)
def test_a_broken_factory_is_refused(ray_cluster: RayCluster) -> None:
    ns = namespace()
    broken = subprocess.run(
        [sys.executable, "-m", "corral", "serve", "--port", "0", "--ray",
         ray_cluster.cluster.address, "--ray-namespace", ns, *FAST, "tests.cluster.nope:make"],
        capture_output=True, text=True, timeout=_DEADLINE,
        env=ray_env(),
    )  # fmt: skip
    assert broken.returncode == 2, broken
    (line,) = broken.stderr.strip().splitlines()[-1:]
    assert line.startswith("corral serve: error: the factory tests.cluster.nope:make failed"), line
    assert "No module named 'tests.cluster.nope'" in line, line
    wait_for(lambda: not named_actors(ns), "corral's actors to go")


@contextlib.asynccontextmanager
async def serving(app: Any) -> AsyncIterator[httpx.AsyncClient]:
    """The app started (its lifespan) and a client on it; stopped on exit."""
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gw", timeout=60) as c:
        async with app.router.lifespan_context(app):
            yield c


@pytest.mark.timeout(120)
async def test_detach_keeps_the_deployment_for_the_next_gateway(ray_cluster: RayCluster) -> None:
    ns = namespace()

    def app(on_exit: str, **options: Any) -> Any:
        return create_app(
            K,
            options={**FAST_OPTIONS, **options},
            ray_address="auto",  # this process is connected already: that connection
            ray_namespace=ns,
            ray_on_exit=on_exit,
        )

    async with serving(app("detach")) as http:
        answer = await http.post("/v1/tenants/erin/call/put", json={"args": [7]})
        assert answer.status_code == 200, answer.text
        pid = (await http.post("/v1/tenants/erin/call/whoami")).json()["result"]["pid"]
    # Detached as the only front end: the directory, agents and erin's worker stay.
    assert {a["name"] for a in named_actors(ns)} >= {"corral-directory"}
    # A gateway refused for other options does not stop what it never joined.
    with pytest.raises(ValueError, match="already runs corral with another"):
        async with serving(app("shutdown", max_workers=3)):
            pass
    async with serving(app("shutdown")) as http:
        assert (await http.post("/v1/tenants/erin/call/get")).json() == {"result": 7}
        whoami = (await http.post("/v1/tenants/erin/call/whoami")).json()["result"]
        assert whoami["pid"] == pid
        failed = await http.post("/v1/tenants/erin/call/fail", json={"args": ["boom"]})
        assert failed.status_code == 422, failed.text
        assert failed.json()["error"]["remote_type"].endswith("ValueError")
    # The last one out with "shutdown" closed it.
    await asyncio.to_thread(wait_for, lambda: not named_actors(ns), "corral's actors to go")


def test_the_address_decides_whether_ray_keeps_loopback(tmp_path: Path) -> None:
    from corral.cli._serve import _is_local_ray

    assert _is_local_ray("127.0.0.1:6379", {})
    assert _is_local_ray("localhost:6379", {})
    assert not _is_local_ray("10.0.0.5:6379", {})
    assert not _is_local_ray("ray://127.0.0.1:10001", {})
    assert _is_local_ray("auto", {"RAY_ADDRESS": "127.0.0.1:1234"})
    (tmp_path / "ray").mkdir()
    (tmp_path / "ray" / "ray_current_cluster").write_text("127.0.0.1:4321\n")
    assert _is_local_ray("auto", {"RAY_TMPDIR": str(tmp_path)})
    (tmp_path / "ray" / "ray_current_cluster").write_text("10.1.2.3:4321\n")
    assert not _is_local_ray("auto", {"RAY_TMPDIR": str(tmp_path)})
    assert not _is_local_ray("auto", {"RAY_TMPDIR": str(tmp_path / "none")})
