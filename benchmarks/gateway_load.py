"""A bounded load test of the HTTP gateway: requests/s and latency through ``corral serve``.

    python benchmarks/gateway_load.py [--seconds 10] [--clients 32] [--tenants 16]

Starts ``corral serve`` on a free loopback port (the bundled example kernel, default
options plus ``--max-workers``), then ``--clients`` concurrent keep-alive HTTP clients
call ``put`` on ``--tenants`` tenants for ``--seconds`` seconds, after a short warm-up
that starts every tenant's worker. Loopback only; it stops by itself and then stops the
server (SIGTERM). The client runs in this process, on the same machine: on 2 cores the
numbers are the gateway and its load generator sharing the CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import time


def start_server(*args: str) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "corral", "serve", "--port", "0", "--log-level", "warning", *args],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()  # "corral serve: ready on URL" (or EOF if it failed)
    if not line.startswith("corral serve: ready on "):
        proc.kill()
        proc.wait()
        raise SystemExit(f"corral serve did not start: {line!r}")
    return proc, line.removeprefix("corral serve: ready on ").strip().rstrip("/")


class _Connection:
    """A minimal keep-alive HTTP/1.1 client connection (a load generator must cost less
    than the server it measures; general-purpose async clients cost several ms a call)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, url: str) -> _Connection:
        host, port = url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        return cls(reader, writer)

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        self.writer.write(
            f"POST {path} HTTP/1.1\r\nHost: load\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split()[1])
        length = next(int(v) for k, _, v in (h.partition(b":") for h in lines[1:])
                      if k.lower() == b"content-length")  # fmt: skip
        return status, await self.reader.readexactly(length)

    def close(self) -> None:
        self.writer.close()


async def load(url: str, seconds: float, clients: int, tenants: int) -> dict[str, float]:
    connections = [await _Connection.open(url) for _ in range(clients)]
    try:
        for t in range(tenants):  # warm-up: every tenant's worker started
            status, body = await connections[0].post(
                f"/v1/tenants/t{t}/call/put", b'{"args": ["k", 0]}'
            )
            if status != 200:
                raise SystemExit(f"warm-up call failed: {status} {body!r}")
        latencies: list[float] = []
        errors = 0
        stop = time.perf_counter() + seconds

        async def one(n: int, conn: _Connection) -> None:
            nonlocal errors
            i = 0
            while time.perf_counter() < stop:
                path = f"/v1/tenants/t{(n + i) % tenants}/call/put"
                i += 1
                t0 = time.perf_counter()
                status, _ = await conn.post(path, b'{"args": ["k", %d]}' % i)
                latencies.append(time.perf_counter() - t0)
                errors += status != 200

        began = time.perf_counter()
        await asyncio.gather(*(one(n, c) for n, c in enumerate(connections)))
        elapsed = time.perf_counter() - began
    finally:
        for conn in connections:
            conn.close()
    latencies.sort()
    return {
        "requests": len(latencies),
        "errors": errors,
        "rps": len(latencies) / elapsed,
        "p50_ms": statistics.median(latencies) * 1e3,
        "p99_ms": latencies[int(len(latencies) * 0.99) - 1] * 1e3,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--tenants", type=int, default=16)
    args = parser.parse_args()
    proc, url = start_server("--max-workers", str(max(args.tenants, 1)))
    try:
        result = asyncio.run(load(url, args.seconds, args.clients, args.tenants))
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
    print(
        f"{result['requests']} requests in {args.seconds:.0f}s from {args.clients} clients "
        f"over {args.tenants} tenants (cpus: {os.cpu_count()}): "
        f"{result['rps']:.0f} requests/s, p50 {result['p50_ms']:.2f} ms, "
        f"p99 {result['p99_ms']:.2f} ms, errors {result['errors']:.0f}; "
        f"server exit code {code}"
    )
    if result["errors"] or code != 0:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
