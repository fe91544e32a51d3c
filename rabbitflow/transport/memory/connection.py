"""Connections to the in-memory broker: the Transport interface."""

from __future__ import annotations

import asyncio

from rabbitflow.transport.base import ConnectionLost, Transport
from rabbitflow.transport.memory.channel import MemoryChannel
from rabbitflow.transport.memory.vhost import VHost

__all__ = ["MemoryTransport"]


class MemoryTransport(Transport):
    """One connection to a MemoryBroker."""

    node = "memory://"
    declare_width = 1  # no round trips: one channel, in order, and drain() sees it as one step

    def __init__(self, vhost: VHost) -> None:
        self._vhost = vhost
        self._channels: list[MemoryChannel] = []
        self._closed: asyncio.Future[ConnectionLost | None] = asyncio.get_running_loop().create_future()

    def __repr__(self) -> str:
        return f"<MemoryTransport {'open' if self.is_open else 'closed'} channels={len(self._channels)}>"

    @property
    def is_open(self) -> bool:
        return not self._closed.done()

    @property
    def blocked(self) -> bool:
        return False

    async def wait_unblocked(self) -> None:
        return None

    @property
    def server_version(self) -> str:
        """The emulated RabbitMQ's version, as its server properties would say ("4.3.0")."""
        return self._vhost.profile.server_version

    async def channel(self) -> MemoryChannel:
        if not self.is_open:
            raise ConnectionLost("the connection to memory:// is closed")
        channel = MemoryChannel(self, len(self._channels) + 1)
        self._channels.append(channel)
        self._vhost.activity += 1  # a client at work: drain() waits for what it does next
        await asyncio.sleep(0)
        return channel

    async def wait_closed(self) -> BaseException | None:
        return await asyncio.shield(self._closed)

    async def close(self) -> None:
        self._shutdown(None)
        await asyncio.sleep(0)

    def _shutdown(self, lost: ConnectionLost | None) -> None:
        """Close every channel (their unacked messages return) and drop exclusive queues."""
        if self._closed.done():
            return
        reason = lost or ConnectionLost("the connection to memory:// was closed")
        for channel in self._channels:
            channel._shutdown(reason)
        vhost = self._vhost
        for q in [q for q in vhost.queues.values() if q.owner is self]:
            vhost.remove_queue(q)  # exclusive queues go with their connection
        self._closed.set_result(lost)
