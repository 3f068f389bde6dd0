"""Rolling reload under load: every tenant reloaded every second while callers call
them without pause; counts the calls that succeeded and the ones that failed.

    python benchmarks/reload_soak.py [--seconds 30] [--tenants 16] [--callers 2]

Each tenant has ``--callers`` callers in a loop (a 2 ms async call each) and, once a
second, ``reload_all()`` rolls every tenant to a new version. The target: no failed
call. Prints the counts, the reloads done and the versions in force at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import time

import corral

FACTORY = "corral.examples.demo:create"


async def soak(seconds: float, tenants: int, callers: int) -> dict[str, object]:
    version = {"now": 0}

    def policy(tenant: str) -> corral.TenantPolicy:
        return corral.TenantPolicy(version=str(version["now"]))

    outcomes: collections.Counter[str] = collections.Counter()
    names = [f"tenant-{i}" for i in range(tenants)]
    async with corral.Supervisor(FACTORY, max_workers=2 * tenants, policy=policy) as sup:
        for name in names:
            await sup.get_or_create(name)
        stop = asyncio.Event()

        async def caller(name: str) -> None:
            while not stop.is_set():
                try:
                    await sup.call(name, "slow_echo", 1, 0.002)
                    outcomes["ok"] += 1
                except corral.CorralError as exc:
                    outcomes[type(exc).__name__] += 1

        tasks = [asyncio.ensure_future(caller(n)) for n in names for _ in range(callers)]
        reloads = failed_reloads = 0
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            tick = time.monotonic()
            version["now"] += 1
            for outcome in (await sup.reload_all()).values():
                reloads += 1
                failed_reloads += isinstance(outcome, corral.CorralError)
            await asyncio.sleep(max(0.0, 1.0 - (time.monotonic() - tick)))
        stop.set()
        await asyncio.gather(*tasks)
        versions = sorted({w.version for w in sup.stats().workers})
        stops = sup.stats().stops
    return {
        "calls ok": outcomes.pop("ok", 0),
        "calls failed": dict(outcomes),
        "reloads": reloads,
        "reloads failed": failed_reloads,
        "versions at the end": versions,
        "stops": stops,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--tenants", type=int, default=16)
    parser.add_argument("--callers", type=int, default=2)
    args = parser.parse_args()
    result = asyncio.run(soak(args.seconds, args.tenants, args.callers))
    for key, value in result.items():
        print(f"{key:>20}: {value}")
    verdict = "PASS" if not result["calls failed"] else "MISS"
    print(f"{verdict}  no call failed while every tenant was reloaded every second")


if __name__ == "__main__":
    main()
