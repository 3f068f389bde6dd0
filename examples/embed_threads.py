"""Embedding corral in a threaded host (WSGI-style) through SyncSupervisor.

    python examples/embed_threads.py

Each "request handler" thread calls tenant kernels with plain blocking calls.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import corral


def main() -> None:
    with corral.SyncSupervisor("corral.examples.demo:create", max_workers=3) as sup:

        def handler(n: int) -> str:
            tenant = f"tenant-{n % 4}"
            count = sup.call(tenant, "put", f"k{n}", n)
            return f"{tenant} now has {count} notes"

        with ThreadPoolExecutor(max_workers=8) as pool:
            for line in pool.map(handler, range(20)):
                print(line)
        print("live workers:", sup.keys())


if __name__ == "__main__":
    main()
