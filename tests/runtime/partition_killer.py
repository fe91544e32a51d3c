"""A replica of a partitioned consumer whose handler kills its own process on a poison event (as
a segfault or the OOM killer would), for tests/runtime/test_partitions_attack.py. Run as a module
(`python -m tests.runtime.partition_killer`, or `rabbitflow run tests.runtime.partition_killer:app`)
with RF_SERVICE, RF_QUEUE, RF_PARTITIONS and RF_LOG in the environment.

It appends to RF_LOG, with os.write on an O_APPEND descriptor (on disk before the kill):
`start NAME PID DELIVERY-COUNT`, `done NAME PID`, `kill NAME PID`.
An event is `{"name": ..., "pause": seconds}`; one with `"poison": true` kills the process after
its pause (its neighbours in other partitions are in hand meanwhile).
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from rabbitflow import App, Message

app = App(os.environ.get("RF_SERVICE", "killer"), graceful_timeout=2, concurrency=8)
LOG = os.environ.get("RF_LOG", os.devnull)


def record(*words: object) -> None:
    fd = os.open(LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, (" ".join(str(w) for w in words) + "\n").encode())
    finally:
        os.close(fd)


@app.consumer(
    os.environ.get("RF_QUEUE", "killer"), partitions=int(os.environ.get("RF_PARTITIONS", "2")), retries=0
)
async def handle(event: dict[str, Any], message: Message) -> None:
    count = message.headers.get("x-delivery-count", 0)
    record("start", event["name"], os.getpid(), count)
    await asyncio.sleep(float(event.get("pause", 0)))
    if event.get("poison"):
        record("kill", event["name"], os.getpid())
        os._exit(1)
    record("done", event["name"], os.getpid())


if __name__ == "__main__":
    app.run()
