"""What the gateway makes of a Ray cluster's answers, without a cluster: a lost node's
502, per-node metrics, and readiness read from the nodes. (The gateway over a real
cluster: tests/cluster/test_gateway.py.)"""

from __future__ import annotations

import jsonschema
import msgspec
import pytest
from prometheus_client import generate_latest

from corral import NodeLostError
from corral.cluster import ClusterStats, NodeStats, NodeWorkerInfo
from corral.server import create_app, error_response
from corral.server._metrics import Metrics
from corral.server._openapi import openapi_document

pytestmark = pytest.mark.timeout(30)

A, B = "a" * 56, "b" * 56  # Ray node ids


def node(node_id: str, state: str = "up", pressure: str | None = None) -> NodeStats:
    return NodeStats(
        node=node_id, address="10.0.0.1" if node_id == A else "10.0.0.2", state=state,
        placed=1, workers=1, max_workers=8, memory_pressure=pressure,
    )  # fmt: skip


def cluster_stats(*nodes: NodeStats) -> ClusterStats:
    worker = NodeWorkerInfo(
        tenant="alice", pid=41, state="ready", rss=3 << 20, requests=2, in_flight=0,
        started_at=1.0, last_used=2.0, stop_reason=None, node=A, node_address="10.0.0.1",
    )  # fmt: skip
    return ClusterStats(
        state="running", max_workers=16, workers=[worker], starts=1, stops={},
        tenants_in_backoff=0, memory_enforcement="none", memory_baseline=None,
        memory_pressure=None, sandbox={}, nodes=list(nodes), placements=1,
    )  # fmt: skip


def test_a_lost_node_is_a_502_that_names_it() -> None:
    exc = NodeLostError(
        "node 10.0.0.1 (aaaa) was lost", tenant="alice", node=A, node_address="10.0.0.1"
    )
    answer = error_response(exc, "alice")
    assert answer.status_code == 502
    assert msgspec.json.decode(answer.body) == {
        "error": {
            "type": "NodeLostError",
            "message": "node 10.0.0.1 (aaaa) was lost",
            "tenant": "alice",
            "node": A,
            "node_address": "10.0.0.1",
        }
    }


def test_per_worker_series_have_the_node_and_each_node_has_its_own() -> None:
    stats = cluster_stats(node(A), node(B, state="lost"))
    text = generate_latest(Metrics(lambda: stats).registry).decode()
    assert f'corral_worker_memory_bytes{{node="{A}",tenant="alice"}} 3.145728e+06' in text
    assert f'corral_node_up{{address="10.0.0.1",node="{A}"}} 1.0' in text
    assert f'corral_node_up{{address="10.0.0.2",node="{B}"}} 0.0' in text
    assert f'corral_node_max_workers{{address="10.0.0.1",node="{A}"}} 8.0' in text
    assert f'corral_node_memory_pressure{{address="10.0.0.1",node="{A}"}} 0.0' in text


@pytest.mark.parametrize(
    ("nodes", "status", "reason"),
    [
        ((node(A), node(B, pressure="2% available")), 200, None),
        (
            (node(A, pressure="1% available"), node(B, state="lost")),
            503,
            "memory pressure on every",
        ),
        ((node(A, state="starting"), node(B, state="failed")), 503, "no node is up"),
    ],
)
async def test_ready_while_some_node_is_up_without_pressure(
    nodes: tuple[NodeStats, ...], status: int, reason: str | None
) -> None:
    gateway = create_app(ray_address="auto", check_factory=False).state.gateway
    gateway.supervisor = object()  # running: only its fresh stats are read

    async def fresh_stats() -> ClusterStats:
        return cluster_stats(*nodes)

    gateway.fresh_stats = fresh_stats
    answer = await gateway._cluster_ready()
    body = msgspec.json.decode(answer.body)
    assert answer.status_code == status, body
    if reason is None:
        assert body == {"status": "ready", "workers": 1, "max_workers": 16, "nodes": 1}
    else:
        assert body["status"] == "unavailable" and body["reason"].startswith(reason), body


def test_the_workers_schema_describes_a_cluster_answer() -> None:
    document = openapi_document([("/v1/workers", ["GET"])], version="0", auth=False)
    schema = document["paths"]["/v1/workers"]["get"]["responses"]["200"]["content"]
    root = {**schema["application/json"]["schema"], "components": document["components"]}
    body = {
        **msgspec.to_builtins(cluster_stats(node(A), node(B, state="lost", pressure="low"))),
        "limits": {"soft": None, "hard": None},
        "now": 3.0,
    }
    jsonschema.Draft202012Validator(root).validate(body)
    body["nodes"][0]["state"] = "sideways"
    assert not jsonschema.Draft202012Validator(root).is_valid(body)
