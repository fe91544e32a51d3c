"""The service `benchmarks/scaleout.py` runs with `rabbitflow run --workers N`: the consume
benchmark's consumer (prefetch 256, a no-op handler on the decoded JSON body), configured through
the environment (RABBITFLOW_URL, BENCH_SERVICE, BENCH_QUEUE, BENCH_QUEUE_TYPE)."""

from __future__ import annotations

import os
from typing import Any

from rabbitflow import App

app = App(os.environ["BENCH_SERVICE"], prefetch=256)


@app.consumer(os.environ["BENCH_QUEUE"], queue_type=os.environ.get("BENCH_QUEUE_TYPE", "classic"))
async def handle(body: dict[str, Any]) -> None: ...
