"""``python -m corral.worker``: the child-side entry points.

* ``warden CONTROL_FD HOST_PID [cgroups] [root=UID [namespaces] [read=PATH ...]]`` --
  run the forkserver (see ``_warden``); ``root=UID`` checks the root-only sandbox
  layers, with a worker as that uid having to read each ``read=`` path, and
  ``namespaces`` also whether namespaces can be made (without root, in a user
  namespace the warden enters for them).
* ``worker FD_IN FD_OUT`` -- serve one kernel on two pipe fds (see ``_loop``).

Kept cheap to import: only the ipc package and the loop are loaded.
"""

from __future__ import annotations

import os
import sys


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) == 3 and args[0] == "worker":
        from corral.worker import _loop
        from corral.worker._os import THREAD_STACK_ENV

        stack = os.environ.pop(THREAD_STACK_ENV, None)
        if stack is not None:  # set by the memory rlimit: see _os.limit_data_segment
            import threading

            threading.stack_size(int(stack))

        fd_in, fd_out = int(args[1]), int(args[2])
        _loop.run_and_exit(lambda: _loop.run_worker(fd_in, fd_out))
    if len(args) >= 3 and args[0] == "warden":
        from corral.worker import _warden

        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        options = [arg.partition("=")[::2] for arg in args[3:]]
        probe_uid = [int(value) for key, value in options if key == "root"]
        _warden.main(
            int(args[1]),
            int(args[2]),
            sys.executable,
            root,
            want_cgroups=("cgroups", "") in options,
            root_probe_uid=probe_uid[0] if probe_uid else None,
            want_namespaces=("namespaces", "") in options,
            must_read=[value for key, value in options if key == "read"],
        )
    print(
        "usage: python -m corral.worker (worker FD_IN FD_OUT | "
        "warden CONTROL_FD HOST_PID [cgroups] [root=UID [namespaces] [read=PATH ...]])",
        file=sys.stderr,
    )
    sys.exit(2)


if __name__ == "__main__":
    main()
