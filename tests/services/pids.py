"""A service run under `rabbitflow run --workers N` by the CLI tests: each handled message is a
log line, which carries the worker's number and pid."""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

from rabbitflow import App

log = logging.getLogger("pids")
app = App(os.environ["RF_SERVICE"], prefetch=1, concurrency=1)


@app.consumer(os.environ["RF_QUEUE"], retries=0, queue_type="classic")
async def handle(body: dict[str, Any]) -> None:
    log.info("handled %s", body["n"])
    await asyncio.sleep(0.05)
