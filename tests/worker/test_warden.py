"""The warden's record of each child (``corral.worker._warden``, ``_children``): a
reaped worker is reported and everything set up for it goes at once; the child removing
its scratch directory is recorded, spared as an orphan, never signalled on request and
reaped quietly; a child without a record is an orphan and is killed.

A real ``Warden`` runs here on a socket pair, in the test process, without its loop:
the test forks the "workers" itself (children that wait on a pipe and exit with the
status they are told), waits for their exit with ``waitid(WNOWAIT)`` and then lets the
warden reap. Workers started for real are in ``tests/supervisor`` (``test_sandbox``,
``test_hostile``).
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

import corral
from corral.ipc import (
    FromWarden,
    KillWorker,
    RecordDecoder,
    SandboxSpec,
    SpawnFailed,
    SpawnWorker,
    WorkerExited,
)
from corral.worker import _scratch
from corral.worker._cgroup import Cgroups, Hierarchy, Leaves
from corral.worker._children import ScratchRemover, Worker
from corral.worker._warden import Warden

pytestmark = pytest.mark.timeout(60)


class Harness:
    def __init__(self, warden: Warden, supervisor_end: socket.socket) -> None:
        self.warden = warden
        self._sock = supervisor_end
        self._decoder: RecordDecoder[FromWarden] = RecordDecoder(FromWarden)

    def sent(self) -> list[FromWarden]:
        """Every record the warden has sent so far."""
        out: list[FromWarden] = []
        while True:
            try:
                record = self._sock.recv(64 * 1024, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return out
            out.append(self._decoder.decode(record))


@pytest.fixture
def harness(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Harness]:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    root = os.path.dirname(os.path.dirname(os.path.abspath(corral.__file__)))
    none = "none in this test"
    warden = Warden(ours, sys.executable, root, Cgroups(None, none, None, none), {}, False)
    try:
        yield Harness(warden, theirs)
    finally:
        warden._sel.close()
        os.close(warden._wake_r)
        os.close(warden._wake_w)
        ours.close()
        theirs.close()


class Forked:
    """A child of the test process that waits until told to exit with a given status."""

    def __init__(self) -> None:
        r, self._w = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:
            code = 9
            try:
                os.close(self._w)
                code = os.read(r, 1)[0]
            finally:
                os._exit(code)
        os.close(r)

    def exit(self, code: int) -> os.waitid_result:
        os.write(self._w, bytes([code]))
        return self.exited()

    def exited(self) -> os.waitid_result:
        """Wait for its exit and leave it to be reaped (by the warden)."""
        os.close(self._w)
        result = os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOWAIT)
        assert result is not None
        return result


def test_a_reaped_worker_is_reported_and_all_its_facts_go_at_once(
    harness: Harness, tmp_path_factory: pytest.TempPathFactory
) -> None:
    warden = harness.warden
    # Its cgroup leaf: a v1 memory leaf in a fake hierarchy (a plain directory).
    base = tmp_path_factory.mktemp("cgroup") / "corral-1"
    base.mkdir()
    warden._cgroups = Cgroups(Hierarchy(1, str(base), {"memory"}), "fake", None, "none")
    leaves = warden._cgroups.make(memory_limit=None, max_processes=None)
    assert leaves == Leaves((str(base / "w1"),), str(base / "w1"))
    scratch = _scratch.make(None, None, None)
    with open(os.path.join(scratch.path, "left-behind"), "wb") as f:
        f.write(b"x")
    worker = Forked()
    warden._children[worker.pid] = Worker(worker.pid, None, None, scratch, leaves)
    worker.exit(3)
    warden._reap()
    assert harness.sent() == [WorkerExited(worker.pid, 3, False)]
    assert os.listdir(base) == []  # its leaf, killed (empty) and removed
    # The record is gone; what remains is the child removing its scratch directory.
    (remover,) = warden._children.values()
    assert remover == ScratchRemover(remover.pid, scratch)
    info = os.waitid(os.P_PID, remover.pid, os.WEXITED | os.WNOWAIT)
    assert info is not None and (info.si_code, info.si_status) == (os.CLD_EXITED, 0)
    warden._reap()
    assert warden._children == {}
    assert harness.sent() == []  # a remover is no worker: nothing to report
    assert not os.path.lexists(scratch.path)


def test_a_scratch_remover_is_spared_and_a_child_without_a_record_is_an_orphan(
    harness: Harness,
) -> None:
    warden = harness.warden
    scratch = _scratch.make(None, None, None)
    remover, orphan = Forked(), Forked()
    warden._children[remover.pid] = ScratchRemover(remover.pid, scratch)
    try:
        warden._kill(KillWorker(remover.pid, signal.SIGKILL))  # not a worker: ignored
        warden._kill_orphans()
        killed = orphan.exited()
        done = remover.exit(0)
    finally:
        _scratch.remove_now(scratch)
    assert (killed.si_code, killed.si_status) == (os.CLD_KILLED, signal.SIGKILL)
    assert (done.si_code, done.si_status) == (os.CLD_EXITED, 0)
    warden._reap()
    assert warden._children == {}
    assert harness.sent() == []


def test_a_spawn_that_fails_after_its_scratch_dir_was_made_releases_it(
    harness: Harness, tmp_path: Path
) -> None:
    warden = harness.warden
    spec = SandboxSpec(
        rlimits=[],
        scratch=True,
        no_new_privs=False,
        landlock=False,
        seccomp=False,
        read_paths=[],
        cgroup_tree=False,
        max_processes=0,
        uid_range=None,
        namespaces=True,  # not available to this warden: the spawn fails after the scratch dir
        shm_bytes=0,
        drop_capabilities=False,
        scratch_bytes=None,
        scratch_inodes=None,
    )
    fds = [os.open(os.devnull, os.O_RDONLY) for _ in range(3)]
    warden._spawn(SpawnWorker(7, False, None, "rlimit", spec), fds)
    assert harness.sent() == [
        SpawnFailed(7, "could not start a worker: namespaces are not available here")
    ]
    for fd in fds:
        with pytest.raises(OSError):
            os.fstat(fd)  # the warden closed the fds it was given
    (remover,) = warden._children.values()
    assert isinstance(remover, ScratchRemover)
    os.waitid(os.P_PID, remover.pid, os.WEXITED | os.WNOWAIT)
    warden._reap()
    assert warden._children == {}
    assert os.listdir(tmp_path) == []
