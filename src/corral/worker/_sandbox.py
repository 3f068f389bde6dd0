"""Sandbox layers applied in the worker process before any kernel code runs.

Each function applies one unprivileged layer to the calling process (the warden's
freshly forked child), in the order :func:`apply` runs them, which is the order
the layers need: resource limits, scratch directory, the dedicated uid, the
parent-death signal (a uid change clears it), no-new-privs (which Landlock and
seccomp require), then Landlock, then seccomp last, since it also forbids calls the
earlier steps make. The process is still
single-threaded here, as Landlock and seccomp (without TSYNC) apply per thread.

:func:`detect` says which layers this host supports, for ``stats().sandbox``.
Not here: cgroups (``_cgroup``), namespaces and uid slots (``_privileged``), fd
hygiene (``_warden``).

Long because the seccomp filter is assembled here as raw BPF (its allow-lists and
argument checks), beside Landlock's rules and the capability drop.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import platform
import resource
import signal
import socket
import struct

from corral.ipc import LayerCheck, SandboxSpec
from corral.worker._os import libc, raise_errno, set_parent_death_signal
from corral.worker._privileged import drop_to_uid

__all__ = ["apply", "detect"]


PR_SET_NO_NEW_PRIVS = 38
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2

# -- Landlock (raw syscalls) ---------------------------------------------------------------------

_SYS_LANDLOCK_CREATE_RULESET = 444
_SYS_LANDLOCK_ADD_RULE = 445
_SYS_LANDLOCK_RESTRICT_SELF = 446
_LANDLOCK_CREATE_RULESET_VERSION = 1
_LANDLOCK_RULE_PATH_BENEATH = 1

_FS_EXECUTE = 1 << 0
_FS_WRITE_FILE = 1 << 1
_FS_READ_FILE = 1 << 2
_FS_READ_DIR = 1 << 3
_FS_ALL_ABI1 = (1 << 13) - 1  # EXECUTE .. MAKE_SYM
_FS_MAKE_CHAR = 1 << 6
_FS_MAKE_BLOCK = 1 << 11
_FS_REFER = 1 << 13  # ABI 2
_FS_TRUNCATE = 1 << 14  # ABI 3
_FS_IOCTL_DEV = 1 << 15  # ABI 5
_NET_BIND_TCP = 1 << 0  # ABI 4
_NET_CONNECT_TCP = 1 << 1
_SCOPE_ABSTRACT_UNIX_SOCKET = 1 << 0  # ABI 6
_SCOPE_SIGNAL = 1 << 1

_FILE_ONLY_RIGHTS = _FS_EXECUTE | _FS_WRITE_FILE | _FS_READ_FILE | _FS_TRUNCATE | _FS_IOCTL_DEV


class _RulesetAttr(ctypes.Structure):
    _fields_ = (
        ("handled_access_fs", ctypes.c_uint64),
        ("handled_access_net", ctypes.c_uint64),
        ("scoped", ctypes.c_uint64),
    )


class _PathBeneath(ctypes.Structure):
    _pack_ = 1
    _fields_ = (("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32))


def landlock_abi() -> int:
    """The kernel's Landlock ABI version, 0 if none (or disabled)."""
    abi = libc.syscall(_SYS_LANDLOCK_CREATE_RULESET, None, 0, _LANDLOCK_CREATE_RULESET_VERSION)
    return int(abi) if abi > 0 else 0


def _fs_rights(abi: int) -> int:
    rights = _FS_ALL_ABI1
    if abi >= 2:
        rights |= _FS_REFER
    if abi >= 3:
        rights |= _FS_TRUNCATE
    if abi >= 5:
        rights |= _FS_IOCTL_DEV
    return rights


def apply_landlock(read_paths: list[str], write_paths: list[str]) -> int:
    """Restrict the filesystem to ``read_paths`` (read and execute), ``write_paths``
    (everything) and ``/dev/null`` (read and write), deny TCP bind/connect (ABI >= 4),
    and scope signals and abstract unix sockets to this sandbox (ABI >= 6). Returns the
    ABI used."""
    abi = landlock_abi()
    if abi == 0:
        raise OSError(errno.ENOSYS, "Landlock is not available")
    handled = _fs_rights(abi)
    attr = _RulesetAttr(handled_access_fs=handled)
    size = 8
    if abi >= 4:
        attr.handled_access_net = _NET_BIND_TCP | _NET_CONNECT_TCP
        size = 16
    if abi >= 6:
        attr.scoped = _SCOPE_ABSTRACT_UNIX_SOCKET | _SCOPE_SIGNAL
        size = 24
    ruleset = libc.syscall(_SYS_LANDLOCK_CREATE_RULESET, ctypes.byref(attr), size, 0)
    if ruleset < 0:
        raise_errno("landlock_create_ruleset")
    try:
        read = (_FS_EXECUTE | _FS_READ_FILE | _FS_READ_DIR) & handled
        null = (_FS_READ_FILE | _FS_WRITE_FILE | _FS_TRUNCATE) & handled
        # Everything in the scratch dir but device nodes (a root worker could otherwise
        # make one for a disk or /dev/mem and read around every other rule).
        write = handled & ~(_FS_MAKE_CHAR | _FS_MAKE_BLOCK)
        readable = [entry for path in read_paths for entry in _own_proc(path)]
        listable = ["/proc"] if "/proc" in read_paths else []  # which pids exist, no more
        for paths, rights in (
            (readable, read),
            (listable, _FS_READ_DIR),
            (write_paths, write),
            (["/dev/null"], null),
        ):
            for path in paths:
                _add_path_rule(int(ruleset), path, rights)
        if libc.syscall(_SYS_LANDLOCK_RESTRICT_SELF, int(ruleset), 0) != 0:
            raise_errno("landlock_restrict_self")
    finally:
        os.close(int(ruleset))
    return abi


def _own_proc(path: str) -> list[str]:
    """``path``, unless it is /proc: then what a process may read of /proc, namely its own
    directory (``/proc/self`` is resolved once, here) and the entries that belong to no
    process (meminfo, cpuinfo, sys, ...), but no other process's directory: another
    process's environ, maps or cmdline stay unreadable even under the same uid. /proc may
    still be listed (which pids exist). A child the kernel starts cannot read its own
    directory: it is not the worker's."""
    if path.rstrip("/") != "/proc":
        return [path]
    # /proc/self is opened with O_PATH, which follows it to /proc/<our pid>; /proc/mounts,
    # /proc/net and the like are links into it.
    return [f"/proc/{name}" for name in _PROC_READABLE]


# What a Python program (and psutil, for its own process) reads of /proc besides its own
# directory; each name is one Landlock rule, made at every worker start, so the list is
# short rather than every name /proc has.
_PROC_READABLE = (
    "self", "meminfo", "cpuinfo", "stat", "loadavg", "uptime", "version", "sys",
    "filesystems", "swaps", "vmstat", "pressure", "cgroups", "diskstats",
)  # fmt: skip


def _add_path_rule(ruleset: int, path: str, rights: int) -> None:
    try:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except OSError:
        return  # a path that does not exist here needs no rule
    try:
        if not os.path.isdir(path):
            rights &= _FILE_ONLY_RIGHTS
        rule = _PathBeneath(allowed_access=rights, parent_fd=fd)
        if (
            libc.syscall(
                _SYS_LANDLOCK_ADD_RULE, ruleset, _LANDLOCK_RULE_PATH_BENEATH, ctypes.byref(rule), 0
            )
            != 0
        ):
            raise_errno(f"landlock_add_rule {path}")
    finally:
        os.close(fd)


# -- seccomp (classic BPF, x86_64) ----------------------------------------------------------------
#
# Why not a whole-syscall allow-list: a kernel may load any native extension (numpy, a
# database driver, a compression library), whose syscalls cannot be enumerated here; a
# missing entry kills legitimate code at random. So the filter is an allow-list where the
# set of legitimate uses is known and small, and a deny-list elsewhere:
#
# * socket families: socket() is refused for every family (nothing a worker needs leaves
#   it) and socketpair() is allowed for AF_UNIX only (asyncio's self-pipe);
# * calls that act on another process (resource limits, scheduling, I/O priority, memory
#   placement) are allowed only on pid 0 or the worker's own pid; signals to other
#   processes are Landlock's (scoped signals) and the dedicated uid's;
# * modes: no file or directory may be given a setuid or setgid bit (chmod family, open
#   with O_CREAT, mknod), so a root worker cannot plant a setuid binary for others;
# * syscall numbers past the newest this filter knows get ENOSYS (libraries fall back),
#   so a new kernel's new calls are refused until they are reviewed here;
# * the deny-list: debugging or reading other processes, mounts and namespaces, kernel
#   extension points, keyrings, io_uring (it runs I/O past seccomp), the clock, host
#   name, kernel log.

_AUDIT_ARCH_X86_64 = 0xC000003E
_X32_BIT = 0x40000000
_RET_KILL_PROCESS = 0x80000000
_RET_ERRNO = 0x00050000
_RET_ALLOW = 0x7FFF0000
_LD_W_ABS = 0x20
_JEQ_K = 0x15
_JGT_K = 0x25
_JGE_K = 0x35
_JSET_K = 0x45
_RET_K = 0x06

# x86_64 syscall numbers denied with EPERM.
_DENY_X86_64 = {
    "ptrace": 101, "process_vm_readv": 310, "process_vm_writev": 311, "kcmp": 312,
    "process_madvise": 440, "process_mrelease": 448, "pidfd_getfd": 438,
    "mount": 165, "umount2": 166, "pivot_root": 155, "chroot": 161,
    "unshare": 272, "setns": 308, "bpf": 321, "perf_event_open": 298,
    "keyctl": 250, "add_key": 248, "request_key": 249, "userfaultfd": 323,
    "kexec_load": 246, "kexec_file_load": 320, "init_module": 175, "finit_module": 313,
    "delete_module": 176, "open_by_handle_at": 304, "swapon": 167, "swapoff": 168,
    "reboot": 169, "acct": 163, "syslog": 103, "vhangup": 153, "quotactl": 179,
    "quotactl_fd": 443, "fanotify_init": 300, "iopl": 172, "ioperm": 173,
    "settimeofday": 164, "clock_settime": 227, "clock_adjtime": 305, "adjtimex": 159,
    "sethostname": 170, "setdomainname": 171,
    # the new mount API (the old mount() is above)
    "open_tree": 428, "move_mount": 429, "fsopen": 430, "fsconfig": 431, "fsmount": 432,
    "fspick": 433, "mount_setattr": 442,
}  # fmt: skip
# ENOSYS, so that libraries fall back: io_uring to plain I/O, clone3 to clone (whose
# namespace flags can be checked; clone3 passes them in memory a filter cannot read),
# openat2 to openat (whose mode can be checked), pidfd_open to waiting on the child (asyncio
# tries it on its own pid and falls back), and anything newer than this filter.
_ENOSYS_X86_64 = {
    "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427, "clone3": 435,
    "openat2": 437, "pidfd_open": 434,
}  # fmt: skip
_NEWEST_KNOWN_X86_64 = 462  # mseal (Linux 6.10); reviewed up to here
_SYS_CLONE_X86_64 = 56
_CLONE_NEW_FLAGS = 0x7E020000  # NEWNS | NEWCGROUP | NEWUTS | NEWIPC | NEWUSER | NEWPID | NEWNET
_SYS_SOCKET_X86_64 = 41
_SYS_SOCKETPAIR_X86_64 = 53
# Calls whose first argument is the pid they act on: only 0 (self) or the worker itself.
_OWN_PID_ARG0_X86_64 = {
    "sched_setparam": 142, "sched_setscheduler": 144, "sched_setaffinity": 203,
    "migrate_pages": 256, "move_pages": 279, "sched_setattr": 314,
}  # fmt: skip
_SYS_PRLIMIT64_X86_64 = 302  # (pid, resource, new, old): also fine on any pid to only read
_SYS_SETPRIORITY_X86_64 = 141  # (which, who, prio): which must be PRIO_PROCESS
_SYS_IOPRIO_SET_X86_64 = 251  # (which, who, ioprio): which must be IOPRIO_WHO_PROCESS
_PRIO_PROCESS = 0
_IOPRIO_WHO_PROCESS = 1
# Calls with a file mode argument (its index): no setuid/setgid bit may be set.
_MODE_ARG_X86_64 = {
    "open": (2, 2), "creat": (85, 1), "chmod": (90, 1), "fchmod": (91, 1), "mknod": (133, 1),
    "openat": (257, 3), "mknodat": (259, 2), "fchmodat": (268, 2), "fchmodat2": (452, 2),
}  # fmt: skip
_SET_ID_BITS = 0o6000  # S_ISUID | S_ISGID


class _Bpf:
    """A classic BPF program with forward jumps to labels, resolved by :meth:`code`."""

    def __init__(self) -> None:
        self._ins: list[tuple[int, int | str, int | str, int]] = []
        self._labels: dict[str, int] = {}
        self._fresh = 0
        self._own_pid: list[int] = []  # indices of instructions whose k is the pid

    def label(self) -> str:
        """A new label name (place it with :meth:`here`)."""
        self._fresh += 1
        return f"L{self._fresh}"

    def here(self, name: str) -> None:
        self._labels[name] = len(self._ins)

    def op(self, code: int, k: int, jt: int | str = 0, jf: int | str = 0) -> None:
        self._ins.append((code, jt, jf, k))

    def op_own_pid(self, code: int, jt: int | str = 0, jf: int | str = 0) -> None:
        """An instruction whose constant is the worker's pid, filled in by :meth:`fill`."""
        self._own_pid.append(len(self._ins))
        self.op(code, 0, jt, jf)

    def load_nr(self) -> None:
        self.op(_LD_W_ABS, 0)  # seccomp_data.nr

    def load_arg(self, index: int, high: bool = False) -> None:
        self.op(_LD_W_ABS, 16 + 8 * index + (4 if high else 0))  # args[i], little-endian

    def ret(self, value: int) -> None:
        self.op(_RET_K, value)

    def own_pid_offsets(self) -> tuple[int, ...]:
        """Byte offsets in :meth:`code` of the constants :meth:`op_own_pid` left empty."""
        return tuple(8 * index + 4 for index in self._own_pid)

    def code(self) -> bytes:
        out = []
        for at, (code, jt, jf, k) in enumerate(self._ins):
            offsets = []
            for target in (jt, jf):
                offset = target if isinstance(target, int) else self._labels[target] - at - 1
                if not 0 <= offset <= 255:
                    raise ValueError(f"BPF jump out of range at {at}: {offset}")
                offsets.append(offset)
            out.append(struct.pack("=HBBI", code, offsets[0], offsets[1], k))
        return b"".join(out)


def seccomp_supported() -> str | None:
    """None if the filter can be installed here, else why not."""
    if platform.machine() != "x86_64":
        return f"seccomp filter not written for {platform.machine()} yet"
    return None


def _filter_x86_64(own_pid: int) -> bytes:
    """The filter for a worker whose pid (as it sees itself) is ``own_pid``."""
    template, offsets = _filter_template_x86_64()
    code = bytearray(template)
    for offset in offsets:
        struct.pack_into("=I", code, offset, own_pid)
    return bytes(code)


@functools.cache
def _filter_template_x86_64() -> tuple[bytes, tuple[int, ...]]:
    """The filter with the worker's pid left out, and where to put it: built once in the
    warden (see :func:`prepare`), so that a new worker only fills in its pid."""
    b = _Bpf()
    eperm, eacces = _RET_ERRNO | errno.EPERM, _RET_ERRNO | errno.EACCES
    enosys = _RET_ERRNO | errno.ENOSYS
    b.op(_LD_W_ABS, 4)  # seccomp_data.arch
    b.op(_JEQ_K, _AUDIT_ARCH_X86_64, jt=1)
    b.ret(_RET_KILL_PROCESS)  # another ABI (i386 int 0x80): none of these rules applies
    b.load_nr()
    b.op(_JGE_K, _X32_BIT, jf=1)
    b.ret(eperm)  # x32 numbering
    for nr in _DENY_X86_64.values():
        b.op(_JEQ_K, nr, jf=1)
        b.ret(eperm)
    for nr in _ENOSYS_X86_64.values():
        b.op(_JEQ_K, nr, jf=1)
        b.ret(enosys)
    b.op(_JGT_K, _NEWEST_KNOWN_X86_64, jf=1)
    b.ret(enosys)

    def pid_is_own(index: int, allow: str, deny: str) -> None:
        """Jump to ``allow`` if args[index] (an int pid) is 0 or ``own_pid``, else ``deny``.
        Only the low 32 bits count: the kernel reads a pid_t."""
        b.load_arg(index)
        b.op(_JEQ_K, 0, jt=allow)
        b.op_own_pid(_JEQ_K, jt=allow, jf=deny)

    # clone: refuse new namespaces (like unshare)
    after = b.label()
    b.op(_JEQ_K, _SYS_CLONE_X86_64, jf=after)
    b.load_arg(0)  # the flags (low 32 bits)
    b.op(_JSET_K, _CLONE_NEW_FLAGS, jf=1)
    b.ret(eperm)
    b.ret(_RET_ALLOW)
    b.here(after)
    # socket(): no family at all; socketpair(): AF_UNIX only
    after = b.label()
    b.op(_JEQ_K, _SYS_SOCKET_X86_64, jf=after)
    b.ret(eacces)
    b.here(after)
    after = b.label()
    b.op(_JEQ_K, _SYS_SOCKETPAIR_X86_64, jf=after)
    b.load_arg(0)
    b.op(_JEQ_K, int(socket.AF_UNIX), jf=1)
    b.ret(_RET_ALLOW)
    b.ret(eacces)
    b.here(after)
    # calls on a pid: self only
    allow, deny = b.label(), b.label()
    for nr in _OWN_PID_ARG0_X86_64.values():
        after = b.label()
        b.op(_JEQ_K, nr, jf=after)
        pid_is_own(0, allow, deny)
        b.here(after)
    after = b.label()
    b.op(_JEQ_K, _SYS_PRLIMIT64_X86_64, jf=after)
    own = b.label()
    b.load_arg(2)  # new limits: NULL means this only reads
    b.op(_JEQ_K, 0, jf=own)
    b.load_arg(2, high=True)
    b.op(_JEQ_K, 0, jt=allow)
    b.here(own)
    pid_is_own(0, allow, deny)
    b.here(after)
    for nr, which in (
        (_SYS_SETPRIORITY_X86_64, _PRIO_PROCESS),
        (_SYS_IOPRIO_SET_X86_64, _IOPRIO_WHO_PROCESS),
    ):
        after = b.label()
        b.op(_JEQ_K, nr, jf=after)
        b.load_arg(0)
        b.op(_JEQ_K, which, jf=deny)  # a process group or a user: other processes
        pid_is_own(1, allow, deny)
        b.here(after)
    # file modes: no setuid/setgid bits
    for nr, index in _MODE_ARG_X86_64.values():
        after = b.label()
        b.op(_JEQ_K, nr, jf=after)
        b.load_arg(index)
        b.op(_JSET_K, _SET_ID_BITS, jt=deny, jf=allow)
        b.here(after)
    b.ret(_RET_ALLOW)
    b.here(allow)
    b.ret(_RET_ALLOW)
    b.here(deny)
    b.ret(eperm)
    return b.code(), b.own_pid_offsets()


def apply_seccomp() -> None:
    """Install the filter (requires no-new-privs); inherited by children and exec."""
    why = seccomp_supported()
    if why is not None:
        raise OSError(errno.ENOSYS, why)
    code = _filter_x86_64(os.getpid())
    buf = ctypes.create_string_buffer(code, len(code))

    class _Fprog(ctypes.Structure):
        _fields_ = (("len", ctypes.c_ushort), ("filter", ctypes.c_void_p))

    prog = _Fprog(len(code) // 8, ctypes.cast(buf, ctypes.c_void_p))
    if libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(prog), 0, 0) != 0:
        raise_errno("prctl(PR_SET_SECCOMP)")


def set_no_new_privs() -> None:
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise_errno("prctl(PR_SET_NO_NEW_PRIVS)")


# -- capabilities -------------------------------------------------------------------------------

_PR_CAPBSET_DROP = 24
_PR_SET_SECUREBITS = 28
_PR_CAP_AMBIENT = 47
_PR_CAP_AMBIENT_CLEAR_ALL = 4
_CAP_SETPCAP = 8
# SECBIT_NOROOT (uid 0 gains no capabilities at exec), SECBIT_NO_CAP_AMBIENT_RAISE, and
# SECBIT_KEEP_CAPS left off; each one locked.
_SECUREBITS = (1 << 0) | (1 << 1) | (1 << 5) | (1 << 6) | (1 << 7)
_SYS_CAPSET_X86_64 = 126
_LINUX_CAPABILITY_VERSION_3 = 0x20080522


def capability_sets() -> dict[str, int]:
    """This process's capability sets from /proc/self/status: "CapEff", "CapPrm",
    "CapInh", "CapBnd", "CapAmb" -> bit mask."""
    sets = {}
    with open("/proc/self/status", "rb") as status:
        for line in status:
            if line.startswith(b"Cap"):
                name, _, value = line.partition(b":")
                sets[name.decode()] = int(value, 16)
    return sets


@functools.cache
def _last_capability() -> int:
    with open("/proc/sys/kernel/cap_last_cap", "rb") as f:
        return int(f.read())


@functools.cache
def _inherited_capabilities() -> dict[str, int]:
    """The warden's capability sets, which each worker it forks starts with (read once,
    in the warden: see :func:`prepare`)."""
    return capability_sets()


def drop_bounding_set() -> None:
    """Empty the bounding and ambient sets and lock the securebits that keep uid 0 from
    regaining capabilities at exec. Needs CAP_SETPCAP, so it runs before a uid change."""
    for cap in range(_last_capability() + 1):
        if libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 and ctypes.get_errno() != errno.EINVAL:
            raise_errno(f"prctl(PR_CAPBSET_DROP, {cap})")
    if libc.prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) != 0:
        raise_errno("prctl(PR_CAP_AMBIENT_CLEAR_ALL)")
    if libc.prctl(_PR_SET_SECUREBITS, _SECUREBITS, 0, 0, 0) != 0:
        raise_errno("prctl(PR_SET_SECUREBITS)")


def clear_capabilities() -> None:
    """Empty the effective, permitted and inheritable sets (a uid change from 0 already
    clears the first two; a worker that stays uid 0 needs this)."""
    if platform.machine() != "x86_64":
        raise OSError(errno.ENOSYS, f"capset not wired for {platform.machine()} yet")
    header = (ctypes.c_uint32 * 2)(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (ctypes.c_uint32 * 6)()  # two {effective, permitted, inheritable} words: all 0
    if libc.syscall(_SYS_CAPSET_X86_64, ctypes.byref(header), ctypes.byref(data)) != 0:
        raise_errno("capset")


def capabilities_status() -> LayerCheck:
    """What dropping capabilities means on this host, for ``stats().sandbox``."""
    try:
        held = capability_sets().get("CapPrm", 0)
    except OSError as exc:
        return LayerCheck(False, f"cannot read /proc/self/status ({exc.strerror})")
    if platform.machine() != "x86_64" and held:
        return LayerCheck(False, f"capset not wired for {platform.machine()} yet")
    if held:
        return LayerCheck(True, "all dropped: effective, permitted, inheritable, ambient, bounding")
    return LayerCheck(True, "none held: the host runs without capabilities")


# -- the whole sequence -------------------------------------------------------------------------

_RLIMITS = {
    "core": resource.RLIMIT_CORE,
    "cpu": resource.RLIMIT_CPU,
    "nofile": resource.RLIMIT_NOFILE,
    "fsize": resource.RLIMIT_FSIZE,
}


def apply(spec: SandboxSpec, scratch: str | None, uid: int | None, parent_pid: int) -> None:
    """Apply ``spec`` to this process, in order: resource limits, scratch directory, the
    bounding and ambient capability sets (dropping them needs CAP_SETPCAP, which a uid
    change takes away), the dedicated ``uid`` (if any), the remaining capabilities, the
    parent-death signal (tied to ``parent_pid``; a uid change would clear it, so it comes
    after), no-new-privs, Landlock, seccomp. Raises OSError if a layer the spec asks for
    cannot be applied (the worker then exits and its start fails)."""
    for name, limit in spec.rlimits:
        resource.setrlimit(_RLIMITS[name], (limit, limit))  # hard = soft: one-way
    if uid is not None:  # counts this uid's processes and threads: the worker's own
        resource.setrlimit(resource.RLIMIT_NPROC, (spec.max_processes, spec.max_processes))
    if scratch is not None:
        os.chdir(scratch)
        os.environ["HOME"] = os.environ["TMPDIR"] = scratch  # for an exec'd interpreter
    held = _inherited_capabilities() if spec.drop_capabilities else {}
    if held.get("CapEff", 0) & (1 << _CAP_SETPCAP):
        drop_bounding_set()
    if uid is not None:
        drop_to_uid(uid)
    if held.get("CapPrm", 0) or held.get("CapInh", 0):
        clear_capabilities()
    set_parent_death_signal(signal.SIGKILL, parent_pid)
    if spec.no_new_privs or spec.landlock or spec.seccomp:
        set_no_new_privs()
    if spec.landlock:
        writable = [scratch] if scratch else []
        if spec.namespaces:
            writable.append("/dev/shm")  # the namespace's own, size-limited tmpfs
        apply_landlock(spec.read_paths, writable)
    if spec.seccomp:
        apply_seccomp()


def prepare() -> None:
    """Work every worker's :func:`apply` shares, done once in the warden before it forks
    any: the seccomp program, the capability facts."""
    if seccomp_supported() is None:
        _filter_template_x86_64()
    _inherited_capabilities()
    _last_capability()


def detect() -> dict[str, LayerCheck]:
    """What each of these layers would be on this host (available, or why not)."""
    abi = landlock_abi()
    no_seccomp = seccomp_supported()
    return {
        "landlock": LayerCheck(abi > 0, f"ABI {abi}" if abi else "kernel without Landlock"),
        "seccomp": LayerCheck(no_seccomp is None, no_seccomp or ""),
        "no_new_privs": LayerCheck(True, ""),
        "rlimits": LayerCheck(True, ""),
        "capabilities": capabilities_status(),
    }
