"""Scratch directories (``corral.worker._scratch``): made as a plain directory or a
size-limited tmpfs, released without holding up the caller (one unmount, or a child
process that removes the tree and that the caller reaps), removed inline at exit, and
those of dead wardens removed by the next one.

Every test makes its directories in its own ``tmp_path`` (``tempfile.tempdir``). The
tmpfs tests need root. Not here: which warden child holds which directory
(``test_warden``), and the worker's side (``tests/supervisor/test_sandbox.py``).
"""

from __future__ import annotations

import errno
import os
import stat
import tempfile
from pathlib import Path

import pytest

from corral.ipc import LayerCheck
from corral.worker import _scratch
from corral.worker._scratch import PREFIX, Scratch

pytestmark = pytest.mark.timeout(60)

QUOTA = _scratch.detect_quota()
needs_tmpfs = pytest.mark.skipif(
    not QUOTA.available, reason=f"no size-limited tmpfs here: {QUOTA.detail}"
)


@pytest.fixture
def tmp_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path


def litter(path: str, files: int = 200) -> None:
    """What a tenant leaves behind: files, some of them in nested directories."""
    nested = os.path.join(path, "a", "b", "c")
    os.makedirs(nested)
    for i in range(files):
        with open(os.path.join(path if i % 2 else nested, f"f{i}"), "wb") as f:
            f.write(b"x" * 100)


def reap(pid: int) -> int:
    _pid, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def test_a_plain_scratch_dir_is_removed_by_a_child_the_caller_reaps(tmp_root: Path) -> None:
    scratch = _scratch.make(None, None, None)
    assert scratch == Scratch(scratch.path, mounted=False)
    assert os.path.dirname(scratch.path) == str(tmp_root)
    assert os.path.basename(scratch.path).startswith(f"{PREFIX}{os.getpid()}-")
    assert stat.S_IMODE(os.stat(scratch.path).st_mode) == 0o700
    litter(scratch.path)
    remover = _scratch.release(scratch)
    assert remover is not None
    assert reap(remover) == 0
    assert not os.path.lexists(scratch.path)


def test_a_plain_scratch_dir_goes_inline_when_no_child_can_be_forked(
    tmp_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    scratch = _scratch.make(None, None, None)
    litter(scratch.path)

    def no_fork() -> int:
        raise OSError(errno.EAGAIN, "no more processes")

    monkeypatch.setattr(os, "fork", no_fork)
    assert _scratch.release(scratch) is None
    assert not os.path.lexists(scratch.path)


def test_a_scratch_dir_that_cannot_be_mounted_leaves_nothing_behind(
    tmp_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(path: str, size: int, inodes: int, uid: int | None) -> None:
        raise OSError(errno.EPERM, "mount refused")

    monkeypatch.setattr(_scratch, "_mount_tmpfs", refuse)
    with pytest.raises(OSError, match="mount refused"):
        _scratch.make(None, 1 << 20, 64)
    assert os.listdir(tmp_root) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another uid needs root")
def test_a_plain_scratch_dir_belongs_to_the_workers_uid(tmp_root: Path) -> None:
    scratch = _scratch.make(4242, None, None)
    try:
        assert (os.stat(scratch.path).st_uid, os.stat(scratch.path).st_gid) == (4242, 4242)
    finally:
        _scratch.remove_now(scratch)
    assert not os.path.lexists(scratch.path)


@needs_tmpfs
def test_a_quota_scratch_dir_is_a_tmpfs_that_goes_with_one_unmount(tmp_root: Path) -> None:
    scratch = _scratch.make(4242, 1 << 20, 64)
    try:
        assert scratch == Scratch(scratch.path, mounted=True)
        assert os.path.ismount(scratch.path)
        flags = os.statvfs(scratch.path).f_flag
        assert flags & os.ST_NOSUID and flags & os.ST_NODEV
        assert (os.stat(scratch.path).st_uid, os.stat(scratch.path).st_gid) == (4242, 4242)
        litter(scratch.path, files=20)
    except BaseException:
        _scratch.remove_now(scratch)
        raise
    assert _scratch.release(scratch) is None  # no child: the unmount is all it takes
    assert not os.path.lexists(scratch.path)


@pytest.mark.parametrize("quota", [pytest.param(True, marks=needs_tmpfs), False])
def test_remove_now_removes_either_kind_inline(tmp_root: Path, quota: bool) -> None:
    scratch = _scratch.make(None, 1 << 20 if quota else None, 64 if quota else None)
    litter(scratch.path, files=20)
    _scratch.remove_now(scratch)
    assert not os.path.lexists(scratch.path)
    assert os.listdir(tmp_root) == []


def test_remove_stale_removes_only_the_dirs_of_wardens_that_are_gone(tmp_root: Path) -> None:
    with open("/proc/sys/kernel/pid_max") as f:
        never_a_pid = int(f.read()) + 1
    dead = tmp_root / f"{PREFIX}{never_a_pid}-abc"
    alive = tmp_root / f"{PREFIX}{os.getpid()}-def"
    other = tmp_root / "someone-elses"
    for path in (dead, alive, other):
        path.mkdir()
        litter(str(path), files=10)
    _scratch.remove_stale()
    assert sorted(os.listdir(tmp_root)) == sorted([alive.name, other.name])


def test_the_quota_check_says_how_or_why_not(
    tmp_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if QUOTA.available:
        assert QUOTA == LayerCheck(True, "tmpfs, nosuid,nodev")
    assert _scratch.detect_quota() == QUOTA
    assert os.listdir(tmp_root) == []  # the probe directory is gone
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert _scratch.detect_quota() == LayerCheck(
        False, "needs root (a size- and inode-limited tmpfs per worker)"
    )
