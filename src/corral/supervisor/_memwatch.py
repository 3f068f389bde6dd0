"""The memory watch: sampling every worker and the host, and acting on what it finds.

:class:`MemoryWatch` owns the probe's thread, the :class:`MemoryPolicy`, the baseline
a fresh worker weighs, the pressure (and its words for ``stats()``) and the one
pressure victim on its way out. Each round it recycles workers over the soft limit
and, under pressure, stops one worker (a spare first, else the idle LRU, else it
drains the least recently used busy one) and refuses new workers (:meth:`admit`)
until the pressure is over. Not here: how memory is read
(:mod:`corral.supervisor._memory`), which workers exist (the pool).
"""

from __future__ import annotations

import asyncio
import logging

from corral.errors import MemoryPressureError, StartError
from corral.supervisor._handle import WorkerHandle
from corral.supervisor._memory import MemoryPolicy, MemorySample, ProbeThread
from corral.supervisor._pool import Pool
from corral.supervisor._process import Launcher
from corral.supervisor.records import StopReason, WorkerState

__all__ = ["MemoryWatch"]

log = logging.getLogger("corral")


class MemoryWatch:
    """Watches one supervisor's workers' memory and the host's.

    Args:
        probe: reads memory, on its own thread.
        policy: the limits (soft per worker, host floor, total).
        hard_limit: ``worker_memory_hard_limit`` (bytes), checked against the baseline.
        interval: seconds between samples.
        launcher: the workers' pids' meaning (namespaces) and memory cgroups.
        pool: the workers (the tenants' and the spares).
        tenant_limits: tenants' policies may set limits of their own: the baseline is
            measured at start for :meth:`check_limits` to check them against.
    """

    def __init__(
        self,
        *,
        probe: ProbeThread,
        policy: MemoryPolicy,
        hard_limit: int | None,
        interval: float,
        launcher: Launcher,
        pool: Pool,
        tenant_limits: bool = False,
    ) -> None:
        self.baseline: int | None = None  # bytes a fresh worker weighed at start
        self.pressure_detail = ""  # what the pressure is, while it lasts
        self._probe = probe
        self._policy = policy
        self._hard_limit = hard_limit
        self._interval = interval
        self._launcher = launcher
        self._pool = pool
        self._table = pool.table
        self._tenant_limits = tenant_limits
        self._running = False
        # The last worker stopped for pressure (draining or stopping) until it is settled:
        # no other is chosen while it is on its way out (invariant 9).
        self._victim: WorkerHandle | None = None

    @property
    def watches_limits(self) -> bool:
        return self._policy.soft_limit is not None or self._hard_limit is not None

    def check_limits(self, soft: int | None, hard: int | None) -> None:
        """Raise ValueError for limits at or below what a fresh worker weighs."""
        base = self.baseline
        for name, limit, factor in (
            ("worker_memory_limit", soft, 1.25),
            ("worker_memory_hard_limit", hard, 1.5),
        ):
            if limit is not None and base is not None and limit <= base * factor:
                raise ValueError(
                    f"{name}={limit} bytes ({limit / 2**20:.0f} MiB) is at or below a fresh "
                    f"worker's baseline ({base / 2**20:.0f} MiB measured at start, x{factor} "
                    "headroom): every worker would be stopped as soon as it started"
                )

    def admit(self, tenant: str) -> None:
        """Raises MemoryPressureError while memory is short (no new worker may start)."""
        if self._policy.pressure is not None:
            raise MemoryPressureError(
                f"no new worker for {tenant!r} while memory is short: {self.pressure_detail}",
                reason=self._policy.pressure.value,
                retry_after=self._interval,
            )

    async def start(self) -> None:
        """Check the limits against a fresh worker's weight (if any are set), then know the
        pressure before the first call can start a worker.

        Raises:
            StartError: the baseline could not be measured.
            ValueError: a limit at or below the baseline.
        """
        if self.watches_limits or self._tenant_limits:
            await self._check_baseline()
        self._running = True
        if self._policy.watches_pressure:
            await self.round()

    def halt(self) -> None:
        """The supervisor is closing: rounds from now on do nothing."""
        self._running = False

    async def aclose(self) -> None:
        self._running = False
        await self._probe.aclose()

    async def _check_baseline(self) -> None:
        """Measure what a fresh worker weighs (a forked worker starts as a copy of the
        warden) and refuse limits at or below that: they would recycle every worker as
        soon as it starts. Also says how the hard limit is enforced here."""
        warden = self._launcher.warden_pid
        try:
            if warden is not None:
                sample = await self._probe.sample([warden])
                self.baseline = sample.trees.get(warden)
        except Exception as exc:
            raise StartError(
                f"cannot measure a worker's baseline: {exc}", tenant="", pid=None
            ) from exc
        self.check_limits(self._policy.soft_limit, self._hard_limit)
        enforcement = self._launcher.memory_enforcement
        if self._hard_limit is not None:
            if enforcement.startswith("rlimit"):
                log.warning(
                    "worker_memory_hard_limit enforced by %s; a kernel sees MemoryError and "
                    "its children are limited one by one, not together",
                    enforcement,
                )
            else:
                log.info("worker_memory_hard_limit enforced by %s", enforcement)

    async def run(self) -> None:
        """Sample every worker's tree and the host, then act (see the module docstring),
        and sample again as soon as a pressure victim is reaped. Sampling never pauses
        longer than one interval, also while a victim drains or stops; the rounds taken
        meanwhile choose no other victim. Runs until cancelled."""
        while True:
            victim = await self.round()
            if victim is not None:
                try:
                    async with asyncio.timeout(self._interval):
                        await victim.wait_settled()
                    continue  # reaped: look again at once
                except TimeoutError:
                    continue  # still on its way out: sample again (it stays the one victim)
            await asyncio.sleep(self._interval)

    async def round(self) -> WorkerHandle | None:
        """One sample and what follows from it; returns the pressure victim, if any."""
        if not self._running:  # closing: the probe is (being) closed too
            return None
        handles = [h for h in self._pool.handles() if h.pid is not None]
        if not handles and not self._policy.watches_pressure:
            return None
        try:
            sample: MemorySample = await self._probe.sample(
                [h.pid for h in handles if h.pid],
                # With namespaces, a worker's pid is its init's: count what is below it.
                exclude_roots=self._launcher.pid_namespaces,
                # Workers with a memory cgroup are measured there too: what they started
                # is counted wherever it went.
                cgroups=self._launcher.memory_leaves(),
            )
        except Exception:
            # The probe is replaceable code at a boundary: a failing probe must not take the
            # supervisor down with it (the OS-enforced hard limit still holds).
            log.warning("memory probe failed; limits not checked this round", exc_info=True)
            return None
        by_pid = {h.pid: h for h in handles}
        for h in handles:
            if h.pid is not None:
                h.rss = sample.trees.get(h.pid, h.rss)
        limits = {h.pid: h.options.memory_soft_limit for h in handles if h.pid is not None}
        for pid in self._policy.over_soft_limit(sample, limits):
            over = by_pid.get(pid)
            if over is not None and over.is_serving:
                log.warning(
                    "worker over worker_memory_limit tenant=%s pid=%s reason=memory_limit: "
                    "uses %d MiB; replacing it",
                    over.tenant,
                    pid,
                    sample.trees[pid] // 2**20,
                    extra={"tenant": over.tenant, "pid": pid, "reason": "memory_limit"},
                )
                over.evict(StopReason.MEMORY_LIMIT)
        was = self._policy.pressure
        reason = self._policy.update_pressure(sample)
        self.pressure_detail = self._policy.describe(sample) if reason is not None else ""
        if reason is None:
            if was is not None:
                log.info("memory pressure is over")
                self._pool.refill()
            return None
        if was is None:
            log.warning(
                "memory pressure reason=%s: %s; stopping workers one at a time",
                reason.value,
                self.pressure_detail,
                extra={"reason": reason.value},
            )
        last = self._victim
        if last is not None and not last.is_settled:
            # One victim at a time: the next is chosen only once the last is reaped (or past
            # all corral can do to end it: SIGKILLed kill_timeout ago). Without this, a
            # victim slower to go than one interval (a long shutdown(), a drain, a busy
            # host) let every round stop one more worker before the memory they freed
            # could show in a sample.
            return last
        self._victim = None
        spare = self._pool.drop_spare(reason)  # a spare first: it serves nobody yet
        if spare is not None:
            self._victim = spare
            return spare
        idle = self._table.lru_victim()
        victim = self._table.peek(idle) if idle is not None else None
        if victim is None:  # nobody idle: drain the least recently used busy worker
            victim = next((h for h in self._table.handles() if h.state is WorkerState.BUSY), None)
        if victim is None:
            return None
        victim.evict(reason)
        self._victim = victim
        return victim
