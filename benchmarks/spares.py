"""What a spare worker saves: a new tenant's first call with a spare waiting, against the
same first call started cold, under ``default()`` and ``strict()``.

    python benchmarks/spares.py [--tenants N]

Two supervisors per preset run side by side in one process, interleaved tenant by
tenant: one with ``spare_workers=1``, one without. Each new tenant's first call is
timed from the call to its reply; between tenants, the spare is refilled (waited for,
untimed) and the tenant evicted, so every timed call finds one spare ready. Prints the
medians and the ratio (the target: with a spare <= 0.3x cold). ``strict()`` needs root
and an interpreter other uids can read; where it is unavailable, the reason is printed.
Nothing is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import corral

FACTORY = "corral.examples.demo:create"
PRESETS = {"default": corral.Sandbox.default(), "strict": corral.Sandbox.strict()}


async def measure(preset: corral.Sandbox, tenants: int) -> tuple[float, float] | str:
    """Median seconds of a new tenant's first call: (with a spare, cold), or why not."""
    spare = corral.Supervisor(FACTORY, sandbox=preset, spare_workers=1, max_workers=4)
    cold = corral.Supervisor(FACTORY, sandbox=preset, max_workers=4)
    try:
        for sup in (spare, cold):
            await sup.start()
    except corral.StartError as exc:
        await spare.aclose()
        await cold.aclose()
        return str(exc)
    samples: dict[str, list[float]] = {"spare": [], "cold": []}
    try:
        for i in range(tenants):
            pairs = [("spare", spare), ("cold", cold)]
            for name, sup in pairs if i % 2 else pairs[::-1]:
                await sup._pool.spares_started()  # (a spare is ready: untimed)
                t = time.perf_counter()
                await sup.call(f"t{i}", "whoami")
                samples[name].append(time.perf_counter() - t)
                await sup.evict(f"t{i}")
    finally:
        await spare.aclose()
        await cold.aclose()
    return statistics.median(samples["spare"]), statistics.median(samples["cold"])


async def run(tenants: int) -> None:
    print(f"a new tenant's first call, {tenants} tenants each, median:")
    for name, preset in PRESETS.items():
        result = await measure(preset, tenants)
        if isinstance(result, str):
            print(f"  {name:<8} unavailable: {result}")
            continue
        with_spare, cold = result
        verdict = "PASS" if with_spare <= 0.3 * cold else "MISS"
        print(
            f"  {name:<8} with a spare {with_spare * 1e3:6.2f} ms   cold {cold * 1e3:6.2f} ms   "
            f"{with_spare / cold:.2f}x  {verdict} (goal <= 0.3x)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tenants", type=int, default=100)
    asyncio.run(run(parser.parse_args().tenants))


if __name__ == "__main__":
    main()
