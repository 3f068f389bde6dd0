"""Spare workers (``spare_workers=N``): started and sandboxed before any tenant asks, a
new tenant's first call takes one and only loads its kernel; counted against
``max_workers``, refilled in the background, each used once, under every preset."""

from __future__ import annotations

import pytest

import corral
from corral import Supervisor
from tests.helpers import FAST, K, pid_gone, start_strict, wait_until

pytestmark = pytest.mark.timeout(120)
PRESETS = {
    "none": corral.Sandbox.none(),
    "default": corral.Sandbox.default(),
    "strict": corral.Sandbox.strict(),
}


async def started(sandbox: str, **options: object) -> Supervisor:
    sup = Supervisor(K, sandbox=PRESETS[sandbox], **FAST, **options)  # type: ignore[arg-type]
    return await (start_strict(sup) if sandbox == "strict" else sup.start()) or sup


async def refilled(sup: Supervisor) -> list[int]:
    """The spares' pids once every spare being started is ready (no public wait: the
    pool's own event)."""
    await sup._pool.spares_started()
    return sup.stats().spares


@pytest.mark.parametrize("sandbox", list(PRESETS))
async def test_a_new_tenant_takes_a_spare_started_before_it_asked(sandbox: str) -> None:
    sup = await started(sandbox, spare_workers=2, max_workers=4)
    try:
        spares = sup.stats().spares  # ready when start() returns
        assert len(spares) == 2 and sup.keys() == []
        me = await sup.call("alpha", "whoami")
        info = sup.stats().workers[0]
        assert info.pid == spares[0] and info.tenant == "alpha"
        assert me["tenant"] == "alpha"  # the factory ran for this tenant, in the spare
        if sandbox == "strict":
            assert me["pid"] == 2 and info.kernel_pid not in (None, info.pid)
        else:
            assert me["pid"] == info.pid == info.kernel_pid
        # one more is started in its place; the other spare is still there, unused
        after = await refilled(sup)
        assert after[0] == spares[1] and len(after) == 2 and spares[0] not in after
    finally:
        await sup.aclose()


async def test_spares_count_against_max_workers_and_each_is_used_once() -> None:
    sup = await started("default", spare_workers=2, max_workers=2)
    try:
        spares = sup.stats().spares
        assert len(spares) == 2
        a = await sup.get_or_create("a")
        b = await sup.get_or_create("b")
        assert [a.pid, b.pid] == spares
        assert await refilled(sup) == []  # no room left for a spare
        # a third tenant: the least recently used tenant's worker makes room
        c = await sup.get_or_create("c")
        assert c.pid not in spares and sup.keys() == ["b", "c"]
        assert pid_gone(a.pid)  # its process, the spare it was, went with it
        # a spare is never handed back: evicting a tenant frees room for a new spare
        await sup.evict("b")
        new = await refilled(sup)
        assert len(new) == 1 and new[0] not in (a.pid, b.pid, c.pid)
        assert len(sup) + len(sup.stats().spares) <= 2
    finally:
        await sup.aclose()


async def test_events_name_the_tenant_only_once_a_spare_is_taken() -> None:
    seen: list[corral.WorkerEvent] = []
    sup = Supervisor(K, spare_workers=1, on_event=seen.append, **FAST)
    async with sup:
        assert seen == []  # a spare starting is no tenant's event
        await sup.call("t", "echo", 1)
        assert [(e.kind, e.tenant) for e in seen] == [("starting", "t"), ("ready", "t")]
        assert seen[1].pid == sup.stats().workers[0].pid


async def test_a_spare_killed_from_outside_is_not_handed_to_a_tenant() -> None:
    import os
    import signal

    from tests.helpers import wait_pid_gone

    sup = await started("default", spare_workers=1, max_workers=3)
    try:
        (spare,) = sup.stats().spares
        os.kill(spare, signal.SIGKILL)
        await wait_pid_gone(spare)
        # the warden reports it; the pool drops it: no tenant gets a dead spare
        info = await sup.get_or_create("t")
        assert info.pid != spare and await sup.call("t", "echo", 5) == 5
        # its pipe closed before it had a tenant: a failed start, no tenant's failure
        assert sup.stats().stops == {"start_failed": 1}
        assert sup.stats().tenants_in_backoff == 0
    finally:
        await sup.aclose()


def test_spare_workers_is_checked() -> None:
    with pytest.raises(ValueError, match="spare_workers"):
        Supervisor(K, spare_workers=-1)
    with pytest.raises(ValueError, match="at most max_workers"):
        Supervisor(K, spare_workers=3, max_workers=2)


async def test_a_tenant_whose_policy_differs_never_gets_a_spare_and_one_makes_room() -> None:
    def policy(tenant: str) -> corral.TenantPolicy:
        if tenant == "own":  # its own read paths: a spare was sandboxed without them
            return corral.TenantPolicy(extra_read_paths=("/srv/nothing-here",))
        return corral.TenantPolicy(version="v")

    sup = await started("default", spare_workers=2, max_workers=2, policy=policy)
    try:
        spares = sup.stats().spares
        own = await sup.get_or_create("own")
        assert own.pid not in spares  # started for it; a spare made room by going
        assert len(sup.stats().spares) == 1 and len(sup) == 1
        plain = await sup.get_or_create("plain")  # its policy fits a spare: it takes one
        assert plain.pid in spares and plain.version == "v"
    finally:
        await sup.aclose()


async def test_a_spare_that_says_hello_twice_before_its_tenant_is_killed() -> None:
    """Its module's import forged a Hello: the spare's second Hello before Bind is a
    protocol violation; that spare is killed, no tenant is handed it."""
    sup = Supervisor("tests.hello_at_import:make", spare_workers=1, **FAST)
    async with sup:
        # start() returned at the forged Hello; the worker's own one follows at once
        await wait_until(lambda: sup.stats().stops == {"protocol_error": 1})
        stats = sup.stats()
        assert stats.spares == [] and sup.keys() == [] and stats.tenants_in_backoff == 0
