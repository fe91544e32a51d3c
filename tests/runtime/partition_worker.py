"""A replica of a partitioned consumer, for the partition ledgers (partition_ledger.py): appends
`S|E|X key seq pid time` lines to a shared ledger around each handler call, and `N pid node held`
whenever its node or its partitions change.

    python partition_worker.py URL SERVICE QUEUE PARTITIONS LEDGER PAUSE

URL may list several nodes, ';'-separated. An event with "hold": PATH is held in hand until
PATH exists.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time

from rabbitflow import App


def main() -> None:
    url, service, queue, partitions, ledger, pause = sys.argv[1:7]
    fd = os.open(ledger, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    pid = os.getpid()
    app = App(service, url=url, graceful_timeout=5)

    @app.consumer(queue, partitions=int(partitions), concurrency=64, retries=0)
    async def handle(event: dict[str, object]) -> None:
        os.write(fd, f"S {event['key']} {event['seq']} {pid} {time.time():.3f}\n".encode())
        try:
            hold = event.get("hold")
            while isinstance(hold, str) and not os.path.exists(hold):  # noqa: ASYNC110, ASYNC240 - another process makes it
                await asyncio.sleep(0.02)
            await asyncio.sleep(float(pause))
        except BaseException:
            os.write(fd, f"X {event['key']} {event['seq']} {pid} {time.time():.3f}\n".encode())
            raise
        os.write(fd, f"E {event['key']} {event['seq']} {pid} {time.time():.3f}\n".encode())

    async def report() -> None:
        seen = None
        while True:
            health = app.health()
            groups = health["partitioned"]
            now = (health["node"], tuple(groups[0]["held"]) if groups else ())
            if now != seen:
                seen = now
                held = ",".join(map(str, now[1])) or "-"
                os.write(fd, f"N {pid} {now[0]} {held}\n".encode())
            await asyncio.sleep(0.1)

    async def run() -> None:
        async with app:
            reporting = asyncio.get_running_loop().create_task(report())
            print("ready", flush=True)
            try:
                await asyncio.Event().wait()
            finally:
                reporting.cancel()

    asyncio.run(run())


if __name__ == "__main__":
    main()
