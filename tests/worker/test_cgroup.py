"""The warden's cgroups (``corral.worker._cgroup``): which hierarchy serves each
controller, v2 delegation, per-worker leaves, the tree kill and the OOM count.

Two kinds of test:

* pure: detection and settings against fake cgroup trees in a tmp dir (what
  ``/proc/self/cgroup`` and ``mountinfo`` say is given as a ``Host``). A fake tree can
  show any host shape (pure v2 with delegation, hybrid, v1 only), which this machine
  cannot: its cgroup2 has no memory or pids controller (bound to v1), and enabling one
  would mean rebinding the host's v1 hierarchies;
* real kernel, v2 core: in a child in a private mount namespace that mounts its own
  cgroup2 instance (the same hierarchy as ``/sys/fs/cgroup/unified``, unmounted with the
  namespace): leaves made, joined, a double-forked ``setsid`` escapee killed with its
  worker by ``cgroup.kill``, ``populated 0`` seen, leaves removed, a dead warden's
  leftovers cleaned. Skipped where not root or cgroup2 cannot be mounted.

The v1 path runs for real in every supervisor test as root (memory and pids leaves).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from corral.worker._cgroup import (
    Hierarchy,
    Host,
    Leaves,
    _Mount,
    detect,
    read_host,
)

pytestmark = pytest.mark.timeout(60)

WARDEN = 4242


def cgroup_dir(path: Path, controllers: str = "", subtree: str = "", procs: str = "") -> Path:
    """A fake cgroup directory with the files detection reads (a non-root one)."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "cgroup.controllers").write_text(controllers + "\n")
    (path / "cgroup.subtree_control").write_text(subtree + "\n")
    (path / "cgroup.procs").write_text(procs)
    (path / "cgroup.type").write_text("domain\n")
    return path


@pytest.fixture
def cgroupfs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under ``tmp_path``, a new directory gets the interface files a cgroup's has (the
    kernel makes them on mkdir), so that writes to them land somewhere to look at."""
    real_mkdir = os.mkdir

    def mkdir(path: str | os.PathLike[str], mode: int = 0o777) -> None:
        real_mkdir(path, mode)
        if str(path).startswith(str(tmp_path)):
            for name in ("cgroup.subtree_control", "cgroup.procs"):
                Path(path, name).touch()

    monkeypatch.setattr(os, "mkdir", mkdir)


def v2_host(mount: Path, own: str, v1: Path | None = None) -> Host:
    v1_mounts = {}
    if v1 is not None:
        v1_mounts = {c: _Mount(str(v1 / c), "/") for c in ("memory", "pids")}
    return Host(own, {"memory": "/", "pids": "/"}, _Mount(str(mount), "/"), v1_mounts)


# -- reading /proc -----------------------------------------------------------------------------


def test_read_host_parses_a_hybrid_hierarchy(tmp_path: Path) -> None:
    (tmp_path / "cgroup").write_text(
        "9:name=systemd:/\n8:pids:/a\n4:memory:/process_api/x\n1:cpu,cpuacct:/\n0::/b/c\n"
    )
    (tmp_path / "mountinfo").write_text(
        "25 24 0:22 / /sys/fs/cgroup rw - tmpfs tmpfs rw\n"
        "30 25 0:27 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n"
        "31 25 0:28 / /sys/fs/cgroup/pids rw,relatime shared:9 - cgroup cgroup rw,pids\n"
        "32 25 0:29 /inner /sys/fs/cgroup/my\\040unified rw - cgroup2 cgroup2 rw\n"
    )
    host = read_host(str(tmp_path))
    assert host.v2_path == "/b/c"
    assert host.v1_paths["memory"] == "/process_api/x" and host.v1_paths["pids"] == "/a"
    assert host.v2_mount == _Mount("/sys/fs/cgroup/my unified", "/inner")
    assert host.v1_mounts == {
        "memory": _Mount("/sys/fs/cgroup/memory", "/"),
        "pids": _Mount("/sys/fs/cgroup/pids", "/"),
    }


def test_read_host_of_this_process_finds_its_cgroups() -> None:
    host = read_host()
    if host.v2_mount is None and not host.v1_mounts:
        pytest.skip("no cgroup hierarchy is mounted here")
    assert host.v2_path is not None or host.v1_paths


# -- detection on fake trees -------------------------------------------------------------------


def test_pure_v2_root_delegates_both_controllers_to_one_directory(
    tmp_path: Path, cgroupfs: None
) -> None:
    root = tmp_path / "cg"
    root.mkdir()
    (root / "cgroup.controllers").write_text("cpu memory pids\n")
    (root / "cgroup.subtree_control").write_text("cpu memory pids\n")  # the root: no type
    cgroups = detect(WARDEN, v2_host(root, "/"))
    base = root / f"corral-{WARDEN}"
    assert cgroups.memory is cgroups.pids is not None
    assert cgroups.memory.version == 2 and cgroups.memory.base == str(base)
    assert cgroups.memory_detail == f"cgroup v2 memory ({base})"
    assert cgroups.pids_detail == f"cgroup v2 pids ({base})"
    assert (base / "cgroup.subtree_control").read_text() == "+memory +pids"
    # One leaf per worker carries both (a fake leaf has no files, so settings are skipped).
    leaves = cgroups.make(memory_limit=1 << 30, max_processes=64)
    assert leaves == Leaves((str(base / "w1"),), str(base / "w1"))
    assert cgroups.reaped(leaves) is False  # killed (no one there), no OOM count


def test_v2_settings_bound_memory_swap_and_pids() -> None:
    v2, v1 = Hierarchy(2, "/x", {"memory"}), Hierarchy(1, "/y", {"memory"})
    assert v2.memory_settings(1 << 30) == {
        "memory.max": str(1 << 30),
        "memory.swap.max": "0",
        "memory.oom.group": "1",
    }
    assert v1.memory_settings(1 << 30) == {
        "memory.limit_in_bytes": str(1 << 30),
        "memory.memsw.limit_in_bytes": str(1 << 30),
    }
    assert v2.memory_settings(None) == {}  # a leaf for accounting only


def test_the_warden_alone_in_its_cgroup_moves_into_a_leaf_and_delegates(
    tmp_path: Path, cgroupfs: None
) -> None:
    root = tmp_path / "cg"
    own = cgroup_dir(root / "svc", "memory pids", "", f"{WARDEN}\n")
    cgroups = detect(WARDEN, v2_host(root, "/svc"))
    base = own / f"corral-{WARDEN}"
    assert cgroups.memory is not None and cgroups.memory.base == str(base)
    assert (base / "warden" / "cgroup.procs").read_text() == str(WARDEN)  # moved first
    assert (own / "cgroup.subtree_control").read_text() == "+memory +pids"  # then enabled
    assert (base / "cgroup.subtree_control").read_text() == "+memory +pids"


def test_a_cgroup_shared_with_the_host_uses_a_delegated_parent(
    tmp_path: Path, cgroupfs: None
) -> None:
    root = tmp_path / "cg"
    service = cgroup_dir(root / "app.service", "memory pids", "memory pids")
    own = cgroup_dir(service / "main", "memory pids", "", f"1\n{WARDEN}\n")
    try:
        os.setxattr(service, "user.delegate", b"1")
    except OSError as exc:
        pytest.skip(f"no user xattrs on {tmp_path}: {exc}")
    cgroups = detect(WARDEN, v2_host(root, "/app.service/main"))
    assert cgroups.memory is not None
    assert cgroups.memory.base == str(service / f"corral-{WARDEN}")
    assert (own / "cgroup.subtree_control").read_text() == "\n"  # left alone


def test_a_cgroup_shared_with_the_host_falls_back_to_v1_with_the_reason(tmp_path: Path) -> None:
    root = tmp_path / "cg"
    cgroup_dir(root / "session", "memory pids", "", f"1\n{WARDEN}\n")
    v1 = tmp_path / "v1"
    for controller in ("memory", "pids"):
        (v1 / controller).mkdir(parents=True)
    cgroups = detect(WARDEN, v2_host(root, "/session", v1))
    assert cgroups.memory is not None and cgroups.memory.version == 1
    assert cgroups.pids is not None and cgroups.pids is not cgroups.memory
    assert cgroups.memory_detail == f"cgroup v1 memory ({v1 / 'memory' / f'corral-{WARDEN}'})"
    assert not (root / "session" / f"corral-{WARDEN}").exists()
    # Without v1 either, the reason says what to do.
    shutil.rmtree(v1)
    none = detect(WARDEN, v2_host(root, "/session", v1))
    assert none.memory is None and none.pids is None
    assert "holds other processes" in none.memory_detail
    assert "Delegate=yes with DelegateSubgroup=" in none.memory_detail
    assert "no cgroup v1 memory hierarchy" in none.memory_detail
    with pytest.raises(OSError, match="no memory cgroups"):
        none.make(memory_limit=1 << 30, max_processes=None)
    with pytest.raises(OSError, match="no pids cgroups"):
        none.make(memory_limit=None, max_processes=64)
    assert none.make(memory_limit=None, max_processes=None) == Leaves((), None)


def test_a_hybrid_host_whose_v2_lacks_the_controllers_uses_v1(tmp_path: Path) -> None:
    """This machine's shape: cgroup2 offers only hugetlb; memory and pids are v1."""
    root = tmp_path / "unified"
    root.mkdir()
    (root / "cgroup.controllers").write_text("hugetlb\n")
    (root / "cgroup.subtree_control").write_text("\n")
    v1 = tmp_path / "v1"
    for controller in ("memory", "pids"):
        (v1 / controller).mkdir(parents=True)
    cgroups = detect(WARDEN, v2_host(root, "/", v1))
    assert [h.version for h in cgroups.hierarchies] == [1, 1]
    assert not (root / f"corral-{WARDEN}").exists()  # nothing made where nothing is used
    leaves = cgroups.make(memory_limit=None, max_processes=64)
    memory_leaf = str(v1 / "memory" / f"corral-{WARDEN}" / "w1")
    assert leaves == Leaves(
        (memory_leaf, str(v1 / "pids" / f"corral-{WARDEN}" / "w1")), memory_leaf
    )
    cgroups.discard(leaves)
    # Every worker gets a memory leaf (accounting); a pids leaf only when it asks.
    second = cgroups.make(memory_limit=None, max_processes=None)
    assert second.paths == (str(v1 / "memory" / f"corral-{WARDEN}" / "w2"),)
    cgroups.discard(second)
    only_pids = detect(WARDEN + 1, v2_host(root, "/", v1), memory=False)
    assert only_pids.memory is None and only_pids.memory_detail.startswith("not requested")
    for groups in (cgroups, only_pids):
        groups.remove_all([])
    assert os.listdir(v1 / "memory") == [] and os.listdir(v1 / "pids") == []


def test_the_leaves_handed_in_are_killed_and_removed_at_exit(tmp_path: Path) -> None:
    """The warden passes the leaves of its workers: at its exit those not reaped go with
    the ones given up (and the warden's directories), whatever their number."""
    v1 = tmp_path / "v1"
    for controller in ("memory", "pids"):
        (v1 / controller).mkdir(parents=True)
    cgroups = detect(WARDEN, v2_host(tmp_path / "none", "/", v1))
    live = [cgroups.make(memory_limit=None, max_processes=64) for _ in range(3)]
    assert len({leaf for leaves in live for leaf in leaves.paths}) == 6  # memory and pids each
    assert cgroups.reaped(live[0]) is False  # given up: removed at once (nothing in it)
    assert cgroups.reaped(Leaves((), None)) is False  # a worker without cgroups
    cgroups.kill_all(iter(live[1:]))  # a generator will do (no one is there to kill)
    cgroups.kill_tree(Leaves((), None))
    assert all(os.path.isdir(leaf) for leaves in live[1:] for leaf in leaves.paths)
    cgroups.remove_all(leaves for leaves in live[1:])
    assert os.listdir(v1 / "memory") == [] and os.listdir(v1 / "pids") == []


def test_a_dead_wardens_directories_are_removed(tmp_path: Path) -> None:
    root = tmp_path / "cg"
    root.mkdir()
    (root / "cgroup.controllers").write_text("memory pids\n")
    (root / "cgroup.subtree_control").write_text("memory pids\n")
    dead = _dead_pid()
    (root / f"corral-{dead}" / "w3").mkdir(parents=True)
    (root / f"corral-{os.getpid()}").mkdir()  # a live warden's: kept
    cgroups = detect(WARDEN, v2_host(root, "/"))
    assert not (root / f"corral-{dead}").exists()
    assert (root / f"corral-{os.getpid()}").exists()
    cgroups.remove_all([])


def test_oom_counts_are_read_per_version(tmp_path: Path) -> None:
    v2, v1 = tmp_path / "v2", tmp_path / "v1"
    v2.mkdir()
    v1.mkdir()
    (v2 / "memory.events").write_text("low 0\nhigh 0\nmax 4\noom 1\noom_kill 2\n")
    (v1 / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 1\n")
    assert Hierarchy(2, str(tmp_path), {"memory"}).oom_kills(str(v2)) == 2
    assert Hierarchy(1, str(tmp_path), {"memory"}).oom_kills(str(v1)) == 1
    assert Hierarchy(2, str(tmp_path), {"memory"}).oom_kills(str(tmp_path / "gone")) == 0


def _dead_pid() -> int:
    """A pid no process has now (a child that has been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", ""])
    child.wait()
    return child.pid


# -- real kernel: the v2 core on a cgroup2 mount of our own -----------------------------------

_V2_CORE = textwrap.dedent(
    """
    import json, os, signal, subprocess, sys, tempfile
    from corral.worker._cgroup import Cgroups, Hierarchy, Leaves, _remove_stale
    from corral.worker._os import set_child_subreaper

    set_child_subreaper()  # as the warden: escapees come back to us to be reaped
    mount = tempfile.mkdtemp()
    subprocess.run(["mount", "-t", "cgroup2", "none", mount], check=True)
    out = {"controllers": open(os.path.join(mount, "cgroup.controllers")).read().split()}
    base = os.path.join(mount, f"corral-{os.getpid()}")
    os.mkdir(base)
    try:
        v2 = Hierarchy(2, base, ())
        leaf = v2.new_leaf({"pids.max": "9"})  # no pids controller: skipped, not an error
        events = lambda: open(os.path.join(leaf, "cgroup.events")).read().split()
        out["empty"] = events()
        ready_r, ready_w = os.pipe()
        worker = os.fork()
        if worker == 0:  # the worker: joins, then starts an escapee that leaves its tree
            Cgroups.join(Leaves((leaf,), None))
            if os.fork() == 0:
                os.setsid()
                if os.fork() == 0:
                    os.write(ready_w, str(os.getpid()).encode())
                    signal.pause()
                os._exit(0)
            signal.pause()
        os.close(ready_w)
        escapee = int(os.read(ready_r, 32))
        members = lambda: sorted(int(p) for p in open(os.path.join(leaf, "cgroup.procs")))
        while len(members()) < 2:  # the middle process exits on its own
            os.waitpid(-1, os.WNOHANG)
        out["members"] = members() == sorted([worker, escapee])
        stat = open(f"/proc/{escapee}/stat").read()
        out["escapee_reparented"] = int(stat.rsplit(")", 1)[1].split()[1]) == os.getpid()
        out["populated"] = events()
        v2.kill(leaf)  # cgroup.kill: the whole leaf, escapee included
        dead = {}
        while len(dead) < 2:
            pid, status = os.waitpid(-1, 0)
            if pid in (worker, escapee):
                dead[pid] = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
        out["killed"] = sorted(dead.values())
        out["after"] = events()
        os.rmdir(leaf)
        out["removed"] = not os.path.exists(leaf)

        # A dead warden's leftovers, with a process still inside: killed and removed.
        stale = os.path.join(mount, "corral-999999999")
        os.makedirs(os.path.join(stale, "w1"))
        straggler = os.fork()
        if straggler == 0:
            Cgroups.join(Leaves((os.path.join(stale, "w1"),), None))
            signal.pause()
        while not open(os.path.join(stale, "w1", "cgroup.procs")).read():
            pass
        _remove_stale(mount)  # kills it; the rmdir waits for it to be reaped
        os.waitpid(straggler, 0)
        _remove_stale(mount)
        out["stale_removed"] = not os.path.exists(stale)
    finally:
        os.rmdir(base)
        subprocess.run(["umount", mount], check=True)
        os.rmdir(mount)
    print(json.dumps(out))
    """
)


def test_v2_core_on_a_real_cgroup2_mount() -> None:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare(1) to mount a cgroup2 in a private namespace")
    src = str(Path(__file__).resolve().parents[2] / "src")
    run = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", sys.executable, "-c", _V2_CORE],
        capture_output=True,
        text=True,
        timeout=50,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": src},
    )
    if run.returncode != 0 and "mount" in run.stderr and "Traceback" in run.stderr:
        if "CalledProcessError" in run.stderr and "'mount', '-t', 'cgroup2'" in run.stderr:
            pytest.skip(f"cannot mount a cgroup2 here: {run.stderr[-300:]}")
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    print(f"\ncgroup2 controllers here: {out['controllers']}")
    assert out["empty"] == ["populated", "0", "frozen", "0"]
    assert out["members"] is True
    assert out["escapee_reparented"] is True  # out of the worker's tree (to us, the subreaper)
    assert out["populated"] == ["populated", "1", "frozen", "0"]
    assert out["killed"] == [9, 9]  # SIGKILL, both
    assert out["after"] == ["populated", "0", "frozen", "0"]
    assert out["removed"] is True
    assert out["stale_removed"] is True
