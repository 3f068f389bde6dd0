"""Prometheus metrics for the gateway, in a registry of its own.

Counters and the latency histogram are fed as things happen (lifecycle events from
the supervisor, each call's outcome from the app); gauges are read from
``Supervisor.stats()`` when ``/metrics`` is scraped, so they are never stale.
Label values are bounded: ``outcome`` is ``ok`` or an error type name (corral's, or the
gateway's few: ``BadJSON``, ``BodyTooLarge``, ``UnencodableResult``), ``reason`` and
``state`` are corral's own names, and per-worker memory is labelled by tenant only for
live workers (at most ``max_workers`` series). A tenant label is a key that passed the
tenant-key rule (``corral.TENANT_RULE``: at most 128 ASCII characters, no
control character or quote), so it needs no escaping and cannot stretch a scrape; keys
that break it are refused before a worker exists. Calls refused for their key, token
or route are not counted here (they never became calls); the gateway's log has them.

Over a Ray cluster (a ``ClusterStats`` snapshot, fetched by the app before each scrape)
the gauges are the cluster's sums; ``corral_worker_memory_bytes`` also has a ``node``
label (the Ray node id), and each node the directory knows gets
``corral_node_up``, ``corral_node_workers``, ``corral_node_max_workers`` and
``corral_node_memory_pressure``, labelled ``node`` and ``address`` (a lost node stays
listed, as ``corral_node_up`` 0). The counters count the events this gateway hears,
which are every node's: replicas of one deployment each count them all, so add up
one replica's, not all of them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from corral import SupervisorStats, WorkerEvent, WorkerState

__all__ = ["Metrics"]

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5,
                    10, 30)  # fmt: skip


class Metrics:
    """The gateway's metrics. ``stats`` gives the current snapshot at scrape time."""

    def __init__(self, stats: Callable[[], SupervisorStats | None]) -> None:
        self.registry = CollectorRegistry()
        self.calls = Counter(
            "corral_calls",
            "Calls through the gateway, by outcome (ok, or the corral error type).",
            ["outcome"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "corral_call_duration_seconds",
            "Time from a call's arrival to its answer, whatever the outcome.",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.starts = Counter("corral_worker_starts", "Workers started.", registry=self.registry)
        self.stops = Counter(
            "corral_worker_stops", "Workers stopped, by reason.", ["reason"], registry=self.registry
        )
        self.backoffs = Counter(
            "corral_tenant_backoffs",
            "Times a tenant was put in backoff after repeated failures.",
            registry=self.registry,
        )
        self.registry.register(_Snapshot(stats))

    def on_event(self, event: WorkerEvent) -> None:
        if event.kind == "starting":
            self.starts.inc()
        elif event.kind == "stopped":
            self.stops.labels(event.reason or "unknown").inc()
        elif event.kind == "backoff":
            self.backoffs.inc()

    def observe_call(self, outcome: str, seconds: float) -> None:
        self.calls.labels(outcome).inc()
        self.latency.observe(seconds)


class _Snapshot(Collector):
    def __init__(self, stats: Callable[[], SupervisorStats | None]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        stats = self._stats()
        if stats is None:
            return
        states = GaugeMetricFamily("corral_workers", "Live workers, by state.", labels=["state"])
        counts: dict[str, int] = {}
        for worker in stats.workers:
            counts[worker.state] = counts.get(worker.state, 0) + 1
        for state in (s.value for s in WorkerState if s is not WorkerState.DEAD):
            states.add_metric([state], counts.get(state, 0))
        yield states
        yield GaugeMetricFamily(
            "corral_max_workers", "The max_workers setting.", value=stats.max_workers
        )
        # A ClusterStats has nodes, and its workers (NodeWorkerInfo) their node; read by
        # name so that this module never imports corral.cluster (and Ray).
        nodes = getattr(stats, "nodes", None)
        memory = GaugeMetricFamily(
            "corral_worker_memory_bytes",
            "Tree RSS of each live worker (last sample; absent until sampled).",
            labels=["tenant"] if nodes is None else ["tenant", "node"],
        )
        for worker in stats.workers:
            if worker.rss is not None:
                labels = [worker.tenant]
                if nodes is not None:
                    labels.append(getattr(worker, "node", ""))
                memory.add_metric(labels, worker.rss)
        yield memory
        if nodes is not None:
            yield from _node_gauges(nodes)
        yield GaugeMetricFamily(
            "corral_tenants_in_backoff", "Tenants refused for now.", value=stats.tenants_in_backoff
        )
        yield GaugeMetricFamily(
            "corral_memory_pressure",
            "1 while new workers are refused for lack of memory.",
            value=0 if stats.memory_pressure is None else 1,
        )


def _node_gauges(nodes: list[Any]) -> Iterator[Metric]:
    """One series per node the directory knows (``ClusterStats.nodes``)."""
    labels = ["node", "address"]
    up = GaugeMetricFamily(
        "corral_node_up", "1 while corral's agent on the node is up.", labels=labels
    )
    workers = GaugeMetricFamily(
        "corral_node_workers", "Live workers on the node, as its agent last reported.",
        labels=labels,
    )  # fmt: skip
    limit = GaugeMetricFamily("corral_node_max_workers", "The node's max_workers.", labels=labels)
    pressure = GaugeMetricFamily(
        "corral_node_memory_pressure",
        "1 while the node refuses new workers for lack of memory.",
        labels=labels,
    )
    for node in nodes:
        key = [node.node, node.address]
        up.add_metric(key, 1 if node.state == "up" else 0)
        workers.add_metric(key, node.workers)
        limit.add_metric(key, node.max_workers)
        pressure.add_metric(key, 0 if node.memory_pressure is None else 1)
    yield from (up, workers, limit, pressure)
