"""The warden's record of each child it has not reaped yet (one per pid).

A child of the warden is one of:

* a :class:`Worker`: forked on ``SpawnWorker``; the record holds what was set up for it,
  all released when it is reaped, and its exit is reported to the supervisor;
* a :class:`ScratchRemover`: a short-lived child removing a reaped worker's scratch
  directory (``_scratch.release``); reaped quietly;
* anything else (no record): an orphan reparented to the warden, killed on sight.

Adding a fact about a worker means adding a field here; dropping a record drops all its
facts at once. Not here: what the warden does with them (``_warden``), or how a
worker's cgroup leaves are made, killed and removed (``_cgroup.Cgroups``, handed the
leaves from these records).
"""

from __future__ import annotations

from typing import TypeAlias

import msgspec

from corral.worker._cgroup import Leaves
from corral.worker._scratch import Scratch

__all__ = ["Child", "ScratchRemover", "Worker"]


class Worker(msgspec.Struct, frozen=True):
    """A worker the warden forked: the only kind of child it signals on request (until
    it is reaped, so a reused pid is never signalled)."""

    pid: int  # e.g. 4242 (with namespaces, its init's pid in the warden's namespace)
    uid: int | None  # its own uid from the reserved range, e.g. 200017; None: the warden's
    init_status: int | None  # its init's status pipe (read end), e.g. 9; None: no namespaces
    scratch: Scratch | None  # its cwd, HOME and TMPDIR; None: the sandbox has none
    # Its cgroup leaves, e.g. Leaves(("/sys/fs/cgroup/memory/corral-1/w3",), <that path>);
    # Leaves((), None): none (no cgroups here).
    leaves: Leaves


class ScratchRemover(msgspec.Struct, frozen=True):
    """A child removing a scratch directory: neither reported nor killed as an orphan; at
    the warden's teardown what it did not finish is removed inline."""

    pid: int  # e.g. 4250
    scratch: Scratch


Child: TypeAlias = Worker | ScratchRemover
