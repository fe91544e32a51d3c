"""Publishing: every rule of a publish in one place.

- Confirms: a publish is done when the broker confirmed it; `Unroutable` when it was returned.
- A nack retires the channel (seen on 3.10 after a failover: a channel whose quorum-queue client
  lost its leader keeps nacking; a fresh one gets through) and the publish is sent again after a
  backoff: the broker certainly did not store it.
- A publish to an exchange this connection has not seen yet is preceded by a passive declare on
  a channel of its own: a missing exchange (a typo, an exchange an operator deleted) is the 404
  of that publish alone, and never closes the channel the other publishes share.
- A channel error is the fault of one publish (RabbitMQ names the exchange or the user_id it
  refused); the others in flight on that channel lost their channel, not their right to be
  published, and are sent again on a fresh one. Only the culprit's caller sees the error.
- While the broker blocks the connection (a resource alarm) publishes wait.
- `publish()` sends again across reconnects until the caller's deadline: a publish whose outcome
  a lost connection made unknown may be stored twice, never lost.

A `Publisher` is one channel of the session's publishing connection, which never consumes. The
session has two: one for the app's publishes and one for the retry and parked copies, so a
user's bad publish never takes a copy down with it.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

from rabbitflow.errors import (
    ChannelClosed,
    ConnectionLost,
    PublishNacked,
    PublishTimeout,
    UnencodableMessage,
    Unroutable,
)
from rabbitflow.transport.base import Channel, Properties, Transport

__all__ = ["NackCount", "Publisher", "not_confirmed"]

log = logging.getLogger("rabbitflow.runtime.publisher")

# Channel errors naming no publish that one publish may meet before it counts as their cause.
_NEIGHBOUR_CLOSES = 3
_BACKOFF_CAP = 2.0
_KNOWN_MAX = 10_000
_RETIRE_GRACE = 5.0  # seconds a retired channel keeps answering its publishes in flight


def backoff(failures: int) -> float:
    """The pause before the next send after `failures` nacks in a row: 40 ms doubling to 2 s."""
    return float(min(_BACKOFF_CAP, 0.02 * 2**failures))


_NAMED = re.compile(r"(?:exchange|user_id property set to) '((?:[^'\\]|\\.)*)'")


def caused_by(error: ChannelClosed, exchange: str, properties: Properties) -> bool | None:
    """Whether the broker closed the channel because of this publish: True, False when it named
    another exchange or user_id, None when its reply text names neither. RabbitMQ's texts:
    "NOT_FOUND - no exchange 'x' in vhost '/'", "ACCESS_REFUSED - access to exchange 'x' ...",
    "PRECONDITION_FAILED - user_id property set to 'u' but authenticated user was 'guest'"."""
    named = _NAMED.findall(error.text)
    if not named:
        return None
    return exchange in named or (properties.user_id is not None and properties.user_id in named)


@dataclass(slots=True)
class NackCount:
    nacks: int = 0


class Publisher:
    """One confirm-mode channel of a publishing connection, reopened when it goes.

    `repair`, when given, is awaited once per publish that the broker refused as unroutable or
    for a missing exchange, before it is sent again: the session re-declares its topology there,
    for copies to the service's own exchange that an operator deleted.
    """

    def __init__(
        self,
        transport: Transport,
        *,
        known: Iterable[str] = (),
        repair: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.transport = transport
        self._known = {"", *known}  # exchanges that exist, as far as this connection knows
        self._repair = repair
        self._channel: Channel | None = None
        self._opening = asyncio.Lock()
        self._closing: set[asyncio.Task[None]] = set()

    async def channel(self) -> Channel:
        channel = self._channel
        if channel is not None and channel.is_open:
            return channel
        async with self._opening:
            if self._channel is None or not self._channel.is_open:
                self._channel = await self.transport.channel()
            return self._channel

    def send(
        self, body: bytes, exchange: str, routing_key: str, properties: Properties
    ) -> asyncio.Future[None]:
        """One try, as a future of the broker's answer: the fast path of the copies, without a
        task while the channel is open. A failed try is handed to `publish(..., after=...)`."""
        channel = self._channel
        if channel is None or not channel.is_open:
            return asyncio.ensure_future(self._send_on_new(body, exchange, routing_key, properties))
        future = channel.publish_nowait(
            body, exchange=exchange, routing_key=routing_key, properties=properties
        )
        future.add_done_callback(functools.partial(self._answered, channel))
        return future

    async def _send_on_new(
        self, body: bytes, exchange: str, routing_key: str, properties: Properties
    ) -> None:
        channel = await self.channel()
        try:
            await channel.publish(body, exchange=exchange, routing_key=routing_key, properties=properties)
        except PublishNacked:
            self._retire(channel)
            raise

    def _answered(self, channel: Channel, future: asyncio.Future[None]) -> None:
        if not future.cancelled() and isinstance(future.exception(), PublishNacked):
            self._retire(channel)

    async def publish(
        self,
        body: bytes,
        exchange: str,
        routing_key: str,
        properties: Properties,
        *,
        after: BaseException | None = None,
        tally: NackCount | None = None,
        mandatory: bool = True,
    ) -> None:
        """Publish on this connection until the broker confirms it (`after`: how a first try
        ended; `tally` counts the nacks, for the caller's error message; `mandatory=False`: an
        unroutable message is dropped by the broker instead of returned). Raises `Unroutable` or
        `ChannelClosed` when the broker refused this publish, `ConnectionLost` when the connection
        went, and nothing else of its own: bound it with a timeout."""
        nacks = closes = 0
        repaired = False
        failure = after
        if exchange not in self._known:
            await self._probe(exchange)
        while True:
            if failure is not None:
                if isinstance(failure, PublishNacked):
                    nacks += 1
                    if tally is not None:
                        tally.nacks += 1
                    log.info("publish to %r/%r nacked (%s); sending again", exchange, routing_key, failure)
                    await asyncio.sleep(backoff(nacks))
                elif isinstance(failure, Unroutable | ChannelClosed):
                    if isinstance(failure, ChannelClosed) and failure.code == 404:
                        self._known.difference_update(_NAMED.findall(failure.text))
                    culprit = isinstance(failure, Unroutable) or caused_by(failure, exchange, properties)
                    missing = isinstance(failure, Unroutable) or (culprit is True and failure.code == 404)
                    if missing and self._repair is not None and not repaired:
                        repaired = True
                        log.warning(
                            "publish to %r/%r: %s; re-declaring the topology", exchange, routing_key, failure
                        )
                        await self._repair()
                    elif culprit:
                        raise failure
                    elif culprit is None:
                        closes += 1  # nobody named: after a few, this one is the likeliest
                        if closes >= _NEIGHBOUR_CLOSES:
                            raise failure
                    # else another publish's fault: this one lost only its channel
                elif isinstance(failure, ConnectionLost):
                    if not self.transport.is_open:
                        raise failure
                    await asyncio.sleep(0)  # only the channel went (retired after a nack, say)
                else:
                    raise failure
            channel = None
            try:
                if self.transport.blocked:
                    await self.transport.wait_unblocked()
                channel = self._channel
                if channel is None or not channel.is_open:
                    channel = await self.channel()
                await channel.publish(
                    body,
                    exchange=exchange,
                    routing_key=routing_key,
                    properties=properties,
                    mandatory=mandatory,
                )
                return
            except PublishNacked as exc:
                if channel is not None:
                    self._retire(channel)
                failure = exc
            except (Unroutable, ChannelClosed, ConnectionLost) as exc:
                failure = exc

    async def check_exchange(self, exchange: str) -> None:
        """`ChannelClosed` (404) if `exchange` is missing, asked on a channel of its own the first
        time this connection meets it."""
        if exchange not in self._known:
            await self._probe(exchange)

    async def _probe(self, exchange: str) -> None:
        """Raise the broker's 404 for a missing `exchange` on a channel of its own."""
        channel = await self.transport.channel()
        try:
            await channel.declare_exchange(exchange, passive=True)
        except ValueError as exc:  # pamqp: a name it cannot put in a frame
            raise UnencodableMessage(f"cannot encode the publish: exchange {exchange!r}: {exc}") from None
        finally:
            await channel.close()
        if len(self._known) < _KNOWN_MAX:
            self._known.add(exchange)

    def _retire(self, channel: Channel) -> None:
        """Take a nacking channel out of use. It is closed only after a grace period: publishes
        still in flight on it get their own answers (a confirm, or a nack that is certain)
        instead of an unknown outcome that would have them sent, and perhaps stored, twice."""
        if self._channel is channel:
            self._channel = None
            task = asyncio.get_running_loop().create_task(self._close_later(channel))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    @staticmethod
    async def _close_later(channel: Channel) -> None:
        try:
            await asyncio.sleep(_RETIRE_GRACE)
        finally:
            await channel.close()

    async def close(self) -> None:
        channel, self._channel = self._channel, None
        if channel is not None:
            await channel.close()
        for task in self._closing:
            task.cancel()  # closes its channel now
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)


def not_confirmed(exchange: str, routing_key: str, timeout: float, nacks: NackCount) -> PublishTimeout:
    """The error of a publish that no node confirmed within `timeout`."""
    why = (
        f"nacked {nacks.nacks} time(s) by the broker"
        if nacks.nacks
        else "nodes down or connection blocked by a resource alarm"
    )
    return PublishTimeout(
        f"publish to exchange {exchange!r} with routing key {routing_key!r} was not confirmed "
        f"within {timeout}s ({why})"
    )
