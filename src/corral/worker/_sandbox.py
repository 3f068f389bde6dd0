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
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import resource
import signal
import socket
import struct

from corral.ipc import SandboxSpec
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
        for paths, rights in ((read_paths, read), (write_paths, write), (["/dev/null"], null)):
            for path in paths:
                _add_path_rule(int(ruleset), path, rights)
        if libc.syscall(_SYS_LANDLOCK_RESTRICT_SELF, int(ruleset), 0) != 0:
            raise_errno("landlock_restrict_self")
    finally:
        os.close(int(ruleset))
    return abi


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


# -- seccomp (a classic BPF deny-list, x86_64) ------------------------------------------------

_AUDIT_ARCH_X86_64 = 0xC000003E
_X32_BIT = 0x40000000
_RET_KILL_PROCESS = 0x80000000
_RET_ERRNO = 0x00050000
_RET_ALLOW = 0x7FFF0000
_LD_W_ABS = 0x20
_JEQ_K = 0x15
_JGE_K = 0x35
_JSET_K = 0x45
_RET_K = 0x06

# x86_64 syscall numbers denied with EPERM: debugging/reading other processes, mounts and
# namespaces, kernel extension points, keyrings, and io_uring (it runs I/O past seccomp).
_DENY_X86_64 = {
    "ptrace": 101, "process_vm_readv": 310, "process_vm_writev": 311,
    "mount": 165, "umount2": 166, "pivot_root": 155, "chroot": 161,
    "unshare": 272, "setns": 308, "bpf": 321, "perf_event_open": 298,
    "keyctl": 250, "add_key": 248, "request_key": 249, "userfaultfd": 323,
    "kexec_load": 246, "kexec_file_load": 320, "init_module": 175, "finit_module": 313,
    "delete_module": 176, "open_by_handle_at": 304, "swapon": 167, "swapoff": 168,
    "reboot": 169, "acct": 163, "pidfd_getfd": 438,
    # the new mount API (the old mount() is above)
    "open_tree": 428, "move_mount": 429, "fsopen": 430, "fsconfig": 431, "fsmount": 432,
    "fspick": 433, "mount_setattr": 442,
}  # fmt: skip
# ENOSYS, so that libraries fall back: io_uring to plain I/O, clone3 to clone (whose
# namespace flags can be checked; clone3 passes them in memory a filter cannot read).
_ENOSYS_X86_64 = {
    "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427, "clone3": 435,
}  # fmt: skip
_SYS_CLONE_X86_64 = 56
_CLONE_NEW_FLAGS = 0x7E020000  # NEWNS | NEWCGROUP | NEWUTS | NEWIPC | NEWUSER | NEWPID | NEWNET
_SYS_SOCKET_X86_64 = 41
_DENIED_FAMILIES = (
    socket.AF_INET, socket.AF_INET6, socket.AF_UNIX, socket.AF_NETLINK, socket.AF_PACKET,
)  # fmt: skip


def seccomp_supported() -> str | None:
    """None if the deny-list can be installed here, else why not."""
    if platform.machine() != "x86_64":
        return f"seccomp deny-list not written for {platform.machine()} yet"
    return None


def _filter_x86_64() -> bytes:
    prog: list[tuple[int, int, int, int]] = []

    def ins(code: int, k: int, jt: int = 0, jf: int = 0) -> None:
        prog.append((code, jt, jf, k))

    ins(_LD_W_ABS, 4)  # seccomp_data.arch
    ins(_JEQ_K, _AUDIT_ARCH_X86_64, jt=1)
    ins(_RET_K, _RET_KILL_PROCESS)  # another ABI (i386 int 0x80): no deny-list applies
    ins(_LD_W_ABS, 0)  # seccomp_data.nr
    ins(_JGE_K, _X32_BIT, jf=1)
    ins(_RET_K, _RET_ERRNO | errno.EPERM)  # x32 numbering
    for nr in _DENY_X86_64.values():
        ins(_JEQ_K, nr, jf=1)
        ins(_RET_K, _RET_ERRNO | errno.EPERM)
    for nr in _ENOSYS_X86_64.values():
        ins(_JEQ_K, nr, jf=1)
        ins(_RET_K, _RET_ERRNO | errno.ENOSYS)  # libraries fall back to plain I/O
    ins(_JEQ_K, _SYS_CLONE_X86_64, jf=4)  # clone: refuse new namespaces (like unshare)
    ins(_LD_W_ABS, 16)  # seccomp_data.args[0], low 32 bits: the flags
    ins(_JSET_K, _CLONE_NEW_FLAGS, jf=1)
    ins(_RET_K, _RET_ERRNO | errno.EPERM)
    ins(_RET_K, _RET_ALLOW)
    ins(_JEQ_K, _SYS_SOCKET_X86_64, jt=1)
    ins(_RET_K, _RET_ALLOW)
    ins(_LD_W_ABS, 16)  # seccomp_data.args[0], low 32 bits: the address family
    for family in _DENIED_FAMILIES:
        ins(_JEQ_K, int(family), jf=1)
        ins(_RET_K, _RET_ERRNO | errno.EACCES)
    ins(_RET_K, _RET_ALLOW)
    return b"".join(struct.pack("=HBBI", *i) for i in prog)


def apply_seccomp() -> None:
    """Install the deny-list (requires no-new-privs); inherited by children and exec."""
    why = seccomp_supported()
    if why is not None:
        raise OSError(errno.ENOSYS, why)
    code = _filter_x86_64()
    buf = ctypes.create_string_buffer(code, len(code))

    class _Fprog(ctypes.Structure):
        _fields_ = (("len", ctypes.c_ushort), ("filter", ctypes.c_void_p))

    prog = _Fprog(len(code) // 8, ctypes.cast(buf, ctypes.c_void_p))
    if libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(prog), 0, 0) != 0:
        raise_errno("prctl(PR_SET_SECCOMP)")


def set_no_new_privs() -> None:
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise_errno("prctl(PR_SET_NO_NEW_PRIVS)")


# -- the whole sequence -------------------------------------------------------------------------

_RLIMITS = {
    "core": resource.RLIMIT_CORE,
    "cpu": resource.RLIMIT_CPU,
    "nofile": resource.RLIMIT_NOFILE,
    "fsize": resource.RLIMIT_FSIZE,
}


def apply(spec: SandboxSpec, scratch: str | None, uid: int | None, parent_pid: int) -> None:
    """Apply ``spec`` to this process, in order: resource limits, scratch directory, the
    dedicated ``uid`` (if any), the parent-death signal (tied to ``parent_pid``; a uid
    change would clear it, so it comes after), no-new-privs, Landlock, seccomp. Raises
    OSError if a layer the spec asks for cannot be applied (the worker then exits and its
    start fails)."""
    for name, limit in spec.rlimits:
        resource.setrlimit(_RLIMITS[name], (limit, limit))  # hard = soft: one-way
    if uid is not None:  # counts this uid's processes and threads: the worker's own
        resource.setrlimit(resource.RLIMIT_NPROC, (spec.max_processes, spec.max_processes))
    if scratch is not None:
        os.chdir(scratch)
        os.environ["HOME"] = os.environ["TMPDIR"] = scratch  # for an exec'd interpreter
    if uid is not None:
        drop_to_uid(uid)
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


def detect() -> dict[str, str]:
    """What each layer would be on this host: "available" or why not."""
    abi = landlock_abi()
    return {
        "landlock": f"available (ABI {abi})" if abi else "unavailable: kernel without Landlock",
        "seccomp": seccomp_supported() or "available",
        "no_new_privs": "available",
        "rlimits": "available",
    }
