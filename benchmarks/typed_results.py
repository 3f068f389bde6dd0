"""What a typed result costs: a warm call with ``result_type=`` against the same call
untyped, and against converting the untyped reply afterwards.

    python benchmarks/typed_results.py [--calls N] [--chunk N]

One worker (``tests.kernels``, whose ``echo`` returns its argument) and three ways of
calling it, interleaved in chunks in a rotating order so that all see the same
machine:

* untyped: ``await sup.call("t", "echo", POINT)`` -> a dict;
* typed: ``await sup.call("t", "echo", POINT, result_type=Point)`` -> a ``Point``,
  decoded straight from the reply's bytes;
* untyped + ``msgspec.convert(value, Point)``: what a caller would do by hand.

Prints medians and the ratios to untyped (the target: typed within 1.1x). Nothing is
asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec

import corral

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FACTORY = "tests.kernels:make"


class Point(msgspec.Struct):
    x: int
    y: int
    label: str


POINT = {"x": 3, "y": 4, "label": "p"}


async def measure(calls: int, chunk: int) -> dict[str, float]:
    """Median seconds per call for each way."""
    async with corral.Supervisor(FACTORY, sandbox=corral.Sandbox.none()) as sup:
        ways: dict[str, Callable[[], Awaitable[Any]]] = {
            "untyped": lambda: sup.call("t", "echo", POINT),
            "typed": lambda: sup.call("t", "echo", POINT, result_type=Point),
            "untyped + convert": lambda: _convert(sup.call("t", "echo", POINT)),
        }
        for way in ways.values():  # warm up: the worker, the decoder cache
            for _ in range(200):
                await way()
        assert await ways["typed"]() == Point(3, 4, "p")
        samples: dict[str, list[float]] = {name: [] for name in ways}
        order = list(ways)
        for round_ in range(calls // chunk):
            for name in order[round_ % 3 :] + order[: round_ % 3]:
                way = ways[name]
                for _ in range(chunk):
                    t = time.perf_counter()
                    await way()
                    samples[name].append(time.perf_counter() - t)
    return {name: statistics.median(values) for name, values in samples.items()}


async def _convert(reply: Awaitable[Any]) -> Point:
    return msgspec.convert(await reply, Point)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=30_000)
    parser.add_argument("--chunk", type=int, default=500)
    args = parser.parse_args()
    medians = asyncio.run(measure(args.calls, args.chunk))
    base = medians["untyped"]
    print(f"warm call, {args.calls} per way, Sandbox.none(), median:")
    for name, median in medians.items():
        print(f"  {name:<18} {median * 1e6:8.1f} us   {median / base:5.2f}x untyped")
    verdict = "PASS" if medians["typed"] <= 1.1 * base else "MISS"
    print(f"{verdict}  typed vs untyped {medians['typed'] / base:.2f}x (goal <= 1.1x)")


if __name__ == "__main__":
    main()
