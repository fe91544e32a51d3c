"""A service whose handler kills its own worker process on a poison message (as a segfault or the
OOM killer would): run by the containment tests under `rabbitflow run --workers 2`."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from typing import Any

from rabbitflow import App, Message

app = App(os.environ["RF_SERVICE"], prefetch=16, concurrency=8, graceful_timeout=5)
LOG = os.environ["RF_LOG"]


def record(*words: object) -> None:
    # O_APPEND: whole lines from every worker; on disk before a kill
    fd = os.open(LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, (" ".join(str(w) for w in words) + "\n").encode())
    finally:
        os.close(fd)


@app.consumer(os.environ["RF_QUEUE"], retries=2, delay=1)
async def handle(body: dict[str, Any], message: Message) -> None:
    if body.get("poison"):
        await asyncio.sleep(0.05)  # neighbours start meanwhile: they are in flight at the kill
        record("kill", os.getpid(), f"{time.time():.3f}", message.redelivered)
        os.kill(os.getpid(), signal.SIGKILL)
    record("start", body["n"], os.getpid(), f"{time.time():.3f}")
    await asyncio.sleep(0.02)
    record("done", body["n"], os.getpid(), f"{time.time():.3f}")
