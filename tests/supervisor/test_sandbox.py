"""Hostile kernels against the sandbox, in real worker processes.

Each attack runs under ``Sandbox.default()`` (the Supervisor default) and, where it
makes sense, under ``Sandbox.none()`` as the control that shows the attack works when
nothing stops it; every control is bounded so that it cannot hurt the machine (a
listener or file the test owns, signal 0 or a handled SIGUSR2, syscalls with arguments
that do nothing). The kernel-side probes are in ``tests/kernels.py``.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import resource
import shutil
import signal
import socket
import stat
import statistics
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal, cast

import msgspec
import psutil
import pytest

import corral
import tests.kernels
from corral import Sandbox, Supervisor
from corral.ipc import LayerCheck
from corral.supervisor._process import WardenLauncher
from corral.supervisor.records import LayerStatus
from corral.supervisor.sandbox import SandboxUnavailableError
from tests.helpers import FAST, K, pid_gone, wait_pid_gone

StartMethod = Literal["forkserver", "spawn"]
SANDBOXES = {"default": Sandbox.default(), "none": Sandbox.none()}
DENY_LAYERS = ("scratch_dir", "rlimits", "no_new_privs", "landlock", "seccomp", "capabilities")
ROOT_LAYERS = ("dedicated_uid", "cgroup_tree", "namespaces", "scratch_quota")
DEFAULT_ROOT_LAYERS = ("dedicated_uid", "cgroup_tree", "scratch_quota")  # default() asks
ROOT = os.geteuid() == 0

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(params=["forkserver", "spawn"])
def start_method(request: pytest.FixtureRequest) -> StartMethod:
    return cast(StartMethod, request.param)


@pytest.fixture(params=["default", "none"])
def sandbox_name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def supervisor(
    sandbox: Sandbox | str = "default", start_method: StartMethod = "forkserver", **kwargs: Any
) -> Supervisor:
    if isinstance(sandbox, str):
        sandbox = SANDBOXES[sandbox]
    return Supervisor(K, sandbox=sandbox, start_method=start_method, **{**FAST, **kwargs})


async def refused(sup: Supervisor, tenant: str, method: str, *args: Any) -> corral.KernelError:
    """The call raises KernelError (the kernel's own exception); return it."""
    with pytest.raises(corral.KernelError) as err:
        await sup.call(tenant, method, *args)
    return err.value


def assert_errno(err: corral.KernelError, remote_type: str, code: int) -> None:
    assert err.remote_type == f"builtins.{remote_type}", err
    assert err.remote_message.startswith(f"[Errno {code}]"), err


@pytest.fixture
def tcp_listener() -> Iterator[socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(5)
        yield listener


def file_size(*parts: str | Path) -> int | None:
    """Size of a file (or directory entry) the test checks from outside, None if it does not
    exist. Synchronous on purpose: test code may block, corral's may not."""
    try:
        return os.stat(os.path.join(*parts)).st_size
    except FileNotFoundError:
        return None


def accepted(listener: socket.socket) -> bool:
    """True if a connection is waiting (it completed in the backlog); the test may block."""
    conn, _ = listener.accept()
    conn.close()
    return True


# -- network -------------------------------------------------------------------------------------


async def test_tcp_connect_to_loopback(
    sandbox_name: str, start_method: StartMethod, tcp_listener: socket.socket
) -> None:
    port = tcp_listener.getsockname()[1]
    async with supervisor(sandbox_name, start_method) as sup:
        if sandbox_name == "none":
            assert await sup.call("t", "connect_tcp", port) == "connected"
            assert accepted(tcp_listener)
            return
        pid = (await sup.call("t", "whoami"))["pid"]
        assert_errno(await refused(sup, "t", "connect_tcp", port), "PermissionError", errno.EACCES)
        assert (await sup.call("t", "whoami"))["pid"] == pid  # a refusal, not a crash


@pytest.mark.parametrize("kind", ["path", "abstract"])
async def test_unix_socket_connect(
    kind: str, sandbox_name: str, start_method: StartMethod, tmp_path: Path
) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        if kind == "path":
            address = str(tmp_path / "s.sock")
        else:
            address = f"\0corral-test-{uuid.uuid4().hex}"
        listener.bind(address)
        listener.listen(4)
        listener.settimeout(5)
        async with supervisor(sandbox_name, start_method) as sup:
            if sandbox_name == "none":
                assert await sup.call("t", "connect_unix", address) == "connected"
                assert accepted(listener)
            else:
                err = await refused(sup, "t", "connect_unix", address)
                assert_errno(err, "PermissionError", errno.EACCES)  # seccomp: no AF_UNIX socket()


# -- filesystem ----------------------------------------------------------------------------------


async def test_reading_a_secret_outside_the_allowlist(
    sandbox_name: str, start_method: StartMethod, tmp_path: Path
) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("canary-secret")
    async with supervisor(sandbox_name, start_method) as sup:
        if sandbox_name == "none":
            assert await sup.call("t", "read_file", str(secret)) == len("canary-secret")
        else:
            err = await refused(sup, "t", "read_file", str(secret))
            assert_errno(err, "PermissionError", errno.EACCES)
            err = await refused(sup, "t", "read_file", "/etc/passwd")
            assert_errno(err, "PermissionError", errno.EACCES)


async def test_own_source_and_fresh_stdlib_imports_stay_readable(start_method: StartMethod) -> None:
    source = tests.kernels.__file__
    async with supervisor("default", start_method) as sup:
        assert await sup.call("t", "read_file", source) == file_size(source)
        parsed = await sup.call("t", "parse_xml", "<corral/>")
        assert parsed == {"was_loaded": False, "root": "corral"}  # imported in the sandbox


async def test_writes_are_confined_to_the_scratch_dir(
    start_method: StartMethod, tmp_path: Path
) -> None:
    outside = tmp_path / "escape.txt"
    async with supervisor("default", start_method) as sup:
        facts = await sup.call("t", "sandbox_facts")
        scratch = facts["cwd"]
        assert os.path.basename(scratch).startswith("corral-scratch-")
        assert os.path.dirname(scratch) == tempfile.gettempdir()
        assert facts["home"] == facts["tmpdir"] == scratch
        assert stat.S_IMODE(os.stat(scratch).st_mode) == 0o700

        err = await refused(sup, "t", "write_file", str(outside), 10)
        assert_errno(err, "PermissionError", errno.EACCES)
        assert file_size(outside) is None
        err = await refused(sup, "t", "write_file", os.path.join(scratch, "..", "up.txt"), 10)
        assert_errno(err, "PermissionError", errno.EACCES)

        assert await sup.call("t", "write_file", "inside.txt", 10) == 10
        assert file_size(scratch, "inside.txt") == 10
        assert await sup.evict("t")
        assert file_size(scratch) is None  # removed once the worker was reaped


async def test_writes_outside_work_without_the_sandbox(tmp_path: Path) -> None:
    outside = tmp_path / "escape.txt"
    async with supervisor("none") as sup:
        assert (await sup.call("t", "sandbox_facts"))["cwd"] == "/"  # no scratch dir
        assert await sup.call("t", "write_file", str(outside), 10) == 10
        assert file_size(outside) == 10


async def test_a_killed_wardens_scratch_dirs_are_removed() -> None:
    async with supervisor("default") as sup:
        facts = await sup.call("t", "sandbox_facts")
        try:
            assert await sup.call("t", "write_file", "tenant-data.txt", 10) == 10
            os.kill(sup._launcher.warden_pid, signal.SIGKILL)  # type: ignore[attr-defined]
            await wait_pid_gone(facts["pid"], timeout=10)  # the worker's parent-death signal
            async with asyncio.timeout(30):
                assert await sup.call("t", "echo", 2) == 2  # served by a new warden
        except BaseException:
            shutil.rmtree(facts["cwd"], ignore_errors=True)
            raise
    try:
        assert file_size(facts["cwd"], "tenant-data.txt") is None
        assert file_size(facts["cwd"]) is None
    finally:
        shutil.rmtree(facts["cwd"], ignore_errors=True)  # do not litter /tmp while the bug lives


@pytest.mark.parametrize(
    "method",
    [
        "forkserver",
        "spawn",
    ],
)
async def test_tempfile_uses_the_scratch_dir(method: StartMethod) -> None:
    async with supervisor("default", method) as sup:
        scratch = (await sup.call("t", "sandbox_facts"))["cwd"]
        path = await sup.call("t", "make_temp")
        assert os.path.dirname(path) == scratch


# -- resource limits -----------------------------------------------------------------------------


async def test_a_file_past_the_size_limit_gets_efbig_and_the_worker_stays() -> None:
    small = msgspec.structs.replace(
        Sandbox.default(), rlimits={"core": 0, "nofile": 1024, "fsize": 1 << 20}
    )
    async with supervisor(small) as sup:
        facts = await sup.call("t", "sandbox_facts")
        assert facts["fsize"] == [1 << 20, 1 << 20]
        err = await refused(sup, "t", "write_file", "huge.bin", 2 << 20)
        assert_errno(err, "OSError", errno.EFBIG)  # Python ignores SIGXFSZ
        assert file_size(facts["cwd"], "huge.bin") == 1 << 20
        assert await sup.call("t", "write_file", "small.bin", 1000) == 1000
        assert (await sup.call("t", "whoami"))["pid"] == facts["pid"]


async def test_fd_exhaustion_gets_emfile_and_the_worker_keeps_serving() -> None:
    async with supervisor("default") as sup:
        facts = await sup.call("t", "sandbox_facts")
        assert facts["nofile"] == [1024, 1024]
        err = await refused(sup, "t", "open_until_emfile", 4096)
        assert_errno(err, "OSError", errno.EMFILE)
        assert await sup.call("t", "echo", "still here") == "still here"
        assert len(await sup.call("t", "open_fds")) < 64  # the method closed what it opened
        assert (await sup.call("t", "whoami"))["pid"] == facts["pid"]


async def test_no_core_dumps(sandbox_name: str) -> None:
    async with supervisor(sandbox_name) as sup:
        core = (await sup.call("t", "sandbox_facts"))["core"]
    if sandbox_name == "default":
        assert core == [0, 0]  # hard limit too: the kernel cannot raise it again
    else:
        assert core == list(resource.getrlimit(resource.RLIMIT_CORE))  # inherited, untouched


async def test_no_new_privs_and_seccomp_are_set(sandbox_name: str) -> None:
    async with supervisor(sandbox_name) as sup:
        facts = await sup.call("t", "sandbox_facts")
    if sandbox_name == "default":
        assert (facts["no_new_privs"], facts["seccomp"]) == ("1", "2")  # 2: filter mode
    else:
        assert (facts["no_new_privs"], facts["seccomp"]) == ("0", "0")


# -- signals -------------------------------------------------------------------------------------


async def test_signalling_the_supervisor_and_the_warden(sandbox_name: str) -> None:
    loop = asyncio.get_running_loop()
    got_usr2 = asyncio.Event()
    loop.add_signal_handler(signal.SIGUSR2, got_usr2.set)  # harmless if the attack lands
    try:
        async with supervisor(sandbox_name) as sup:
            warden = (await sup.call("t", "whoami"))["ppid"]
            me = os.getpid()
            if sandbox_name == "none":
                assert await sup.call("t", "send_signal", me, signal.SIGUSR2)
                async with asyncio.timeout(30):
                    await got_usr2.wait()
                assert await sup.call("t", "send_signal", warden, 0)
                return
            for target, signum in ((me, signal.SIGUSR2), (me, 0), (warden, 0)):
                err = await refused(sup, "t", "send_signal", target, signum)
                assert_errno(err, "PermissionError", errno.EPERM)  # Landlock signal scope
            assert not got_usr2.is_set()  # kill() failed, so nothing is in flight
    finally:
        loop.remove_signal_handler(signal.SIGUSR2)


async def test_signalling_a_sibling_worker(sandbox_name: str) -> None:
    async with supervisor(sandbox_name) as sup:
        sibling = (await sup.call("b", "whoami"))["pid"]
        if sandbox_name == "none":
            assert await sup.call("a", "send_signal", sibling, 0)  # it could have been SIGKILL
            return
        err = await refused(sup, "a", "send_signal", sibling, signal.SIGKILL)
        assert_errno(err, "PermissionError", errno.EPERM)
        assert (await sup.call("b", "whoami"))["pid"] == sibling
        assert sup.stats().stops == {}


# -- syscalls ------------------------------------------------------------------------------------

# What each raw syscall gets under default(); the control must get something else.
SYSCALLS = {
    "ptrace": errno.EPERM,
    "process_vm_readv": errno.EPERM,
    "unshare": errno.EPERM,
    "setns": errno.EPERM,
    "mount": errno.EPERM,
    "bpf": errno.EPERM,
    "perf_event_open": errno.EPERM,
    "keyctl": errno.EPERM,
    "userfaultfd": errno.EPERM,
    "x32_getpid": errno.EPERM,
    "io_uring_setup": errno.ENOSYS,  # as if the kernel had none: libraries fall back
}


async def test_dangerous_syscalls(sandbox_name: str) -> None:
    async with supervisor(sandbox_name) as sup:
        got = {name: await sup.call("t", "raw_syscall", name) for name in SYSCALLS}
        if sandbox_name == "default":
            assert got == SYSCALLS
            err = await refused(sup, "t", "netlink_socket")
            assert_errno(err, "PermissionError", errno.EACCES)
        else:
            assert all(got[name] != SYSCALLS[name] for name in SYSCALLS), got
            assert got["unshare"] == 0  # unshare(0): allowed and a no-op
            assert await sup.call("t", "netlink_socket") == "opened"


async def test_a_foreign_syscall_abi_kills_the_worker(sandbox_name: str) -> None:
    async with supervisor(sandbox_name) as sup:
        pid = (await sup.call("t", "whoami"))["pid"]
        if sandbox_name == "none":
            assert await sup.call("t", "i386_getpid") == pid
            return
        with pytest.raises(corral.WorkerCrashedError) as err:
            await sup.call("t", "i386_getpid")  # int 0x80 from x86_64 code
        assert err.value.signal == signal.SIGSYS
        assert (await sup.call("t", "whoami"))["pid"] != pid  # a fresh worker serves


# -- one layer at a time -------------------------------------------------------------------------


async def test_landlock_alone_denies_tcp_abstract_sockets_and_files(
    tcp_listener: socket.socket, tmp_path: Path
) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("canary-secret")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as abstract:
        address = f"\0corral-test-{uuid.uuid4().hex}"
        abstract.bind(address)
        abstract.listen(4)
        landlock_only = msgspec.structs.replace(Sandbox.default(), seccomp=False)
        async with supervisor(landlock_only) as sup:
            port = tcp_listener.getsockname()[1]
            err = await refused(sup, "t", "connect_tcp", port)
            assert_errno(err, "PermissionError", errno.EACCES)
            err = await refused(sup, "t", "connect_unix", address)
            assert_errno(err, "PermissionError", errno.EPERM)  # scoped abstract sockets
            err = await refused(sup, "t", "read_file", str(secret))
            assert_errno(err, "PermissionError", errno.EACCES)
            assert await sup.call("t", "raw_syscall", "unshare") == 0  # seccomp really is off
            assert str(sup.stats().sandbox["seccomp"]) == "off"


async def test_seccomp_alone_denies_sockets(tcp_listener: socket.socket, tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("canary-secret")
    # (no uid of its own either: the secret is in the test's private temporary directory)
    seccomp_only = msgspec.structs.replace(Sandbox.default(), landlock=False, dedicated_uid=False)
    async with supervisor(seccomp_only) as sup:
        port = tcp_listener.getsockname()[1]
        err = await refused(sup, "t", "connect_tcp", port)
        assert_errno(err, "PermissionError", errno.EACCES)
        err = await refused(sup, "t", "connect_unix", str(tmp_path / "nobody.sock"))
        assert_errno(err, "PermissionError", errno.EACCES)
        assert await sup.call("t", "read_file", str(secret)) == len("canary-secret")
        assert str(sup.stats().sandbox["landlock"]) == "off"


# -- reporting and refusing ----------------------------------------------------------------------


async def test_stats_report_every_layer(sandbox_name: str) -> None:
    async with supervisor(sandbox_name) as sup:
        await sup.call("t", "echo", 1)
        report = sup.stats().sandbox
    assert set(report) == {*DENY_LAYERS, *ROOT_LAYERS}
    assert str(report["namespaces"]) == "off"
    if sandbox_name == "none":
        assert all(report[layer].state == "off" for layer in (*DENY_LAYERS, *ROOT_LAYERS))
        return
    assert str(report["landlock"]).startswith("on (ABI ")
    assert int(str(report["landlock"]).removeprefix("on (ABI ").rstrip(")")) >= 6
    assert str(report["capabilities"]) == (
        "on (all dropped: effective, permitted, inheritable, ambient, bounding)"
        if ROOT
        else "on (none held: the host runs without capabilities)"
    )
    plain = ("scratch_dir", "rlimits", "no_new_privs", "seccomp")
    assert all(str(report[layer]) == "on" for layer in plain)
    for layer in DEFAULT_ROOT_LAYERS:  # best effort: root gives them, others say why not
        assert str(report[layer]).startswith("on (" if ROOT else "unavailable: "), report


@pytest.fixture
def unreadable(tmp_path: Path) -> Sandbox:
    """strict(), asked to let workers read a directory only root can read: the dedicated
    uid cannot be provided, whatever the host."""
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    return msgspec.structs.replace(Sandbox.strict(), extra_read_paths=(str(private),))


async def test_strict_refuses_to_start_and_leaves_no_process(unreadable: Sandbox) -> None:
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    sup = supervisor(unreadable)
    with pytest.raises(corral.StartError) as err:
        await sup.start()
    message = str(err.value)
    assert "dedicated_uid (a worker's uid cannot read /" in message, message
    assert "best_effort=True" in message
    assert not [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
    assert sup.stats().state == "closed"
    with pytest.raises(corral.SupervisorClosedError):
        await sup.call("t", "echo", 1)


async def test_aclose_after_a_refused_start_is_a_no_op(unreadable: Sandbox) -> None:
    sup = supervisor(unreadable)
    with pytest.raises(corral.StartError):
        await sup.start()
    async with asyncio.timeout(30):
        await sup.aclose()
    assert sup.stats().state == "closed"


async def test_strict_best_effort_starts_and_reports_what_is_missing(
    unreadable: Sandbox, caplog: pytest.LogCaptureFixture
) -> None:
    best_effort = msgspec.structs.replace(unreadable, best_effort=True)
    with caplog.at_level(logging.WARNING, logger="corral"):
        async with supervisor(best_effort) as sup:
            facts = await sup.call("t", "sandbox_facts")
            report = sup.stats().sandbox
    assert facts["no_new_privs"] == "1" and facts["seccomp"] == "2"  # the rest still applies
    assert str(report["dedicated_uid"]).startswith("unavailable: "), report
    assert any("dedicated_uid" in r.getMessage() for r in caplog.records)
    assert str(report["cgroup_tree"]).startswith("on (cgroup v1 pids"), report
    assert str(report["namespaces"]).startswith("on ("), report
    assert facts["pid"] == 2  # in its own PID namespace, as root (no uid of its own)
    assert all(report[layer].on for layer in DENY_LAYERS)


@pytest.mark.skipif(not ROOT, reason="a uid of its own is what default() adds as root")
async def test_default_without_a_readable_path_keeps_the_host_uid_and_says_why(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """default() asks for a uid per worker only where the code is readable by another uid;
    where it is not, the worker runs as the host's uid (its capabilities still dropped),
    with a warning and the reason in stats()."""
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    sandbox = msgspec.structs.replace(Sandbox.default(), extra_read_paths=(str(private),))
    with caplog.at_level(logging.WARNING, logger="corral"):
        async with supervisor(sandbox) as sup:
            me = await sup.call("t", "identity")
            report = sup.stats().sandbox
    assert me["uid"] == 0, me
    assert str(report["dedicated_uid"]).startswith("unavailable: a worker's uid cannot read "), (
        report
    )
    assert str(private) in str(report["dedicated_uid"])
    assert any("dedicated_uid" in r.getMessage() for r in caplog.records)
    assert str(report["capabilities"]).startswith("on (all dropped"), report


NON_ROOT_HOST = {
    "landlock": LayerCheck(True, "ABI 7"),
    "seccomp": LayerCheck(True, ""),
    "cgroup_tree": LayerCheck(False, "not root"),
    "dedicated_uid": LayerCheck(False, "needs root"),
    "namespaces": LayerCheck(False, "needs root"),
    "scratch_quota": LayerCheck(False, "needs root"),
    "capabilities": LayerCheck(True, "none held"),
}


def test_strict_on_a_host_without_root_names_every_missing_layer() -> None:
    with pytest.raises(SandboxUnavailableError) as err:
        Sandbox.strict().resolve(NON_ROOT_HOST)
    for layer in ROOT_LAYERS:
        assert f"{layer} (" in str(err.value)
    best_effort = msgspec.structs.replace(Sandbox.strict(), best_effort=True)
    spec, report = best_effort.resolve(NON_ROOT_HOST)
    assert (spec.cgroup_tree, spec.uid_range, spec.namespaces) == (False, None, False)
    assert spec.seccomp and spec.landlock
    assert {layer: report[layer] for layer in ROOT_LAYERS} == {
        layer: LayerStatus("unavailable", NON_ROOT_HOST[layer].detail) for layer in ROOT_LAYERS
    }


@pytest.mark.parametrize(
    ("rlimits", "match"),
    [
        ({"stack": 1 << 20}, "unknown limit 'stack'"),
        ({"core": -1}, "must be an int >= 0"),
        ({"cpu": 1.5}, "must be an int >= 0"),
        ({"nofile": 63}, "below 64"),
    ],
)
def test_bad_rlimits_are_refused_at_construction(rlimits: dict[str, Any], match: str) -> None:
    bad = msgspec.structs.replace(Sandbox.default(), rlimits=rlimits)
    with pytest.raises(ValueError, match=match):
        Supervisor(K, sandbox=bad)


def test_the_smallest_fd_limit_is_accepted() -> None:
    ok = msgspec.structs.replace(Sandbox.default(), rlimits={"nofile": 64})
    assert Supervisor(K, sandbox=ok).stats().state == "new"


# -- cost ----------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
async def test_measure_the_cost_of_the_default_sandbox() -> None:
    """Prints (does not assert) warm-call and cold-start medians, none() vs default(),
    measured interleaved so that both see the same machine."""
    warm: dict[str, list[float]] = {"none": [], "default": []}
    cold: dict[str, list[float]] = {"none": [], "default": []}
    async with (
        supervisor("none", max_workers=4) as none,
        supervisor("default", max_workers=4) as default,
    ):
        sups = {"none": none, "default": default}
        for sup in sups.values():
            await sup.call("warm", "echo", 0)  # warden up, worker loaded
        for i in range(2000):
            for name, sup in sups.items():
                t0 = time.perf_counter()
                assert await sup.call("warm", "echo", i) == i
                warm[name].append(time.perf_counter() - t0)
        for i in range(20):
            for name, sup in sups.items():
                t0 = time.perf_counter()
                assert await sup.call(f"cold{i}", "echo", i) == i
                cold[name].append(time.perf_counter() - t0)
                assert await sup.evict(f"cold{i}")
        nnp = {
            name: (await sup.call("warm", "sandbox_facts"))["no_new_privs"]
            for name, sup in sups.items()
        }
        assert nnp == {"none": "0", "default": "1"}
        assert none.stats().starts == default.stats().starts == 21
    w = {name: statistics.median(v) * 1e3 for name, v in warm.items()}
    c = {name: statistics.median(v) * 1e3 for name, v in cold.items()}
    print(
        f"\nwarm call median: none {w['none']:.3f} ms, default {w['default']:.3f} ms "
        f"(x{w['default'] / w['none']:.2f})"
        f"\ncold start median: none {c['none']:.2f} ms, default {c['default']:.2f} ms "
        f"(x{c['default'] / c['none']:.2f})"
    )


async def test_cgroup_tree_bounds_threads_and_kills_a_setsid_daemon() -> None:
    tree = msgspec.structs.replace(Sandbox.default(), cgroup_tree=True, max_processes=32)
    async with supervisor(tree) as sup:
        assert str(sup.stats().sandbox["cgroup_tree"]).startswith("on (cgroup v1 pids")
        daemon = await sup.call("t", "start_child", True)  # double fork into its own session
        assert not pid_gone(daemon)
        await sup.evict("t")
        # SIGKILLed with the worker's tree before evict() returned; it dies once the
        # kernel delivers that signal (a deadline, not a measurement).
        await wait_pid_gone(daemon, 30.0)
        outcome = await sup.call("u", "many_threads", 100)
        assert 20 <= outcome["started"] < 32 and "can't start new thread" in outcome["error"]
        assert await sup.call("u", "echo", 1) == 1  # the worker is fine after the bomb


async def test_no_new_namespaces_and_no_device_nodes_but_fifos_and_forks_work() -> None:
    async with supervisor(Sandbox.default()) as sup:
        assert await sup.call("t", "clone_new_namespace") == "EPERM"
        assert await sup.call("t", "mknod", "char") == "EACCES"  # in its own scratch dir
        assert await sup.call("t", "mknod", "fifo") == "made"
        assert (await sup.call("t", "many_threads", 20))["started"] == 20  # clone3 -> clone


async def test_a_scratch_tree_too_deep_to_remove_does_not_take_the_warden_down() -> None:
    async with supervisor(Sandbox.default()) as sup:
        launcher = sup._launcher
        assert isinstance(launcher, WardenLauncher)
        warden = launcher.warden_pid
        assert await sup.call("t", "deep_tree", 3000) == 3000
        await sup.evict("t")  # the warden removes the scratch dir before reporting the exit
        prefix = f"corral-scratch-{warden}-"
        assert not [n for n in os.listdir(tempfile.gettempdir()) if n.startswith(prefix)]
        assert await sup.call("u", "echo", 1) == 1
        assert launcher.warden_pid == warden  # the same warden, still serving
