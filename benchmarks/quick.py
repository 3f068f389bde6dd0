"""Quick corral-only figures: warm call round trip, concurrent throughput, cold start.

    python benchmarks/quick.py [--calls N]

Not a comparison with other libraries (that is a separate benchmark); numbers vary
with the machine, so read them as orders of magnitude.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import corral

FACTORY = "corral.examples.demo:create"


async def warm(sup: corral.Supervisor, n: int) -> list[float]:
    await sup.call("warm", "whoami")
    out = []
    for _ in range(n):
        t = time.perf_counter()
        await sup.call("warm", "put", "k", 1)
        out.append(time.perf_counter() - t)
    return out


async def concurrent(sup: corral.Supervisor, n: int, callers: int) -> float:
    await sup.call("conc", "whoami")

    async def one(i: int) -> None:
        for _ in range(n // callers):
            await sup.call("conc", "put", "k", i)

    t = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(callers)))
    return (n // callers * callers) / (time.perf_counter() - t)


async def cold(method: str, n: int) -> list[float]:
    async with corral.Supervisor(FACTORY, start_method=method) as sup:  # type: ignore[arg-type]
        await sup.call("first", "whoami")  # the warden starts with the first worker
        out = []
        for i in range(n):
            t = time.perf_counter()
            await sup.call(f"cold-{i}", "whoami")
            out.append(time.perf_counter() - t)
            await sup.evict(f"cold-{i}")
        return out


def ms(values: list[float]) -> str:
    values = sorted(values)
    p99 = values[min(len(values) - 1, int(len(values) * 0.99))]
    return f"median {statistics.median(values) * 1e3:.3f} ms, p99 {p99 * 1e3:.3f} ms"


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=5000)
    args = parser.parse_args()
    async with corral.Supervisor(FACTORY) as sup:
        print(f"warm call, one caller:      {ms(await warm(sup, args.calls))}")
        rate = await concurrent(sup, args.calls * 2, 64)
        print(f"warm calls, 64 callers:     {rate:,.0f} calls/s on one worker")
    for method in ("forkserver", "spawn"):
        print(f"cold start ({method}): {ms(await cold(method, 20))}")


if __name__ == "__main__":
    asyncio.run(main())
