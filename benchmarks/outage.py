"""Outage mode: a consumer's HTTP downstream goes away for a while, with and without a breaker.

N messages arrive while the downstream is off for OUTAGE seconds; the handler calls it for each
message; retries=3 with delays [0.5, 1, 2]. Reports, for each variant, the messages handled,
parked and the failed attempts, and the broker's CPU during the outage; samples handled / failed
/ parked over time for the chart.

    python benchmarks/outage.py                       # one JSON line per variant
    python benchmarks/outage.py --out docs/outage.md  # the docs page's table and chart

The broker is BENCH_AMQP_URL (default amqp://guest:guest@127.0.0.1:5672/); every run uses its
own queues and deletes them afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import socket
import sys
import time
from pathlib import Path
from typing import Any

import aiormq

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib
import run as runner

from rabbitflow import App, Breaker, Middleware

DELAYS = [0.5, 1.0, 2.0]


class Downstream:
    def __init__(self) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self._server: asyncio.Server | None = None

    async def on(self) -> None:
        self._server = await asyncio.start_server(self._answer, "127.0.0.1", self.port, reuse_address=True)

    async def off(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    @staticmethod
    async def _answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok")
        await writer.drain()
        writer.close()

    async def call(self) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        try:
            writer.write(b"GET / HTTP/1.1\r\nhost: downstream\r\n\r\n")
            if not (await reader.readline()).startswith(b"HTTP/1.1 200"):
                raise OSError("downstream error")
        finally:
            writer.close()


class Tally(Middleware):
    def __init__(self) -> None:
        self.failed = 0
        self.parked = 0

    def attempt_failed(self, queue: str, attempt: int, exception: BaseException) -> None:
        self.failed += 1
        if attempt > len(DELAYS):
            self.parked += 1


async def one(n: int, outage: float, with_breaker: bool) -> dict[str, Any]:
    suffix = secrets.token_hex(3)
    queue = f"bench.outage.{suffix}"
    tally = Tally()
    app = App(f"bench-outage-{suffix}", url=benchlib.AMQP_URL, prefetch=64, middleware=[tally])
    service = Downstream()
    handled: set[int] = set()
    breaker = Breaker(threshold=0.5, window=5, min_attempts=20, cooldown=2) if with_breaker else None

    @app.consumer(queue, retries=len(DELAYS), delay=DELAYS, queue_type="quorum", breaker=breaker)
    async def handle(body: dict[str, int]) -> None:
        await service.call()
        handled.add(body["n"])

    broker = runner._find_broker_pid()
    samples: list[tuple[float, int, int, int]] = []
    await service.on()
    try:
        async with app:
            start = time.monotonic()

            async def sample() -> None:
                while True:
                    samples.append((time.monotonic() - start, len(handled), tally.failed, tally.parked))
                    await asyncio.sleep(0.25)

            sampler = asyncio.create_task(sample())
            await service.off()
            cpu0 = runner._pid_cpu(broker)
            per = outage / n
            for i in range(n):  # the messages arrive throughout the outage
                await app.publish({"n": i}, routing_key=queue)
                await asyncio.sleep(max(0.0, start + (i + 1) * per - time.monotonic()))
            await asyncio.sleep(max(0.0, start + outage - time.monotonic()))
            outage_cpu = runner._pid_cpu(broker) - cpu0
            await service.on()
            outage_end = time.monotonic() - start  # later than planned when publishing lagged
            while len(handled) + tally.parked < n:  # noqa: ASYNC110 - counting, not waiting on one event
                await asyncio.sleep(0.1)
            took = time.monotonic() - start
            await asyncio.sleep(0.5)
            sampler.cancel()
    finally:
        await service.off()
        connection = await aiormq.connect(benchlib.AMQP_URL)
        channel = await connection.channel()
        for q in app.plan.queues:
            await channel.queue_delete(q.name)
        await channel.exchange_delete(f"{app.name}.dlx")
        await connection.close()
    return {
        "variant": "breaker" if with_breaker else "no breaker",
        "n": n,
        "outage_s": outage,
        "outage_actual_s": round(outage_end, 2),
        "handled": len(handled),
        "parked": tally.parked,
        "failed_attempts": tally.failed,
        "broker_cpu_during_outage_s": round(outage_cpu, 3),
        "all_done_after_s": round(took, 2),
        "samples": samples,
    }


def chart(results: list[dict[str, Any]], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, len(results), figsize=(11, 3.8), sharey=True)
    for ax, result in zip(axes, results, strict=True):
        t = [s[0] for s in result["samples"]]
        ax.plot(t, [s[1] for s in result["samples"]], label="handled")
        ax.plot(t, [s[2] for s in result["samples"]], label="failed attempts")
        ax.plot(t, [s[3] for s in result["samples"]], label="parked")
        ax.axvspan(0, result["outage_actual_s"], color="grey", alpha=0.15, label="downstream off")
        ax.set_title(result["variant"])
        ax.set_xlabel("seconds")
    axes[0].set_ylabel("messages")
    axes[0].legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def markdown(results: list[dict[str, Any]], command: str, image: str | None) -> str:
    lines = [
        f"Measured with `{command}` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: "
        f"{results[0]['n']:,} messages published over {results[0]['outage_s']:g} s (paced, each "
        "confirmed) while the downstream is off, and it comes back once the last was published; "
        f"retries=3, delays {DELAYS}; breaker "
        "`Breaker(threshold=0.5, window=5, min_attempts=20, cooldown=2)`; quorum queues.",
        "",
        "| variant | handled | parked | failed attempts | downstream off for | broker CPU meanwhile "
        "| all done after |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r['variant']} | {r['handled']:,} | {r['parked']:,} | {r['failed_attempts']:,} | "
            f"{r['outage_actual_s']:.1f} s | {r['broker_cpu_during_outage_s']:.2f} s | "
            f"{r['all_done_after_s']:.1f} s |"
        )
    if image:
        lines += ["", f"![handled, failed and parked over time]({image})"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=5000)
    parser.add_argument("--outage", type=float, default=30.0, help="seconds the downstream is off")
    parser.add_argument("--out", help="write the table (and a .png chart beside it) to this file")
    args = parser.parse_args(argv)
    results = [asyncio.run(one(args.n, args.outage, with_breaker)) for with_breaker in (False, True)]
    for r in results:
        print(json.dumps({k: v for k, v in r.items() if k != "samples"}))
    if args.out:
        out = Path(args.out)
        image = out.with_suffix(".png")
        drawn = chart(results, image)
        command = "python benchmarks/outage.py " + " ".join(argv if argv is not None else sys.argv[1:])
        out.write_text(markdown(results, command.strip(), image.name if drawn else None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
