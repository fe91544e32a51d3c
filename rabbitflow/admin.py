"""Operator work on a service's topology and parking queues, on a connection of its own.

Used by `App.declare/check/parked/replay` and by the CLI (`list_parked`, `show_parked`,
`replay_parked`, `purge_parked` back `rabbitflow parked list|show|replay|purge`); it works whether or not the
service runs, from any machine that reaches the broker.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from rabbitflow import names
from rabbitflow.errors import ChannelClosed, ConfigError
from rabbitflow.parking import walk as parking
from rabbitflow.parking.message import Filter, Listing, ParkedMessage, WalkResult
from rabbitflow.parking.walk import Progress
from rabbitflow.topology.applier import Difference, apply_plan, check_plan
from rabbitflow.topology.compiler import Plan
from rabbitflow.topology.versions import concerns
from rabbitflow.transport.base import Transport
from rabbitflow.transport.connection import ConnectionManager
from rabbitflow.urls import mask

__all__ = ["Admin", "BindingReport", "Inspection", "Removal", "compare_bindings", "read_management"]

log = logging.getLogger("rabbitflow.admin")


@dataclass(frozen=True, slots=True)
class Removal:
    """What `Admin.removal` found and did (or, in a dry run, would do)."""

    deleted: list[str]  # the service's objects that existed (nothing when refused)
    missing: list[str]  # already gone
    holding: list[str]  # "QUEUE (N)": queues that hold messages
    refused: bool  # queues hold messages and it was not forced: nothing deleted


@dataclass(frozen=True, slots=True)
class BindingReport:
    """The plan's bindings and consumers against the management API's view; `note` says why they
    could not be compared (then `compared` is False)."""

    compared: bool
    differences: list[str] = field(default_factory=list)
    note: str = ""


def compare_bindings(
    plan: Plan, bindings: Iterable[Mapping[str, Any]], consumers: Iterable[Mapping[str, Any]] = ()
) -> list[str]:
    """What the broker's bindings and consumers (the management API's `/api/bindings/VHOST` and
    `/api/consumers/VHOST` lists) say against the plan: bindings of the plan that are missing, and
    on the plan's queues bindings or consumers the plan does not have — another app sharing a
    queue. Pure: no I/O."""
    ours = {q.name for q in plan.queues}
    wanted = {(b.exchange, b.queue, b.routing_key) for b in plan.bindings if b.exchange}
    live = {
        (str(b.get("source", "")), str(b.get("destination", "")), str(b.get("routing_key", "")))
        for b in bindings
        if b.get("destination_type", "queue") == "queue" and b.get("source")  # "": the default exchange
    }
    differences = [f"binding {e} --[{k}]--> {q}: missing" for e, q, k in sorted(wanted - live)]
    differences += [
        f"binding {e} --[{k}]--> {q}: on the broker but not in the plan: does another app share queue {q}?"
        for e, q, k in sorted(live - wanted)
        if q in ours
    ]
    prefix = f"{plan.service}:"  # rabbitflow names its connections SERVICE:ROLE
    foreign: dict[str, set[str]] = {}
    for consumer in consumers:
        queue = str((consumer.get("queue") or {}).get("name", ""))
        connection = str((consumer.get("channel_details") or {}).get("connection_name") or "")
        if queue in ours and not connection.startswith(prefix):
            foreign.setdefault(queue, set()).add(connection or "a connection without a name")
    differences += [
        f"queue {queue}: consumed by {', '.join(sorted(who))}, not by service {plan.service!r}: "
        "does another app share this queue?"
        for queue, who in sorted(foreign.items())
    ]
    return differences


def read_management(url: str, vhost: str, *, timeout: float = 5.0) -> tuple[list[Any], list[Any]]:
    """The bindings and consumers of `vhost` from the management API at `url`
    (`http://user:password@host:15672`); blocking. Raises ConnectionError saying what failed."""
    parts = urllib.parse.urlsplit(url)
    port = f":{parts.port}" if parts.port else ""
    base = f"{parts.scheme}://{parts.hostname}{port}{parts.path.rstrip('/')}"
    user = urllib.parse.unquote(parts.username or "guest")
    password = urllib.parse.unquote(parts.password or "guest")
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    quoted = urllib.parse.quote(vhost, safe="")
    found = []
    for what in ("bindings", "consumers"):
        request = urllib.request.Request(
            f"{base}/api/{what}/{quoted}", headers={"Authorization": f"Basic {token}"}
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                found.append(json.loads(response.read()))
        except urllib.error.HTTPError as exc:
            why = "refused the login" if exc.code == 401 else f"answered {exc.code} {exc.reason}"
            raise ConnectionError(f"the management API at {base} {why}") from None
        except (OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ConnectionError(f"management API not reachable at {base} ({reason})") from None
    return found[0], found[1]


@dataclass(frozen=True, slots=True)
class Inspection:
    node: str
    server_version: str
    differences: list[Difference]
    concerns: list[str]


class Admin:
    """What an operator does to one service's objects; each call opens and closes a connection."""

    def __init__(self, plan: Plan, manager: ConnectionManager, *, budget: float) -> None:
        self.plan = plan
        self._manager = manager
        self.budget = budget

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[Transport]:
        """A connection of its own, to the first node that accepts."""
        transport = await self._manager.connect(self.budget)
        try:
            yield transport
        finally:
            await transport.close()

    def _consumed(self, queue: str) -> str:
        """`queue` as the consumer's queue; its parking queue's name is accepted too."""
        consumed = {c.queue for c in self.plan.consumers}
        if queue not in consumed and queue.endswith(".parked") and queue[: -len(".parked")] in consumed:
            return queue[: -len(".parked")]
        if queue not in consumed:
            known = ", ".join(sorted(consumed)) or "none"
            raise ConfigError(
                f"queue {queue!r} has no consumer in service {self.plan.service!r} (its queues: {known})"
            )
        return queue

    async def declare(self) -> str:
        """Declare the plan without consuming; returns the node."""
        async with self.connection() as transport:
            await apply_plan(self.plan, transport)
            return transport.node

    async def check(self) -> tuple[str, list[Difference]]:
        """Compare the plan with a live node, changing nothing; returns the node and the differences."""
        report = await self.inspect()
        return report.node, report.differences

    async def inspect(self) -> Inspection:
        """`check`, plus the node's RabbitMQ version and what the plan relies on that this
        version does not do or does differently (`compat.concerns`)."""
        async with self.connection() as transport:
            differences = await check_plan(self.plan, transport)
            version = transport.server_version
        return Inspection(
            transport.node, version, differences, concerns(self.plan, version) if version else []
        )

    async def check_bindings(self, management_url: str, vhost: str) -> BindingReport:
        """Compare the plan's bindings (and the consumers of its queues) with what the management
        API at `management_url` reports; AMQP cannot read bindings."""
        try:
            bindings, consumers = await asyncio.to_thread(read_management, management_url, vhost)
        except ConnectionError as exc:
            return BindingReport(False, note=f"could not compare bindings: {mask(str(exc))}")
        return BindingReport(True, compare_bindings(self.plan, bindings, consumers))

    def _rotates(self, queue: str) -> bool:
        """Whether `queue`'s parking queue is a quorum queue, which counts every return of a
        message as a delivery: a walk over it republishes the messages it keeps (parking.py)."""
        parked = names.parked_queue(queue)
        return any(q.name == parked and q.arguments.get("x-queue-type") == "quorum" for q in self.plan.queues)

    async def list_parked(
        self,
        queue: str,
        *,
        filter: Filter | None = None,
        limit: int = 20,
        progress: Progress | None = None,
    ) -> Listing:
        """The messages parked for the consumer of `queue` (or its `.parked` name) that match
        `filter`, grouped by reason and exception type, and the first `limit` of them. Looking
        any number of times drops and reorders none of them."""
        queue = self._consumed(queue)
        async with self.connection() as transport:
            return await parking.look(
                transport, queue, filter=filter, limit=limit, rotate=self._rotates(queue), progress=progress
            )

    async def show_parked(self, queue: str, *, filter: Filter | None = None) -> ParkedMessage | None:
        """The first parked message of `queue` that matches `filter` (by id: `Filter(message_id=)`),
        the head without one; None when there is none. It stays parked."""
        queue = self._consumed(queue)
        async with self.connection() as transport:
            return await parking.find(transport, queue, filter=filter, rotate=self._rotates(queue))

    async def replay_parked(
        self,
        queue: str,
        *,
        filter: Filter | None = None,
        limit: int | None = None,
        dry_run: bool = False,
        progress: Progress | None = None,
    ) -> WalkResult:
        """Send at most `limit` parked messages of `queue` that match `filter` back to `queue`
        (only to it), from those parked when it began; each leaves the parking queue only once
        its copy is confirmed, and the others stay parked in their order."""
        queue = self._consumed(queue)
        async with self.connection() as transport:
            return await parking.replay(
                transport,
                queue,
                limit,
                filter=filter,
                dry_run=dry_run,
                rotate=self._rotates(queue),
                progress=progress,
            )

    async def purge_parked(
        self,
        queue: str,
        *,
        filter: Filter | None = None,
        limit: int | None = None,
        dry_run: bool = False,
        progress: Progress | None = None,
    ) -> WalkResult:
        """Delete at most `limit` parked messages of `queue` that match `filter`, from those
        parked when it began; the others stay parked, unchanged and in their order."""
        queue = self._consumed(queue)
        async with self.connection() as transport:
            return await parking.purge(
                transport,
                queue,
                limit,
                filter=filter,
                dry_run=dry_run,
                rotate=self._rotates(queue),
                progress=progress,
            )

    async def parked(self, queue: str, *, limit: int = 100) -> list[ParkedMessage]:
        """Up to `limit` messages parked for the consumer of `queue`, head first; they stay parked."""
        queue = self._consumed(queue)
        async with self.connection() as transport:
            return await parking.peek(transport, queue, limit, rotate=self._rotates(queue))

    async def delete(self, *, force: bool = False) -> list[str]:
        """Delete the service's queues and its own exchange (`<service>.dlx`; exchanges its
        consumers bind to may be shared, and stay). Refuses (ConfigError, deleting nothing) while a
        queue holds messages, unless `force`. Returns what was deleted: objects already gone are
        not in it."""
        removal = await self.removal(force=force)
        if removal.refused:
            raise ConfigError(
                f"not deleting service {self.plan.service!r}: queues hold messages: "
                f"{', '.join(removal.holding)}; consume or purge them first, or force it"
            )
        return removal.deleted

    async def removal(self, *, force: bool = False, dry_run: bool = False) -> Removal:
        """What `delete` finds on the broker — which of the service's objects exist, which queues
        hold messages — and, unless `dry_run` or refused, deletes them. A dry run answers with
        the same `deleted` and `refused` the real run would have."""
        own = names.dead_letter_exchange(self.plan.service)
        async with self.connection() as transport:
            channel = await transport.channel()
            try:
                present, missing, holding = [], [], []
                for queue in self.plan.queues:
                    try:
                        info = await channel.declare_queue(queue.name, passive=True)
                    except ChannelClosed:
                        channel = await transport.channel()  # a 404 closes the channel: not there
                        missing.append(queue.name)
                        continue
                    present.append(queue.name)
                    if info.message_count:
                        holding.append(f"{queue.name} ({info.message_count})")
                try:
                    await channel.declare_exchange(own, "direct", passive=True)
                    present.append(own)
                except ChannelClosed:
                    channel = await transport.channel()
                    missing.append(own)
                refused = bool(holding) and not force
                deleted = [] if refused else present
                if not (dry_run or refused):
                    for name in present:
                        if name == own:
                            await channel.delete_exchange(own)
                        else:
                            await channel.delete_queue(name)
            finally:
                await channel.close()
        return Removal(deleted, missing, holding, refused)
