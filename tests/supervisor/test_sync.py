"""The sync façade from many threads at once."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

import corral
from corral import SyncSupervisor
from tests.helpers import pid_gone, run_host


def test_sync_facade_from_many_threads() -> None:
    with SyncSupervisor("tests.kernels:make", max_workers=4) as sup:

        def work(i: int) -> tuple[str, int]:
            tenant = f"t{i % 6}"
            assert sup.call(tenant, "echo", i) == i
            return tenant, sup.call(tenant, "whoami")["pid"]

        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(work, range(64)))
        assert {t for t, _ in results} == {f"t{i}" for i in range(6)}
        assert len(sup) <= 4 and len(sup.keys()) == len(sup)
        pid = sup.get_or_create("solo").pid
        assert pid is not None and "solo" in sup
        assert sup.invoke("solo", "add", (1,), {"b": 2}, timeout=30) == 3
        with pytest.raises(corral.KernelError):
            sup.call("solo", "fail", "x")
        assert sup.evict("solo") is True and pid_gone(pid)
        assert sup.stats().max_workers == 4
        live = len(sup.keys())
        assert live > 0 and sup.evict_all() == live
        assert sup.keys() == []
    assert not any(t.name == "corral-loop" for t in threading.enumerate())
    with pytest.raises(corral.SupervisorClosedError):
        sup.call("t", "echo", 1)


def test_a_host_that_never_closes_still_exits_and_leaves_nothing() -> None:
    """Regression: the loop thread is not a daemon and Python joins such threads before
    atexit handlers run, so a host that forgot close() hung at exit forever."""
    code = (
        "import corral\n"
        "sup = corral.SyncSupervisor('tests.kernels:make')\n"
        "sup.start()\n"
        "print(sup.call('t', 'whoami')['pid'], flush=True)\n"
    )
    out, code_ = run_host(code, timeout=20)
    assert code_ == 0, out
    assert pid_gone(int(out.split()[0]))
