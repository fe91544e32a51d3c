"""The local 3-node cluster (scripts/cluster.sh) and raw aiormq looks behind rabbitflow's back."""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path
from typing import Any

import aiormq

from ..brokers import cluster_ports

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "cluster.sh"
PORTS = cluster_ports()  # 5673-5675, or 5691-5693 with RABBITFLOW_BROKER_VERSION=4.0
NORMAL_WATERMARK = "0.4"
ALARM_WATERMARK = "0.0000001"


def url(node: int, port: int | None = None) -> str:
    return f"amqp://guest:guest@127.0.0.1:{port or PORTS[node]}/"


def running() -> bool:
    return subprocess.run([str(SCRIPT), "status"], capture_output=True, check=False).returncode == 0


def start_sync() -> None:
    result = subprocess.run([str(SCRIPT), "start"], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"the local 3-node cluster did not start: {result.stderr}")


def stop_sync() -> None:
    subprocess.run([str(SCRIPT), "stop"], capture_output=True, check=False)


async def cluster(*args: str, check: bool = True) -> str:
    process = await asyncio.create_subprocess_exec(
        str(SCRIPT), *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await process.communicate()
    if check and process.returncode != 0:
        raise RuntimeError(f"cluster.sh {' '.join(args)} failed: {err.decode()}")
    return out.decode()


async def list_queues(via: int, *fields: str) -> list[dict[str, Any]]:
    out = await cluster("ctl", str(via), "list_queues", "name", *fields, "--formatter", "json", check=False)
    try:
        rows = json.loads(out or "[]")
    except json.JSONDecodeError:
        return []
    return rows if isinstance(rows, list) else []


async def members_online(queues: set[str], via: int, timeout: float = 90) -> float:
    """Wait until every node runs its member of each quorum queue in `queues` (a node that just
    rejoined may still be recovering: losing another one then leaves a queue without a majority);
    returns the seconds it took."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with asyncio.timeout(timeout):
        while True:
            rows = await list_queues(via, "online")
            online = {row.get("name"): len(row.get("online", [])) for row in rows}
            if all(online.get(queue) == 3 for queue in queues):
                return loop.time() - started
            await asyncio.sleep(0.5)


async def queue_counts(via: int, queues: set[str]) -> dict[str, int]:
    """Messages (ready + unacknowledged) in each of `queues` that exists."""
    rows = await list_queues(via, "messages")
    return {row["name"]: int(row.get("messages") or 0) for row in rows if row.get("name") in queues}


class Raw:
    """A raw aiormq connection to one node."""

    def __init__(self, node: int) -> None:
        self.node = node
        self.connection: aiormq.abc.AbstractConnection | None = None
        self.channel: aiormq.abc.AbstractChannel | None = None

    async def __aenter__(self) -> Raw:
        self.connection = await asyncio.wait_for(aiormq.connect(url(self.node)), 10)
        self.channel = await self.connection.channel()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.connection is not None:
            await self.connection.close()

    async def publish(self, body: bytes, routing_key: str, **props: Any) -> None:
        assert self.channel is not None
        await self.channel.basic_publish(
            body, routing_key=routing_key, properties=aiormq.spec.Basic.Properties(**props), mandatory=True
        )

    async def ready(self, queue: str) -> int:
        assert self.channel is not None
        ok = await self.channel.queue_declare(queue, passive=True)
        return int(ok.message_count or 0)

    async def drain(self, queue: str) -> list[aiormq.abc.DeliveredMessage]:
        assert self.channel is not None
        out = []
        while True:
            message = await self.channel.basic_get(queue, no_ack=False)
            if message.delivery.__class__.__name__ == "GetEmpty":
                return out
            out.append(message)
            await self.channel.basic_ack(message.delivery.delivery_tag)

    async def delete_queue(self, queue: str) -> int:
        """Delete `queue` (quorum queues refuse if-empty); returns how many messages went with it."""
        assert self.channel is not None
        ok = await self.channel.queue_delete(queue)
        return int(ok.message_count or 0)

    async def delete(self, queues: list[str], exchanges: list[str]) -> None:
        assert self.channel is not None
        for queue in queues:
            await self.channel.queue_delete(queue)
        for exchange in exchanges:
            await self.channel.exchange_delete(exchange)
