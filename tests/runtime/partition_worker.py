"""A replica of a partitioned consumer, for tests/runtime/test_partitions.py: appends
`S|E key seq pid` lines to a shared ledger around each handler call."""

from __future__ import annotations

import asyncio
import os
import sys

from rabbitflow import App


def main() -> None:
    url, service, queue, partitions, ledger, pause = sys.argv[1:7]
    fd = os.open(ledger, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    pid = os.getpid()
    app = App(service, url=url, graceful_timeout=5)

    @app.consumer(queue, partitions=int(partitions), concurrency=64, retries=0)
    async def handle(event: dict[str, object]) -> None:
        os.write(fd, f"S {event['key']} {event['seq']} {pid}\n".encode())
        await asyncio.sleep(float(pause))
        os.write(fd, f"E {event['key']} {event['seq']} {pid}\n".encode())

    async def run() -> None:
        async with app:
            print("ready", flush=True)
            await asyncio.Event().wait()

    asyncio.run(run())


if __name__ == "__main__":
    main()
