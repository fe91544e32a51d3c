"""A service run as a real process by the CLI tests; configured through the environment."""

from __future__ import annotations

import asyncio
import os
from typing import Any

from rabbitflow import App, Message

app = App(
    os.environ["RF_SERVICE"],
    prefetch=int(os.environ.get("RF_PREFETCH", "10")),
    concurrency=int(os.environ.get("RF_CONCURRENCY", "3")),
    graceful_timeout=float(os.environ.get("RF_GRACE", "10")),
)
MODE = os.environ.get("RF_MODE", "slow")
SLEEP = float(os.environ.get("RF_SLEEP", "1"))
LOG = os.environ["RF_LOG"]


def record(*words: object) -> None:
    with open(LOG, "a") as log:
        log.write(" ".join(str(w) for w in words) + "\n")
        log.flush()
        os.fsync(log.fileno())


@app.consumer(os.environ["RF_QUEUE"], retries=2, delay=1)
async def handle(body: dict[str, Any], message: Message) -> None:
    if MODE == "loop":  # the event loop the handler runs on, as `rabbitflow run --loop` chose it
        record("loop", body["n"], type(asyncio.get_running_loop()).__module__.split(".")[0])
        return
    record("start", body["n"], message.attempt, int(message.redelivered))
    if MODE == "fail-once" and message.attempt == 1:
        record("fail", body["n"], message.attempt)
        raise RuntimeError("first attempt fails")
    await asyncio.sleep(SLEEP)
    record("done", body["n"], message.attempt)
