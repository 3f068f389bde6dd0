"""corral on Ray against Ray alone, side by side in one run (issue 15's targets).

Starts its own one-node Ray cluster on this machine (loopback only, dashboard off), then
measures each scenario against its baseline in the same run:

* warm call: ``ClusterSupervisor.call`` against a bare Ray actor method round trip (an
  async actor whose method returns its argument: the transport floor; a call through
  corral is that plus the node agent and the local Supervisor) and against the local
  ``Supervisor`` in this process;
* first call of a new tenant against creating a Ray actor and its first call (the
  actor-per-tenant design);
* idle memory per tenant: a corral worker's USS against an idle Ray actor process's
  USS (plus each node's fixed cost: its agent and warden);
* 1,000 idle tenants on one node: how long they take to start, what they weigh, and a
  warm call while they sit there.

Run: ``python benchmarks/cluster.py`` (``--tenants 200`` for a smaller last scenario).
Medians; the ratio and its target are printed per row.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # Ray's own node-IP lookup: loopback
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# The agents (Ray workers) import the kernel module; corral hands their sys.path on.
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (HERE, os.environ.get("PYTHONPATH")) if p)
sys.path.insert(0, HERE)

import psutil  # noqa: E402
import ray  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy  # noqa: E402

import corral  # noqa: E402
from corral.cluster import ClusterSupervisor  # noqa: E402

LOOPBACK = "127.0.0.1"
MiB = 2**20
FACTORY = "_kernel:make"
NODE_ARGS: dict[str, Any] = {
    "num_cpus": 1,
    "object_store_memory": 100 * MiB,
    "node_ip_address": LOOPBACK,
}


@ray.remote(num_cpus=0)
class EchoActor:
    """The actor-per-tenant baseline: one Ray actor (a worker process) per tenant."""

    def __init__(self, tenant: str) -> None:
        self.tenant = tenant
        self.notes: dict[str, Any] = {}

    async def put(self, key: str, value: Any) -> int:
        self.notes[key] = value
        return len(self.notes)

    def pid(self) -> int:
        return os.getpid()


def uss(pids: list[int]) -> list[int]:
    out = []
    for pid in pids:
        try:
            out.append(psutil.Process(pid).memory_full_info().uss)
        except psutil.Error:
            pass
    return out


async def timed(fn: Any, n: int) -> list[float]:
    samples = []
    for i in range(n):
        t0 = time.perf_counter()
        await fn(i)
        samples.append(time.perf_counter() - t0)
    return samples


def ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


ROWS: list[tuple[str, str, float, str, bool]] = []


def row(name: str, measured: str, ratio: float, goal: str, ok: bool) -> None:
    ROWS.append((name, measured, ratio, goal, ok))
    print(f"  {name}: {measured} -> {ratio:.2f}x (goal {goal}) {'PASS' if ok else 'MISS'}")


async def main(args: argparse.Namespace) -> None:
    pin = NodeAffinitySchedulingStrategy(ray.nodes()[0]["NodeID"], soft=False)
    n = args.calls

    print(f"warm call ({n} calls each, interleaved, median)")
    actor = EchoActor.options(scheduling_strategy=pin).remote("bare")
    bare: list[float] = []
    local: list[float] = []
    cluster: list[float] = []
    async with (
        corral.Supervisor(FACTORY, max_workers=8) as sup,
        ClusterSupervisor(
            FACTORY, address=None, namespace="corral-bench", max_workers=args.tenants + 64
        ) as cs,
    ):
        # Interleaved, so that the shared machine's load falls on all three alike.
        for i in range(n + 200):
            for fn, out in (
                (lambda i=i: actor.put.remote("k", i), bare),
                (lambda i=i: sup.call("t", "put", "k", i), local),
                (lambda i=i: cs.call("warm", "put", "k", i), cluster),
            ):
                t0 = time.perf_counter()
                await fn()
                if i >= 200:  # warm-up
                    out.append(time.perf_counter() - t0)
        print(
            f"  bare Ray actor {ms(bare):.3f} ms, ClusterSupervisor {ms(cluster):.3f} ms, "
            f"local Supervisor {ms(local):.3f} ms"
        )
        await sup.aclose()
        ratio = ms(cluster) / ms(bare)
        row(
            "warm call, ClusterSupervisor vs a bare Ray actor round trip",
            f"{ms(cluster):.3f} ms vs {ms(bare):.3f} ms",
            ratio,
            "<= 1.3x",
            ratio <= 1.3,
        )
        row(
            "warm call, ClusterSupervisor vs the local Supervisor (no target: Ray's floor)",
            f"{ms(cluster):.3f} ms vs {ms(local):.3f} ms; floor: Ray alone {ms(bare):.3f} ms",
            ms(cluster) / ms(local),
            "-",
            True,
        )

        print("first call of a new tenant (median)")
        first = await timed(lambda i: cs.call(f"new-{i}", "put", "k", i), args.new)
        actors = []

        async def new_actor(i: int) -> None:
            a = EchoActor.options(scheduling_strategy=pin).remote(f"a{i}")
            actors.append(a)
            await a.put.remote("k", i)

        created = await timed(new_actor, args.actors)
        speedup = ms(created) / ms(first)
        row(
            "new tenant's first call, speed-up over a new Ray actor",
            f"{ms(first):.2f} ms vs {ms(created):.1f} ms",
            speedup,
            ">= 5x",
            speedup >= 5,
        )

        print("idle memory per tenant (USS, median)")
        actor_pids = [await a.pid.remote() for a in actors]
        actor_uss = uss(actor_pids)
        stats = await cs.fetch_stats()
        worker_pids = [w.pid for w in stats.workers if w.pid]
        worker_uss = uss(worker_pids)
        per_tenant = statistics.median(worker_uss)
        per_actor = statistics.median(actor_uss)
        agents = await cs._directory.agents.remote()
        agent_pids = [await a.pid.remote() for _n, _addr, state, a in agents if state == "up"]
        fixed = [sum(uss([p, *(c.pid for c in psutil.Process(p).children())])) for p in agent_pids]
        smaller = per_actor / per_tenant
        row(
            "idle memory per tenant, corral worker vs a Ray actor process (USS)",
            f"{per_tenant / MiB:.2f} MiB vs {per_actor / MiB:.1f} MiB; fixed per node "
            f"(agent + warden): {statistics.median(fixed) / MiB:.0f} MiB",
            smaller,
            ">= 10x smaller",
            smaller >= 10,
        )
        for a in actors:
            ray.kill(a)
        ray.kill(actor)
        await cs.evict_all()

        print(f"{args.tenants} idle tenants on one node")
        t0 = time.perf_counter()
        sem = asyncio.Semaphore(64)

        async def activate(i: int) -> None:
            async with sem:
                await cs.call(f"idle-{i}", "put", "k", i)

        await asyncio.gather(*(activate(i) for i in range(args.tenants)))
        took = time.perf_counter() - t0
        stats = await cs.fetch_stats()
        by_node: dict[str, int] = {}
        for w in stats.workers:
            by_node[w.node] = by_node.get(w.node, 0) + 1
        pids = [w.pid for w in stats.workers if w.pid]
        total = sum(uss(pids))
        warm = await timed(lambda i: cs.call(f"idle-{i % args.tenants}", "put", "k", i), n)
        print(
            f"  {len(pids)} workers ({by_node and max(by_node.values())} on one node) started "
            f"in {took:.1f} s ({took / args.tenants * 1000:.1f} ms each, 64 at a time); "
            f"USS {total / MiB:.0f} MiB ({total / len(pids) / MiB:.2f} MiB each); warm call "
            f"among them {ms(warm):.3f} ms; as Ray actors: ~{per_actor * args.tenants / 2**30:.1f}"
            " GiB"
        )
        await cs.evict_all()

    print("\n| target | measured | ratio | goal | |")
    print("|---|---|---|---|---|")
    for name, measured, ratio, goal, ok in ROWS:
        verdict = "-" if goal == "-" else ("PASS" if ok else "**MISS**")
        print(f"| {name} | {measured} | {ratio:.2f}x | {goal} | {verdict} |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--new", type=int, default=100, help="new tenants timed")
    parser.add_argument("--actors", type=int, default=10, help="Ray actors created")
    parser.add_argument("--tenants", type=int, default=1000, help="idle tenants on one node")
    args = parser.parse_args()
    # One node, so that every tenant is "on one node" and every baseline actor beside them.
    cluster = Cluster(
        initialize_head=True, head_node_args={**NODE_ARGS, "include_dashboard": False}
    )
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, _node_ip_address=LOOPBACK, log_to_driver=False)
    print(
        f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}, ray {ray.__version__}, "
        f"corral {corral.__version__}; nodes: {[n['NodeManagerAddress'] for n in ray.nodes()]}"
    )
    try:
        asyncio.run(main(args))
    finally:
        ray.shutdown()
        cluster.shutdown()
