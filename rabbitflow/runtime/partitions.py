"""Ordered partitions: one replica's share of a partitioned consumer (docs/partitions.md).

A partitioned consumer of Q has N single-active-consumer queues Q.p0..Q.p<N-1>. Every replica
sends a heartbeat on the fanout exchange Q.members and hears the others' on an exclusive queue of
its own; each computes the same assignment over the replicas it hears (bounded-load rendezvous
hashing) and consumes only its partitions, one message at a time each. A replica gives a
partition up by letting its message in hand end, then closing the partition's channel: RabbitMQ
3.10 hands a single-active-consumer queue to the next consumer the moment the active one cancels,
even while it still holds an unacked message (so cancelling first would let the next owner start
on the following message), while a closed channel returns what it held to the head of the queue
first. The broker's single active consumer keeps two replicas whose views differ for a moment
from ever being delivered one partition's messages at once.

A failing message is retried in place: the handler is called again after the policy's delay,
holding its partition, and parked after the last attempt, so that the partition moves on in order.
The handler is called as a plain consumer calls it (`invocation.py`): middleware, dependencies,
sync handlers, `publish_to` and replies; middleware sees each attempt in place as a delivery of
its own (`received`, then `settled` with RETRIED and the delay until the next call).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from rabbitflow import names
from rabbitflow.errors import ConfigError, DecodeError, TransportError
from rabbitflow.message import DUPLICATE, Message
from rabbitflow.middleware.base import Fate, Middleware
from rabbitflow.retry import Action, decide
from rabbitflow.runtime import copies
from rabbitflow.runtime.invocation import Invocation, expired, threads_for
from rabbitflow.runtime.publisher import Publisher
from rabbitflow.runtime.quarantine import delivery_key, quarantine_from_env
from rabbitflow.settings import STALL_AFTER
from rabbitflow.spec import ConsumerSpec
from rabbitflow.topology.compiler import partition_exchange
from rabbitflow.transport.base import Channel, Delivery, Properties, persistent_copy
from rabbitflow.transport.connection import Links

__all__ = ["HEARTBEAT", "MISSED", "Membership", "Partition", "PartitionGroup", "assign", "partition", "route"]

log = logging.getLogger("rabbitflow.runtime.partitions")

HEARTBEAT = 1.0  # seconds between a replica's heartbeats
MISSED = 3  # heartbeats a replica may miss before the others count it gone
# Park a message delivered this often (its handler kept killing the worker), as consumer.py does.
PARK_AFTER_DELIVERIES = names.DELIVERY_LIMIT // 2


def partition(key: str | bytes | int, partitions: int) -> str:
    """The routing key of `key` on a partitioned consumer's exchange with `partitions` partitions:
    `str(crc32(utf-8 key) % partitions)`."""
    return str(names.partition_of(key, partitions))


def assign(members: Iterable[str], partitions: int) -> dict[int, str]:
    """Partition -> member: rendezvous hashing with a bound on each member's load (at most
    ceil(N/R)), so R members share N partitions evenly, every member computes the same answer
    from the same set, and a member joining or leaving moves few partitions."""
    ordered = sorted(set(members))
    if not ordered:
        return {}
    cap = -(-partitions // len(ordered))
    load = dict.fromkeys(ordered, 0)
    owners: dict[int, str] = {}
    for index in range(partitions):
        for member in sorted(ordered, key=lambda m: _score(m, index), reverse=True):
            if load[member] < cap:
                owners[index] = member
                load[member] += 1
                break
    return owners


def _score(member: str, index: int) -> int:
    return int.from_bytes(hashlib.blake2b(f"{member}/{index}".encode(), digest_size=8).digest(), "big")


def route(
    specs: Sequence[ConsumerSpec], exchange: str, routing_key: str | None, key: object, body: Any
) -> str:
    """`app.publish`'s routing key: the one given, or the partition of `key` (or of the body's
    `partition_key`) on this app's partitioned consumer behind `exchange`."""
    if key is None and routing_key is not None:
        return routing_key
    spec = next((s for s in specs if s.partitions is not None and partition_exchange(s) == exchange), None)
    if spec is None or spec.partitions is None:
        raise ConfigError(
            f"publish(exchange={exchange!r}, key=...): no partitioned consumer of this app is behind "
            "that exchange; give routing_key=rabbitflow.partition(key, partitions) instead"
        )
    if key is not None and routing_key is not None:
        raise ConfigError("publish(): give routing_key or key, not both")
    if key is None:
        if spec.partition_key is None:
            raise ConfigError(
                f"publish(exchange={exchange!r}): give key=... (or routing_key=...), or declare the "
                "consumer with partition_key=..."
            )
        key = spec.partition_key(body)
    if isinstance(key, bool) or not isinstance(key, str | bytes | int):
        raise ConfigError(f"publish(key={key!r}): a partition key is a str, bytes or int")
    return partition(key, spec.partitions)


class Membership:
    """This replica's heartbeat on the fanout exchange Q.members, and the replicas it hears."""

    def __init__(
        self,
        queue: str,
        links: Links,
        *,
        interval: float,
        on_change: Callable[[frozenset[str]], None],
        partitions: int | None = None,
    ) -> None:
        self.id = uuid.uuid4().hex[:16]
        # Replicas count only replicas with the same number of partitions: one with another count
        # (a deploy changing it) would be given partitions it does not have, and they would wait.
        self._partitions = partitions
        self._strangers: set[str] = set()
        self._exchange = names.members_exchange(queue)
        self._queue = f"{self._exchange}.{self.id}"
        self._links = links
        self._interval = interval
        self._on_change = on_change
        self._seen: dict[str, float] = {}  # member -> loop time of its last heartbeat
        self.members: frozenset[str] = frozenset({self.id})
        self._inbox: Channel | None = None
        self._outbox: Channel | None = None
        self._beating: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._outbox = await self._links.publish.channel()
        inbox = self._inbox = await self._links.consume.channel()
        # Exclusive: it goes with this replica's connection, whatever ends it.
        ttl = round(self._interval * MISSED * 1000)
        await inbox.declare_queue(
            self._queue, durable=False, exclusive=True, arguments={"x-message-ttl": ttl}
        )
        await inbox.bind_queue(self._queue, self._exchange, "")
        await inbox.consume(self._queue, self._heard, prefetch=100)
        await self._beat()
        self._beating = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        """Say goodbye, so the others take this replica's partitions without waiting."""
        if self._beating is not None:
            self._beating.cancel()
        with contextlib.suppress(TransportError, TimeoutError):
            async with asyncio.timeout(self._interval):
                await self._beat(bye=True)
        for channel in (self._inbox, self._outbox):
            if channel is not None:
                with contextlib.suppress(TransportError):
                    await channel.close()

    def abandon(self) -> None:
        if self._beating is not None:
            self._beating.cancel()
        for task in self._tasks:
            task.cancel()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            with contextlib.suppress(TransportError):
                await self._beat()
            now = asyncio.get_running_loop().time()
            for member, seen in list(self._seen.items()):
                if now - seen > self._interval * MISSED:
                    log.info("partitions of %s: replica %s went silent", self._exchange, member)
                    del self._seen[member]
            self._update()

    async def _beat(self, *, bye: bool = False) -> None:
        assert self._outbox is not None
        body = json.dumps({"member": self.id, "bye": bye, "partitions": self._partitions}).encode()
        properties = Properties(content_type="application/json", delivery_mode=1)
        await self._outbox.publish(
            body, exchange=self._exchange, routing_key="", properties=properties, mandatory=False
        )

    async def _heard(self, delivery: Delivery) -> None:
        assert self._inbox is not None
        with contextlib.suppress(TransportError):
            await self._inbox.ack(delivery.delivery_tag)
        try:
            data = json.loads(delivery.body)
            member, bye = str(data["member"]), bool(data.get("bye", False))
            count = data.get("partitions")
        except (ValueError, KeyError, TypeError, AttributeError):
            return  # not a heartbeat of ours
        if member == self.id:
            return
        if count is not None and self._partitions is not None and count != self._partitions:
            if member not in self._strangers:
                self._strangers.add(member)
                log.error(
                    "partitions of %s: replica %s has partitions=%r, this one %d; each group shares "
                    "only its own count's partitions (the single active consumer keeps each "
                    "partition with one consumer at a time); run one count",
                    self._exchange,
                    member,
                    count,
                    self._partitions,
                )
            return
        if bye:
            self._seen.pop(member, None)
        else:
            new = member not in self._seen
            self._seen[member] = asyncio.get_running_loop().time()
            if new:  # a newcomer learns of this replica now, not a heartbeat later
                task = asyncio.get_running_loop().create_task(self._answer())
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        self._update()

    async def _answer(self) -> None:
        with contextlib.suppress(TransportError):
            await self._beat()

    def _update(self) -> None:
        members = frozenset({self.id, *self._seen})
        if members != self.members:
            self.members = members
            self._on_change(members)


class Partition:
    """One partition this replica holds: its own channel, a prefetch of one."""

    def __init__(self, group: PartitionGroup, index: int) -> None:
        self.group = group
        self.index = index
        self.queue = names.partition_queue(group.spec.queue, index)
        self.channel: Channel | None = None
        self._handling: asyncio.Task[Any] | None = None
        self.handling_since: float | None = None  # loop time the message in hand arrived
        self.calling_since: float | None = None  # loop time its handler was called (None between attempts)
        self._releasing = False
        self.handled = 0

    async def acquire(self) -> None:
        channel = self.channel = await self.group.links.consume.channel()
        await channel.consume(self.queue, self._on_delivery, prefetch=1, on_cancel=self._cancelled)
        channel.on_close(self._closed)

    async def release(self, timeout: float) -> None:
        """Let the message in hand end (within `timeout`; then it is cancelled and comes back),
        then close the channel: whatever it still held returns to the head of the partition."""
        self._releasing = True
        handling = self._handling
        if handling is not None:
            _, pending = await asyncio.wait({handling}, timeout=timeout)
            if pending:
                log.warning(
                    "partition %s: its message still in hand after %.1fs; it goes back to the partition",
                    self.queue,
                    timeout,
                )
                handling.cancel()
                _, pending = await asyncio.wait({handling}, timeout=1.0)
                # A handler deaf to its cancellation still runs: closing the channel now would
                # hand its message to the next owner while it runs. The partition stays here
                # (health says stalled) until it returns: order before availability.
                while pending and not self.group.stopping:
                    log.error(
                        "partition %s: its handler ignores its cancellation; the partition stays "
                        "with this replica until the handler returns",
                        self.queue,
                    )
                    _, pending = await asyncio.wait({handling}, timeout=30.0)
        if self.channel is not None:
            with contextlib.suppress(TransportError):
                await self.channel.close()

    def abandon(self) -> None:
        self._releasing = True
        if self._handling is not None:
            self._handling.cancel()

    def _cancelled(self) -> None:
        if not self._releasing:
            self.group.lost(f"the broker cancelled the consumer of {self.queue}")

    def _closed(self, reason: BaseException | None) -> None:
        if not self._releasing:
            self.group.lost(f"the broker closed the channel of {self.queue} ({reason})")

    async def _on_delivery(self, delivery: Delivery) -> None:
        if self._releasing:
            return  # never started: the channel's close returns it first in line
        self._handling = asyncio.current_task()
        self.handling_since = asyncio.get_running_loop().time()
        try:
            async with self.group.slots:
                if self._releasing:
                    return
                await self.group.handle(self, delivery)
                self.handled += 1
        finally:
            self._handling = None
            self.handling_since = None


class PartitionGroup:
    """A partitioned consumer on this replica: its membership and the partitions it holds."""

    def __init__(
        self,
        spec: ConsumerSpec,
        *,
        service: str,
        links: Links,
        copies: Publisher,
        concurrency: int,
        handler_timeout: float | None,
        publish_timeout: float,
        release_timeout: float,
        on_lost: Callable[[BaseException | None], None],
        stall_after: float = STALL_AFTER,
        heartbeat: float = HEARTBEAT,
        onward: Publisher | None = None,
        middleware: tuple[Middleware, ...] = (),
        app: Any = None,
    ) -> None:
        assert spec.partitions is not None
        self.spec = spec
        self.links = links
        self.count = spec.partitions
        self._copies = copies
        self._dlx = names.dead_letter_exchange(service)
        self._parked = names.parked_queue(spec.queue)
        self._timeout = handler_timeout
        self._publish_timeout = publish_timeout
        self._release_timeout = release_timeout
        self._on_lost = on_lost
        self._stall_after = stall_after  # a handler called longer ago than this: stalled
        # This replica's handlers at once, over all its partitions: its share of the work.
        self.slots = asyncio.Semaphore(concurrency)
        # The handler is called as a plain consumer's; `Message.queue` is the consumer's queue as
        # declared (not the partition's), as middleware, the inbox and the log fields name it.
        self._invocation = Invocation(
            spec,
            app=app,
            middleware=middleware,
            onward=onward,
            publish_timeout=publish_timeout,
            threads=threads_for(spec, concurrency),
        )
        self.membership = Membership(
            spec.queue, links, interval=heartbeat, on_change=self._rebalance, partitions=spec.partitions
        )
        self.held: dict[int, Partition] = {}
        self._mine: set[int] = set()
        self._locks = [asyncio.Lock() for _ in range(self.count)]
        self._moves: set[asyncio.Task[None]] = set()
        self._stopping = False
        self._misrouted: set[int] = set()
        # The crash journal of `run --workers` (RABBITFLOW_CRASH_JOURNAL): the process's one.
        self._quarantine = quarantine_from_env()

    @property
    def id(self) -> str:
        return self.membership.id

    @property
    def stopping(self) -> bool:
        return self._stopping

    async def start(self) -> None:
        await self.membership.start()
        self._rebalance(self.membership.members)

    async def stop(self, timeout: float) -> None:
        self._stopping = True
        await self.membership.stop()
        # Never cancel a move halfway: a cancelled basic.consume makes aiormq close the channel
        # in a way that costs the whole connection. A move stops at its next step.
        await asyncio.gather(*self._moves, return_exceptions=True)
        await asyncio.gather(*(p.release(timeout) for p in self.held.values()))
        self.held.clear()

    async def abandon(self) -> None:
        self._stopping = True
        self.membership.abandon()
        for move in list(self._moves):
            move.cancel()
        for held in self.held.values():
            held.abandon()

    def lost(self, why: str) -> None:
        if not self._stopping:
            log.error("%s; reconnecting", why)
            self._on_lost(None)

    def health(self) -> dict[str, Any]:
        """What `app.health()` says of this partitioned consumer on this replica."""
        now = asyncio.get_running_loop().time()
        held = [self.held[i] for i in sorted(self.held)]
        subscribed = all(p.channel is not None and p.channel.is_open for p in held)
        in_hand = [now - p.handling_since for p in held if p.handling_since is not None]
        # Stalled: a handler called longer ago than the bound and not returned (waiting out a
        # retry's delay in place is no stall: the partition is where its policy wants it).
        calls = [now - p.calling_since for p in held if p.calling_since is not None]
        stalled = bool(calls) and max(calls) > self._stall_after
        return {
            "queue": self.spec.queue,
            "partitions": self.count,
            "replicas": len(self.membership.members),
            "held": [p.index for p in held],
            "assigned": sorted(self._mine),
            "subscribed": subscribed,
            "in_flight": len(in_hand),
            "oldest_in_hand_age": round(max(in_hand), 3) if in_hand else None,
            "handled": sum(p.handled for p in held),
            "oldest_call_age": round(max(calls), 3) if calls else None,
            "stalled": stalled,
            "stall_after": self._stall_after,
            "healthy": subscribed and not self._stopping and not stalled,
        }

    async def settled(self) -> None:
        """Until every move under way (taking or giving up a partition) is done."""
        while self._moves:
            await asyncio.gather(*self._moves, return_exceptions=True)

    def _rebalance(self, members: frozenset[str]) -> None:
        owners = assign(members, self.count)
        self._mine = {index for index, member in owners.items() if member == self.id}
        log.info(
            "partitions of %s: %d replica(s); this one (%s) takes %s",
            self.spec.queue,
            len(members),
            self.id,
            sorted(self._mine),
        )
        for index in range(self.count):
            if (index in self._mine) != (index in self.held) and not self._locks[index].locked():
                move = asyncio.get_running_loop().create_task(self._move(index))
                self._moves.add(move)
                move.add_done_callback(self._moves.discard)

    async def _move(self, index: int) -> None:
        """Take or give up partition `index` until this replica holds it exactly when the latest
        assignment says so (it may change while a move is under way), one move at a time."""
        async with self._locks[index]:
            while not self._stopping and (index in self._mine) != (index in self.held):
                held = self.held.get(index)
                if held is not None:
                    await held.release(self._release_timeout)  # still held (in health) meanwhile
                    self.held.pop(index, None)
                    continue
                taken = Partition(self, index)
                try:
                    await taken.acquire()
                except TransportError as exc:
                    self.lost(f"cannot consume {taken.queue}: {exc}")
                    return
                self.held[index] = taken

    # -- one message ---------------------------------------------------------------------------

    async def handle(self, partition: Partition, delivery: Delivery) -> None:
        """Call the handler until it succeeds or the policy gives up, holding the partition;
        ack, or park then ack. In the crash journal (`run --workers`) as a plain consumer's
        handler is: a message that was running when its worker died runs alone, and one that
        killed its worker while running alone is parked (`worker-crash`), its neighbours not."""
        quarantine = self._quarantine
        if quarantine is None:
            await self._handle(partition, delivery)
            return
        key = delivery_key(partition.queue, delivery)
        alone = False
        if delivery.redelivered:
            convictions, alone = quarantine.verdict(key)
            if convictions >= quarantine.convictions:
                log.warning(
                    "partition %s: message %s killed the worker process %d time(s) while running "
                    "alone; parking it (worker-crash)",
                    partition.queue,
                    delivery.properties.message_id or "-",
                    convictions,
                )
                message = self._invocation.received(delivery, delivery.properties.headers or {}, 1)
                await self._park(partition, delivery, "worker-crash", 1, None, message)
                return
        async with quarantine.running(key, alone=alone):
            if alone:
                log.warning(
                    "partition %s: message %s was running when a worker died; running it alone",
                    partition.queue,
                    delivery.properties.message_id or "-",
                )
            await self._handle(partition, delivery)

    async def _handle(self, partition: Partition, delivery: Delivery) -> None:
        invocation = self._invocation
        headers = delivery.properties.headers or {}
        if self._expired(partition, delivery, headers, 1):
            await self._settle(partition, delivery)
            return
        message = invocation.received(delivery, headers, 1)
        try:
            if delivery.undecodable is not None:
                raise DecodeError(f"its properties: {delivery.undecodable}")
            body = self.spec.signature.read(delivery.body, delivery.properties.content_type)
        except DecodeError as exc:
            await self._park(partition, delivery, "decode-error", 1, exc, message)
            return
        if delivery.redelivered and copies.delivery_count(headers) >= PARK_AFTER_DELIVERIES:
            await self._park(partition, delivery, "delivery-limit", 1, None, message)
            return
        self._check_key(partition, body)
        await self._attempts(partition, delivery, body, headers, message)

    async def _attempts(
        self,
        partition: Partition,
        delivery: Delivery,
        body: Any,
        headers: Mapping[str, Any],
        message: Message | None,
    ) -> None:
        """Attempt after attempt in place, each one a delivery of its own to middleware."""
        invocation = self._invocation
        attempt = 1
        while True:
            partition.calling_since = asyncio.get_running_loop().time()
            try:
                result = await self._attempt(delivery, body, headers, attempt, message)
            except BaseException as exc:
                partition.calling_since = None
                task = asyncio.current_task()
                if isinstance(exc, asyncio.CancelledError) and task is not None and task.cancelling():
                    raise  # a release or a lost session: the message goes back to the partition
                invocation.failed(attempt, exc)
                decision = decide(self.spec.policy, attempt, exc)
                retry = decision.action is Action.RETRY
                log.log(
                    logging.INFO if retry else logging.WARNING,
                    "partition %s: message %s attempt %d failed with %s: %s; %s",
                    partition.queue,
                    delivery.properties.message_id or "-",
                    attempt,
                    type(exc).__name__,
                    copies.describe(exc)[:200],
                    f"retrying in place in {decision.delay}s" if retry else f"parking it ({decision.reason})",
                )
                if not retry:
                    await self._park(partition, delivery, decision.reason, attempt, exc, message)
                    return
                invocation.settled(message, Fate.RETRIED, exc, delay=decision.delay)
                await asyncio.sleep(decision.delay)  # the partition waits: its order holds
                attempt += 1
                if self._expired(partition, delivery, headers, attempt):
                    await self._settle(partition, delivery)
                    return
                message = invocation.received(delivery, headers, attempt)
                continue
            partition.calling_since = None
            # Before the ack, which lets the partition's next message in: its fate is decided.
            invocation.settled(message, Fate.DUPLICATE if result is DUPLICATE else Fate.HANDLED)
            await self._settle(partition, delivery)
            return

    async def _attempt(
        self,
        delivery: Delivery,
        body: Any,
        headers: Mapping[str, Any],
        attempt: int,
        message: Message | None,
    ) -> Any:
        invocation = self._invocation
        if self._timeout is None:
            return await invocation.call(delivery, body, headers, attempt, message)
        scope = asyncio.timeout(self._timeout)
        try:
            async with scope:
                return await invocation.call(delivery, body, headers, attempt, message)
        except BaseException as exc:
            task = asyncio.current_task()
            ours = isinstance(exc, asyncio.CancelledError) and task is not None and task.cancelling()
            if scope.expired() and not ours:
                why = f"handler still running after its handler_timeout of {self._timeout}s"
                raise TimeoutError(why) from None
            raise

    def _expired(
        self, partition: Partition, delivery: Delivery, headers: Mapping[str, Any], attempt: int
    ) -> bool:
        """A request whose caller has given up (its deadline is past): nobody would read the
        answer, so it is acked without calling the handler."""
        if not headers or names.DEADLINE not in headers or not expired(headers):
            return False
        log.info(
            "partition %s: request %s expired before its attempt %d (its caller gave up); dropping it",
            partition.queue,
            delivery.properties.message_id or "-",
            attempt,
        )
        return True

    async def _settle(self, partition: Partition, delivery: Delivery) -> None:
        channel = partition.channel
        assert channel is not None
        with contextlib.suppress(TransportError):  # a lost channel returns it: a duplicate, not a loss
            await channel.ack(delivery.delivery_tag)

    async def _park(
        self,
        partition: Partition,
        delivery: Delivery,
        reason: str,
        attempt: int,
        exc: BaseException | None,
        message: Message | None,
    ) -> None:
        """The parked copy, confirmed, then the ack; a copy the broker does not take in time is
        rejected instead, and the partition queue dead-letters it to the same parking queue."""
        self._invocation.settled(message, Fate.PARKED, exc, reason=reason)
        self._invocation.refused(delivery, reason, exc)  # the caller learns it now, not at its timeout
        channel = partition.channel
        assert channel is not None
        if delivery.undecodable is None:
            headers = copies.park_headers(delivery, reason, attempt, partition.queue, exc)
            properties = persistent_copy(delivery.properties, headers)
            try:
                async with asyncio.timeout(self._publish_timeout):
                    await self._copies.publish(delivery.body, self._dlx, self._parked, properties)
            except (TransportError, TimeoutError) as failure:
                log.error(
                    "partition %s: parked copy not confirmed (%s); rejecting it", partition.queue, failure
                )
            else:
                await self._settle(partition, delivery)
                return
        with contextlib.suppress(TransportError):
            await channel.reject(delivery.delivery_tag, requeue=False)

    def _check_key(self, partition: Partition, body: Any) -> None:
        """A message whose key belongs to another partition (a producer with another hash rule)
        is handled, but its order with its key's other messages is not kept: say so once."""
        key_of = self.spec.partition_key
        if key_of is None or partition.index in self._misrouted:
            return
        try:
            key = key_of(body)
            expected = names.partition_of(key, self.count)  # type: ignore[arg-type]
        except Exception:
            return
        if expected != partition.index:
            self._misrouted.add(partition.index)
            log.warning(
                "partition %s: a message with key %r belongs to partition %d (crc32 %% %d); its "
                "producer routes by another rule, so that key's order is not kept",
                partition.queue,
                key,
                expected,
                self.count,
            )
