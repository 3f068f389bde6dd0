"""Embedding corral in an asyncio program: many tenants served concurrently.

    python examples/embed_asyncio.py

Uses the bundled example kernel; a real application passes its own factory,
e.g. ``corral.Supervisor("myapp.plugins:load_kernel")``.
"""

from __future__ import annotations

import asyncio

import corral


async def handle_request(sup: corral.Supervisor, tenant: str, n: int) -> str:
    try:
        count = await sup.call(tenant, "put", f"note-{n}", n)
        return f"{tenant}: {count} notes"
    except corral.KernelError as exc:
        return f"{tenant}: kernel error {exc.remote_type}"
    except corral.WorkerError as exc:  # crashed, timed out, stopped, protocol, start
        return f"{tenant}: worker problem {type(exc).__name__}: {exc}"


async def main() -> None:
    async with corral.Supervisor(
        "corral.examples.demo:create", max_workers=4, idle_ttl=60.0, call_timeout=5.0
    ) as sup:
        requests = [handle_request(sup, f"tenant-{i % 6}", i) for i in range(30)]
        for line in await asyncio.gather(*requests):
            print(line)
        for info in sup.stats().workers:
            print(f"{info.tenant}: pid {info.pid}, {info.requests} requests, {info.state}")


if __name__ == "__main__":
    asyncio.run(main())
