"""What one memory sweep costs the supervisor: ProcTreeProbe.sample over N workers.

    python benchmarks/memory_probe.py [--workers 1000]

Starts N small processes (``sleep``) as stand-ins for workers, each with one child,
then times sample() over all N roots: wall time and CPU time of the calling thread.
The sweep runs on corral's probe thread, never on the event loop.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import time

from corral.supervisor._memory import ProcTreeProbe


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workers", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    procs = []
    try:
        for _ in range(args.workers):
            # a "worker" (sh) with a child (sleep): a tree of two
            procs.append(
                subprocess.Popen(
                    ["sh", "-c", "sleep 120; :"], stdin=subprocess.DEVNULL, start_new_session=True
                )
            )
        roots = [p.pid for p in procs]
        probe = ProcTreeProbe()
        probe.sample(roots)  # warm up
        walls, cpus = [], []
        for _ in range(args.rounds):
            w, c = time.perf_counter(), time.thread_time()
            sample = probe.sample(roots)
            cpus.append(time.thread_time() - c)
            walls.append(time.perf_counter() - w)
        n_proc = sum(1 for d in os.listdir("/proc") if d.isdigit())
        print(
            f"{len(sample.trees)} worker trees, {n_proc} processes on the host: "
            f"median {statistics.median(walls) * 1e3:.1f} ms wall, "
            f"{statistics.median(cpus) * 1e3:.1f} ms CPU per sweep"
        )
    finally:
        for p in procs:
            os.killpg(p.pid, signal.SIGKILL)  # the shell and its sleep
        for p in procs:
            p.wait()


if __name__ == "__main__":
    main()
