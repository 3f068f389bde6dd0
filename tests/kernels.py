"""Kernels used by the tests, loaded in real worker processes by import string
("tests.kernels:<factory>"). Some misbehave on purpose."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Any


class Kernel:
    """A well-behaved kernel with a few levers for tests."""

    def __init__(self, tenant: str) -> None:
        self.tenant = tenant
        self.calls = 0
        self.gates: dict[str, asyncio.Event] = {}
        self.entered: dict[str, asyncio.Event] = {}

    def _gate(self, table: dict[str, asyncio.Event], name: str) -> asyncio.Event:
        if name not in table:
            table[name] = asyncio.Event()
        return table[name]

    def echo(self, value: Any) -> Any:
        self.calls += 1
        return value

    def whoami(self) -> dict[str, Any]:
        return {"tenant": self.tenant, "pid": os.getpid(), "ppid": os.getppid()}

    def add(self, a: int, b: int = 0) -> int:
        return a + b

    async def async_echo(self, value: Any, delay: float = 0.0) -> Any:
        if delay:
            await asyncio.sleep(delay)  # ok-sleep: kernel workload, not synchronisation
        return value

    async def hold(self, name: str) -> str:
        """Announce 'entered', then wait until ``release(name)`` is called."""
        self._gate(self.entered, name).set()
        await self._gate(self.gates, name).wait()
        return f"released {name}"

    async def wait_entered(self, name: str) -> bool:
        await self._gate(self.entered, name).wait()
        return True

    def release(self, name: str) -> bool:
        self._gate(self.gates, name).set()
        return True

    def fail(self, message: str) -> None:
        raise ValueError(message)

    def crash(self, code: int = 3) -> None:
        os._exit(code)

    def exit_cleanly(self) -> None:
        sys.exit(0)

    def kill_self(self, signum: int = signal.SIGKILL) -> None:
        os.kill(os.getpid(), signum)

    def spin(self, seconds: float = 3600.0) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            pass

    def env(self) -> dict[str, str]:
        with open("/proc/self/environ", "rb") as f:
            raw = f.read()
        out = {}
        for item in raw.split(b"\0"):
            if b"=" in item:
                k, _, v = item.partition(b"=")
                out[k.decode()] = v.decode()
        return out

    def open_fds(self) -> list[int]:
        return sorted(int(fd) for fd in os.listdir("/proc/self/fd"))

    def start_child(self, detach: bool = False) -> int:
        """Start a long-lived grandchild; with ``detach`` it double-forks into its own session."""
        code = "import time; time.sleep(3600)"  # ok-sleep: kernel workload, not synchronisation
        if detach:
            code = (
                "import os, subprocess, sys;"
                f"p = subprocess.Popen([sys.executable, '-c', {code!r}],"
                " start_new_session=True, stdout=subprocess.DEVNULL,"
                " stderr=subprocess.DEVNULL); print(p.pid, flush=True)"
            )
            out = subprocess.run(
                [sys.executable, "-c", code], capture_output=True, text=True, check=True
            )
            return int(out.stdout.strip())
        proc = subprocess.Popen([sys.executable, "-c", code])
        return proc.pid

    def garbage(self) -> None:
        os.write(4, b"\x00\x00\x00\x05" + b"\xc1" * 5)  # a frame whose body is not msgpack

    def write_raw(self, data: bytes) -> str:
        """Write ``data`` straight to the reply pipe, then answer normally."""
        os.write(4, data)
        return "written"

    def oversize(self, claimed: int) -> None:
        os.write(4, claimed.to_bytes(4, "big") + b"x")

    def unknown_reply(self) -> None:
        import msgspec

        from corral.ipc import Result, encode_frame

        os.write(4, bytes(encode_frame(Result(987654, msgspec.Raw(msgspec.msgpack.encode(1))))))

    def close_pipe(self) -> None:
        os.close(4)
        time.sleep(3600)  # ok-sleep: lives on with its pipe closed until killed

    def big(self, size: int) -> bytes:
        return b"x" * size

    def unencodable(self) -> object:
        return object()

    def print_lines(self, n: int) -> int:
        for i in range(n):
            print(f"line {i}", flush=True)
        return n

    def shutdown(self) -> None:
        print(f"shutdown hook ran for {self.tenant}", flush=True)


def make(tenant: str) -> Kernel:
    return Kernel(tenant)


class StubbornKernel(Kernel):
    """shutdown() never returns; with 'ignore-term' in the tenant, SIGTERM is ignored too."""

    def __init__(self, tenant: str) -> None:
        super().__init__(tenant)
        if "ignore-term" in tenant:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)

    def shutdown(self) -> None:
        time.sleep(3600)  # ok-sleep: a hook that hangs, to force escalation


def stubborn(tenant: str) -> Kernel:
    return StubbornKernel(tenant)


def broken(tenant: str) -> Kernel:
    raise RuntimeError(f"factory refuses {tenant}")


def hang_on_import(tenant: str) -> Kernel:
    time.sleep(3600)  # ok-sleep: a factory that never returns
    raise AssertionError


async def async_factory(tenant: str) -> Kernel:
    await asyncio.sleep(0)  # ok-sleep: kernel workload, not synchronisation
    return Kernel(tenant)


def exits_in_factory(tenant: str) -> Kernel:
    os._exit(7)


_HOARD: list[bytearray] = []


def hog(self: Kernel, megabytes: int, keep: bool = True) -> int:
    """Allocate and touch ``megabytes`` MiB (kept alive across calls unless ``keep`` is False)."""
    block = bytearray(megabytes * 1024 * 1024)  # zero-filled: every page touched
    if keep:
        _HOARD.append(block)
    return sum(len(b) for b in _HOARD)


Kernel.hog = hog  # type: ignore[attr-defined]


_BOMB_CAP_MB = 4096  # a bomb stops here even if no limit stops it first: 4 GiB of a 24 GiB host


def bomb(self: Kernel, step_mb: int = 8, cap_mb: int = _BOMB_CAP_MB, report: bool = False) -> int:
    """Allocate and touch memory in a tight loop until something stops it, or ``cap_mb``
    (at most 4 GiB) is reached; returns the MiB allocated. Nothing is kept after the call.
    With ``report``, prints ``bomb holds <n> MiB`` after each step: the worker's output
    says how far a bomb got even if the OS killed it (the last line before the limit)."""
    blocks: list[bytearray] = []
    cap_mb = min(cap_mb, _BOMB_CAP_MB)
    while len(blocks) * step_mb < cap_mb:
        blocks.append(bytearray(step_mb * 1024 * 1024))  # zero-filled: every page touched
        if report:
            print(f"bomb holds {len(blocks) * step_mb} MiB", flush=True)
    return len(blocks) * step_mb


def many_threads(self: Kernel, n: int = 50) -> dict[str, Any]:
    """Start ``n`` threads that are all alive at once (each does a little work, then waits
    for the rest), join them, and say how many started and finished (and why one could not
    start)."""
    import threading

    go = threading.Event()
    done: list[int] = []

    def work(i: int) -> None:
        total = sum(range(10_000 + i))
        go.wait(30)
        done.append(total)

    threads: list[threading.Thread] = []
    error = None
    for i in range(n):
        thread = threading.Thread(target=work, args=(i,))
        try:
            thread.start()
        except Exception as exc:  # "can't start new thread" under a memory limit
            error = f"{type(exc).__name__}: {exc}"
            break
        threads.append(thread)
    go.set()
    for thread in threads:
        thread.join(30)
    return {"started": len(threads), "finished": len(done), "error": error}


Kernel.bomb = bomb  # type: ignore[attr-defined]
Kernel.many_threads = many_threads  # type: ignore[attr-defined]


async def hold_until_signal(self: Kernel, name: str, signum: int = signal.SIGUSR1) -> str:
    """Announce 'entered' (see ``wait_entered``), then wait until the worker receives
    ``signum``: a gate the test can open while the supervisor accepts no calls for it."""
    loop = asyncio.get_running_loop()
    opened = asyncio.Event()
    loop.add_signal_handler(signum, opened.set)
    try:
        self._gate(self.entered, name).set()
        await opened.wait()
    finally:
        loop.remove_signal_handler(signum)
    return f"released {name}"


Kernel.hold_until_signal = hold_until_signal  # type: ignore[attr-defined]


def _connect_tcp(self: Kernel, port: int) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=2):
        return "connected"


def _read_file(self: Kernel, path: str) -> int:
    with open(path, "rb") as f:
        return len(f.read())


def _write_file(self: Kernel, path: str, size: int) -> int:
    with open(path, "wb") as f:
        return f.write(b"x" * size)


Kernel.connect_tcp = _connect_tcp  # type: ignore[attr-defined]
Kernel.read_file = _read_file  # type: ignore[attr-defined]
Kernel.write_file = _write_file  # type: ignore[attr-defined]


# -- hostile probes for the sandbox tests (tests/supervisor/test_sandbox.py) ---------------------


def _connect_unix(self: Kernel, address: str) -> str:
    """Connect to a unix socket; an address starting with NUL is abstract."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(2)
        sock.connect(address)
        return "connected"


def _netlink_socket(self: Kernel) -> str:
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0):  # NETLINK_ROUTE
        return "opened"


def _sandbox_facts(self: Kernel) -> dict[str, Any]:
    """Where the worker runs and what it runs under."""
    import resource

    with open("/proc/self/status") as f:
        status = dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)
    return {
        "pid": os.getpid(),
        "ppid": os.getppid(),
        "cwd": os.getcwd(),
        "home": os.environ.get("HOME"),
        "tmpdir": os.environ.get("TMPDIR"),
        "no_new_privs": status.get("NoNewPrivs"),
        "seccomp": status.get("Seccomp"),
        "core": list(resource.getrlimit(resource.RLIMIT_CORE)),
        "nofile": list(resource.getrlimit(resource.RLIMIT_NOFILE)),
        "fsize": list(resource.getrlimit(resource.RLIMIT_FSIZE)),
    }


def _parse_xml(self: Kernel, text: str) -> dict[str, Any]:
    """Import a stdlib package the worker has not loaded yet, and use it."""
    was_loaded = "xml.dom.minidom" in sys.modules
    import xml.dom.minidom

    root = xml.dom.minidom.parseString(text).documentElement
    assert root is not None
    return {"was_loaded": was_loaded, "root": root.tagName}


def _make_temp(self: Kernel) -> str:
    """Create (and remove again) a file where ``tempfile`` puts them; return its path."""
    import tempfile

    fd, path = tempfile.mkstemp()
    os.close(fd)
    os.unlink(path)
    return path


def _open_until_emfile(self: Kernel, cap: int = 4096) -> int:
    """Open /dev/null until the fd limit stops it (the error propagates) or ``cap`` is
    reached; every fd opened is closed before returning either way."""
    fds: list[int] = []
    try:
        while len(fds) < cap:
            fds.append(os.open(os.devnull, os.O_RDONLY))
        return len(fds)
    finally:
        for fd in fds:
            os.close(fd)


def _send_signal(self: Kernel, pid: int, signum: int) -> bool:
    os.kill(pid, signum)
    return True


# Raw syscalls with arguments that do nothing harmful when nothing blocks them (a bad pid,
# NULL pointers, unshare(0)), so that the unsandboxed control run cannot hurt the host.
_SYSCALLS: dict[str, tuple[int, tuple[int, ...]]] = {
    "ptrace": (101, (16, -1, 0, 0)),  # PTRACE_ATTACH to no such pid
    "process_vm_readv": (310, (-1, 0, 0, 0, 0, 0)),
    "unshare": (272, (0,)),  # a no-op when allowed
    "setns": (308, (-1, 0)),
    "mount": (165, (0, 0, 0, 0, 0)),  # NULL target
    "bpf": (321, (0xFFFF, 0, 0)),  # no such command
    "perf_event_open": (298, (0, 0, -1, -1, 0)),  # NULL attr
    "keyctl": (250, (0xFFFF, 0, 0, 0, 0)),  # no such operation
    "userfaultfd": (323, (0,)),
    "io_uring_setup": (425, (0, 0)),  # 0 entries, NULL params
    "x32_getpid": (0x40000000 | 39, ()),  # the x32 numbering
}
_RETURNS_FD = {"userfaultfd", "io_uring_setup", "bpf", "perf_event_open"}


def _raw_syscall(self: Kernel, name: str) -> int:
    """Make syscall ``name`` through libc; return its errno (0 if it succeeded)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    nr, args = _SYSCALLS[name]
    ctypes.set_errno(0)
    result = libc.syscall(ctypes.c_long(nr), *(ctypes.c_long(a) for a in args))
    err = ctypes.get_errno()
    if result >= 0:
        if name in _RETURNS_FD:
            os.close(result)
        return 0
    return err


def _i386_getpid(self: Kernel) -> int:
    """getpid through the i386 ABI (``int 0x80``) from x86_64 code: machine code in an
    executable mapping, called through ctypes."""
    import ctypes
    import mmap

    code = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    code.write(b"\xb8\x14\x00\x00\x00\xcd\x80\xc3")  # mov eax, 20; int 0x80; ret
    function = ctypes.CFUNCTYPE(ctypes.c_int)(ctypes.addressof(ctypes.c_char.from_buffer(code)))
    return int(function())


Kernel.connect_unix = _connect_unix  # type: ignore[attr-defined]
Kernel.netlink_socket = _netlink_socket  # type: ignore[attr-defined]
Kernel.sandbox_facts = _sandbox_facts  # type: ignore[attr-defined]
Kernel.parse_xml = _parse_xml  # type: ignore[attr-defined]
Kernel.make_temp = _make_temp  # type: ignore[attr-defined]
Kernel.open_until_emfile = _open_until_emfile  # type: ignore[attr-defined]
Kernel.send_signal = _send_signal  # type: ignore[attr-defined]
Kernel.raw_syscall = _raw_syscall  # type: ignore[attr-defined]
Kernel.i386_getpid = _i386_getpid  # type: ignore[attr-defined]


def _clone_new_namespace(self: Kernel) -> str:
    """clone(CLONE_NEWUSER | CLONE_NEWNS) as a raw syscall: the name of the errno, or
    "cloned"."""
    import ctypes
    import errno as errno_names

    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    pid = libc.syscall(56, 0x10000000 | 0x20000 | signal.SIGCHLD, 0, 0, 0, 0)
    if pid == 0:
        os._exit(0)
    if pid > 0:
        os.waitpid(pid, 0)
        return "cloned"
    return errno_names.errorcode[ctypes.get_errno()]


def _mknod(self: Kernel, kind: str) -> str:
    """Make a node in the cwd: "char" (/dev/kmsg's numbers) or "fifo"."""
    import errno as errno_names
    import stat

    try:
        if kind == "char":
            os.mknod("node", stat.S_IFCHR | 0o600, os.makedev(1, 11))
        else:
            os.mkfifo("node")
    except OSError as exc:
        return errno_names.errorcode[exc.errno]
    finally:
        if os.path.lexists("node"):
            os.unlink("node")
    return "made"


def _deep_tree(self: Kernel, depth: int) -> int:
    """Nest ``depth`` directories in the cwd (deeper than a recursive rmtree can go)."""
    fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(depth):
        os.mkdir("d", dir_fd=fd)
        new = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = new
    os.close(fd)
    return depth


def _identity(self: Kernel) -> dict[str, Any]:
    """Who and where the worker is: ids, the processes it can see, its host name, the
    network interfaces it has, its process limit."""
    import resource

    with open("/proc/net/dev") as f:
        interfaces = sorted(line.split(":")[0].strip() for line in f.readlines()[2:])
    return {
        "uid": os.getuid(),
        "gid": os.getgid(),
        "groups": os.getgroups(),
        "pid": os.getpid(),
        "ppid": os.getppid(),
        "visible": sorted(int(name) for name in os.listdir("/proc") if name.isdigit()),
        "hostname": socket.gethostname(),
        "interfaces": interfaces,
        "nproc": list(resource.getrlimit(resource.RLIMIT_NPROC)),
    }


def _fill_shm(self: Kernel, name: str, size: int) -> dict[str, Any]:
    """Write up to ``size`` bytes to /dev/shm/<name>, 64 KiB at a time; say how far it got
    and the errno that stopped it (None: all written). The file stays."""
    written, error = 0, None
    chunk = b"x" * 65536
    try:
        with open(f"/dev/shm/{name}", "wb", buffering=0) as f:
            while written < size:
                written += f.write(chunk[: size - written])
    except OSError as exc:
        error = exc.errno
    return {"written": written, "errno": error}


Kernel.identity = _identity  # type: ignore[attr-defined]
Kernel.fill_shm = _fill_shm  # type: ignore[attr-defined]
Kernel.clone_new_namespace = _clone_new_namespace  # type: ignore[attr-defined]
Kernel.mknod = _mknod  # type: ignore[attr-defined]
Kernel.deep_tree = _deep_tree  # type: ignore[attr-defined]
