"""A failure burst, seen through the Prometheus metrics: the chart in docs/operations.md.

A producer publishes RATE messages a second for DURATION seconds to a consumer with retries=2
and delays [1, 3]. From BURST_START to BURST_END every handler call fails (its downstream is
"down"); otherwise it succeeds. Every 0.5 s the run scrapes the app's PrometheusMiddleware
registry, as Prometheus would, and records handled (acked), retries scheduled and parked.

    python benchmarks/metrics_run.py --out docs/operations-run.png

The broker is BENCH_AMQP_URL (default amqp://guest:guest@127.0.0.1:5672/); the run deletes its
queues afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import secrets
import sys
import time
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from rabbitflow import App
from rabbitflow.prometheus import PrometheusMiddleware

RATE, DURATION = 100, 40.0
BURST_START, BURST_END = 10.0, 20.0
DELAYS = [1.0, 3.0]


def total(registry: CollectorRegistry, name: str, **labels: str) -> float:
    """The sum of a metric's samples whose labels include `labels`."""
    found = 0.0
    for metric in registry.collect():
        for sample in metric.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                found += sample.value
    return found


async def run(url: str) -> dict[str, Any]:
    name = f"metrics-run-{secrets.token_hex(3)}"
    registry = CollectorRegistry()
    metrics = PrometheusMiddleware(registry)
    app = App(name, url=url, middleware=[metrics], graceful_timeout=5)
    metrics.bind(app)
    queue = f"{name}.work"
    began = 0.0

    @app.consumer(queue, retries=2, delay=DELAYS, queue_type="quorum", prefetch=32)
    async def handle(body: dict[str, int]) -> None:
        now = time.monotonic() - began
        if BURST_START <= now < BURST_END:
            raise ConnectionError("downstream refused the connection")

    samples: list[dict[str, float]] = []
    async with app:
        began = time.monotonic()

        async def produce() -> None:
            n = 0
            while (elapsed := time.monotonic() - began) < DURATION:
                due = int(elapsed * RATE)
                while n < due:
                    await app.publish({"n": n}, routing_key=queue)
                    n += 1
                await asyncio.sleep(0.01)

        producer = asyncio.ensure_future(produce())
        while time.monotonic() - began < DURATION + sum(DELAYS) + 3:
            samples.append(
                {
                    "t": round(time.monotonic() - began, 2),
                    "handled": total(
                        registry, "rabbitflow_received_processed_messages_total", status="acked"
                    ),
                    "retries": total(registry, "rabbitflow_retries_total"),
                    "parked": total(registry, "rabbitflow_parked_messages_total"),
                }
            )
            await asyncio.sleep(0.5)
        await producer
    await app.admin().delete(force=True)
    return {"rate": RATE, "burst": [BURST_START, BURST_END], "delays": DELAYS, "samples": samples}


def chart(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = result["samples"]
    t = [s["t"] for s in samples]

    def rate(key: str) -> list[float]:
        values = [s[key] for s in samples]
        return [0.0] + [
            (values[i] - values[i - 1]) / max(t[i] - t[i - 1], 1e-9) for i in range(1, len(values))
        ]

    fig, ax = plt.subplots(figsize=(8, 3.6))
    ax.axvspan(*result["burst"], color="0.92", label="downstream down")
    ax.plot(t, rate("handled"), label="handled / s (received_processed_messages_total{status=acked})")
    ax.plot(t, rate("retries"), label="retries / s (retries_total)")
    ax.plot(t, rate("parked"), label="parked / s (parked_messages_total)")
    ax.set_xlabel("seconds")
    ax.set_ylabel("messages per second")
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, help="write the chart (PNG) here, and the samples next to it")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)  # each of the burst's parks is a warning line
    url = os.environ.get("BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
    result = asyncio.run(run(url))
    last = result["samples"][-1]
    print(json.dumps({"handled": last["handled"], "retries": last["retries"], "parked": last["parked"]}))
    if args.out is not None:
        chart(result, args.out)
        args.out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
