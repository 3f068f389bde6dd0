"""``python -m corral.worker``: the child-side entry points.

* ``warden CONTROL_FD HOST_PID`` -- run the forkserver (see ``_warden``).
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
    if len(args) in (3, 4) and args[0] == "warden":
        from corral.worker import _warden

        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        want_cgroups = len(args) == 4 and args[3] == "cgroups"
        _warden.main(int(args[1]), int(args[2]), sys.executable, root, want_cgroups)
    print(
        "usage: python -m corral.worker "
        "(worker FD_IN FD_OUT | warden CONTROL_FD HOST_PID [cgroups])",
        file=sys.stderr,
    )
    sys.exit(2)


if __name__ == "__main__":
    main()
