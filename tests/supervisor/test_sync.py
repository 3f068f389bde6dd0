"""The sync façade from many threads at once."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

import corral
from corral import SyncSupervisor
from tests.fakes import FakeLauncher
from tests.helpers import K, pid_gone, run_host


def test_sync_facade_from_many_threads() -> None:
    with SyncSupervisor(K, max_workers=4) as sup:

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
        f"sup = corral.SyncSupervisor({K!r})\n"
        "sup.start()\n"
        "print(sup.call('t', 'whoami')['pid'], flush=True)\n"
    )
    out, code_ = run_host(code, timeout=20)
    assert code_ == 0, out
    assert pid_gone(int(out.split()[0]))


def _loop_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "corral-loop"]


def test_a_start_that_fails_leaves_no_loop_thread_and_may_be_retried() -> None:
    """Regression: when the supervisor's start failed, its loop thread ran on (not a
    daemon, never closed), so the host could not exit, and each retry left one more."""
    before = _loop_threads()
    # A launcher that can never start: every Supervisor.start() fails with StartError.
    sup = SyncSupervisor(K, launcher=FakeLauncher(start_error="no warden here"))
    for _ in range(3):
        with pytest.raises(corral.StartError, match="no warden here"):
            sup.start()
        assert _loop_threads() == before
    with pytest.raises(corral.SupervisorClosedError):
        sup.call("t", "echo", 1)
    sup.close()  # nothing to close; closed for good from here
    with pytest.raises(corral.SupervisorClosedError):
        sup.start()


def test_a_host_whose_start_failed_still_exits() -> None:
    code = (
        "import corral\n"
        "from tests.fakes import FakeLauncher\n"
        "launcher = FakeLauncher(start_error='no warden here')\n"
        f"sup = corral.SyncSupervisor({K!r}, launcher=launcher)\n"
        "for _ in range(3):\n"
        "    try:\n"
        "        sup.start()\n"
        "    except corral.StartError:\n"
        "        print('refused', flush=True)\n"
    )
    out, code_ = run_host(code, timeout=30)
    assert code_ == 0, out  # None: it hung at exit, joining the loop thread
    assert out.split() == ["refused"] * 3


def test_start_after_close_is_refused_as_for_the_async_supervisor() -> None:
    sup = SyncSupervisor(K, max_workers=1)
    with sup:
        assert sup.call("t", "echo", 1) == 1
    with pytest.raises(corral.SupervisorClosedError, match="has been closed"):
        sup.start()
    with pytest.raises(corral.SupervisorClosedError):
        sup.call("t", "echo", 1)
    sup.close()  # again: a no-op
    assert _loop_threads() == []
