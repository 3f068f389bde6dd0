"""Prometheus metrics for the gateway, in a registry of its own.

Counters and the latency histogram are fed as things happen (lifecycle events from
the supervisor, each call's outcome from the app); gauges are read from
``Supervisor.stats()`` when ``/metrics`` is scraped, so they are never stale.
Label values are bounded: ``outcome`` is ``ok`` or an error type name (corral's, or the
gateway's few: ``BadJSON``, ``BodyTooLarge``, ``UnencodableResult``), ``reason`` and
``state`` are corral's own names, and per-worker memory is labelled by tenant only for
live workers (at most ``max_workers`` series). A tenant label is a key that passed the
tenant-key rule (``corral.supervisor.tenants``: at most 128 ASCII characters, no
control character or quote), so it needs no escaping and cannot stretch a scrape; keys
that break it are refused before a worker exists. Calls refused for their key, token
or route are not counted here (they never became calls); the gateway's log has them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from corral.supervisor._api import SupervisorStats, WorkerEvent
from corral.supervisor.lifecycle import WorkerState

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
        memory = GaugeMetricFamily(
            "corral_worker_memory_bytes",
            "Tree RSS of each live worker (last sample; absent until sampled).",
            labels=["tenant"],
        )
        for worker in stats.workers:
            if worker.rss is not None:
                memory.add_metric([worker.tenant], worker.rss)
        yield memory
        yield GaugeMetricFamily(
            "corral_tenants_in_backoff", "Tenants refused for now.", value=stats.tenants_in_backoff
        )
        yield GaugeMetricFamily(
            "corral_memory_pressure",
            "1 while new workers are refused for lack of memory.",
            value=0 if stats.memory_pressure is None else 1,
        )
