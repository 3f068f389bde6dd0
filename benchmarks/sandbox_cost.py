"""What the sandbox costs: warm call and cold start under none(), default() and strict().

    python benchmarks/sandbox_cost.py [--calls N] [--starts N]

The presets run side by side in one process, interleaved call by call (and start by
start), so that they all see the same machine; medians and ratios to ``none()`` are
printed. ``strict()`` needs root and an interpreter other uids can read; where it is
unavailable, the reason is printed instead of its row.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import corral

FACTORY = "corral.examples.demo:create"
PRESETS = {
    "none": corral.Sandbox.none(),
    "default": corral.Sandbox.default(),
    "strict": corral.Sandbox.strict(),
}


async def measure(calls: int, starts: int) -> dict[str, dict[str, float] | str]:
    """Per preset: {"warm_ms": median, "cold_ms": median}, or why it could not run."""
    sups: dict[str, corral.Supervisor] = {}
    results: dict[str, dict[str, float] | str] = {}
    try:
        for name, sandbox in PRESETS.items():
            sup = corral.Supervisor(FACTORY, sandbox=sandbox, max_workers=4)
            try:
                await sup.start()
            except corral.StartError as exc:
                results[name] = str(exc)
                continue
            sups[name] = sup
            await sup.call("warm", "whoami")
        warm: dict[str, list[float]] = {name: [] for name in sups}
        cold: dict[str, list[float]] = {name: [] for name in sups}
        for i in range(calls):
            for name, sup in sups.items():
                t = time.perf_counter()
                await sup.call("warm", "put", "k", i)
                warm[name].append(time.perf_counter() - t)
        for i in range(starts):
            for name, sup in sups.items():
                t = time.perf_counter()
                await sup.call(f"cold{i}", "whoami")
                cold[name].append(time.perf_counter() - t)
                await sup.evict(f"cold{i}")
        for name in sups:
            results[name] = {
                "warm_ms": statistics.median(warm[name]) * 1e3,
                "cold_ms": statistics.median(cold[name]) * 1e3,
            }
    finally:
        for sup in sups.values():
            await sup.aclose()
    return {name: results[name] for name in PRESETS}


def report(results: dict[str, dict[str, float] | str]) -> str:
    base = results["none"]
    assert isinstance(base, dict)
    lines = ["| preset | warm call (median) | cold start (median) |", "|---|---|---|"]
    for name, figures in results.items():
        if isinstance(figures, str):
            lines.append(f"| {name} | unavailable: {figures} | |")
            continue
        warm, cold = figures["warm_ms"], figures["cold_ms"]
        lines.append(
            f"| {name} | {warm:.3f} ms (x{warm / base['warm_ms']:.2f}) "
            f"| {cold:.1f} ms (x{cold / base['cold_ms']:.2f}) |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--calls", type=int, default=5000)
    parser.add_argument("--starts", type=int, default=40)
    args = parser.parse_args()
    print(report(asyncio.run(measure(args.calls, args.starts))))


if __name__ == "__main__":
    main()
