"""Ordered partitions under attack, on the real 3.10 broker: a handler that kills its worker, one
that swallows its cancellation, one that never ends, replicas that disagree on the partition
count, forged heartbeats, foreign producers and `publish(key=...)` edge cases. Each test asks
what happens to the OTHER messages, partitions and replicas too.

Seven of these found bugs (each failed before its fix): the killer's neighbours parked and the
supervisor's backoff growing (no crash journal for partitions), a handler deaf to its
cancellation running beside the partition's next owner, a stuck partition looking healthy,
replicas with two partition counts leaving partitions unconsumed, a bool key's bare TypeError,
two counts behind one exchange. The others pin behaviour worth keeping.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiormq
import pytest

from rabbitflow import App, ConfigError, Message, Unroutable, partition
from rabbitflow.runtime.partitions import PartitionGroup

from ..helpers import Admin, unique, wait_for

ROOT = Path(__file__).resolve().parents[2]
KILLER = "tests.runtime.partition_killer"


def _groups(app: App) -> list[PartitionGroup]:
    runtime = app._runtime
    assert runtime is not None
    assert runtime.session is not None
    return runtime.session.partitioned


def _held(app: App) -> list[int]:
    return sorted(_groups(app)[0].held)


def _lines(path: Path, word: str) -> list[list[str]]:
    if not path.exists():
        return []
    return [line.split() for line in path.read_text().splitlines() if line.startswith(word + " ")]


class _Processes:
    """Processes started in a session of their own, killed with their group when the test ends."""

    def __init__(self) -> None:
        self.started: list[subprocess.Popen[Any]] = []

    def start(self, command: list[str], **options: Any) -> subprocess.Popen[Any]:
        process = subprocess.Popen(command, start_new_session=True, cwd=ROOT, **options)
        self.started.append(process)
        return process

    def kill_all(self) -> None:
        for process in self.started:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(10)


@pytest.fixture
def processes() -> Iterator[_Processes]:
    started = _Processes()
    try:
        yield started
    finally:
        started.kill_all()


def _killer_plan(admin: Admin, service: str, queue: str, partitions: int) -> None:
    """Delete after the test what partition_killer.py declares."""
    planner = App(service, url="memory://")

    @planner.consumer(queue, partitions=partitions)
    async def handle(body: Any) -> None: ...

    admin.forget_app(planner)


async def _wait_consumed(admin: Admin, queue: str, partitions: int, timeout: float = 30) -> None:
    """Until every partition queue of `queue` has a consumer (its bindings are there)."""
    async with asyncio.timeout(timeout):
        for index in range(partitions):
            while True:
                try:
                    ok = await admin.channel.queue_declare(f"{queue}.p{index}", passive=True)
                except aiormq.exceptions.ChannelClosed:
                    admin.channel = await admin.channel.connection.channel()
                else:
                    if ok.consumer_count:
                        break
                await asyncio.sleep(0.1)


async def _publish_event(admin: Admin, exchange: str, routing_key: str, event: dict[str, Any]) -> None:
    await admin.publish(
        json.dumps(event).encode(),
        exchange=exchange,
        routing_key=routing_key,
        content_type="application/json",
        delivery_mode=2,
        message_id=str(event["name"]),
    )


# -- a handler that kills its worker ------------------------------------------------------------


async def test_a_partition_handler_that_kills_its_worker_is_parked_alone_and_its_neighbour_is_not(
    broker_url: str, admin: Admin, tmp_path: Path, processes: _Processes
) -> None:
    """One replica (as `rabbitflow run --workers 1` runs it, but restarted at once, as a container
    orchestrator would, so that the supervisor's backoff plays no part), 2 partitions: the poison in
    p0 kills the process 0.3 s in, while the neighbour in p1 (2 s long) is in hand at every death."""
    service, queue = unique("svc"), unique("pkill")
    _killer_plan(admin, service, queue, 2)
    log = tmp_path / "handled.log"
    env = {
        **os.environ,
        "RF_SERVICE": service,
        "RF_QUEUE": queue,
        "RF_PARTITIONS": "2",
        "RF_LOG": str(log),
        "RABBITFLOW_URL": broker_url,
        # What `rabbitflow run --workers N` gives its workers: the crash journal.
        "RABBITFLOW_CRASH_JOURNAL": str(tmp_path / "journal"),
    }
    command = [sys.executable, "-m", KILLER]
    worker = processes.start(command, env=env)
    await _wait_consumed(admin, queue, 2)
    await _publish_event(admin, queue, "0", {"name": "poison", "poison": True, "pause": 0.3})
    await _publish_event(admin, queue, "1", {"name": "neighbour", "pause": 2})
    deaths = 0
    async with asyncio.timeout(100):
        while deaths < 12:
            try:
                code = await asyncio.wait_for(asyncio.to_thread(worker.wait), 8)
            except TimeoutError:
                break  # alive for 8 s: nothing kills it any more
            assert code != 0
            deaths += 1
            worker = processes.start(command, env=env)
        # Until the neighbour is handled, or parked beside the killer.
        while not _lines(log, "done") and await admin.count(f"{queue}.parked") < 2:  # noqa: ASYNC110
            await asyncio.sleep(0.1)
    parked = await admin.drain(f"{queue}.parked")
    reasons = {m.body: (m.header.properties.headers or {}).get("x-rf-reason") for m in parked}
    starts = [line[3] for line in _lines(log, "start") if line[1] == "neighbour"]
    print(f"\n{deaths} deaths; neighbour's delivery counts at its starts: {starts}; parked: {reasons}")
    # The neighbour: handled, never parked.
    assert [line[1] for line in _lines(log, "done")] == ["neighbour"]
    assert all(b"neighbour" not in body for body in reasons)
    # The killer: parked alone, saying why, within 3 deaths (as a plain consumer's is).
    assert list(reasons.values()) == ["worker-crash"]
    assert deaths <= 3


async def test_rabbitflow_run_restarts_a_worker_killed_by_a_partition_handler_after_1_s_every_time(
    broker_url: str, admin: Admin, tmp_path: Path, processes: _Processes
) -> None:
    service, queue = unique("svc"), unique("pkill")
    _killer_plan(admin, service, queue, 2)
    log, out = tmp_path / "handled.log", tmp_path / "run.out"
    env = {
        **os.environ,
        "RF_SERVICE": service,
        "RF_QUEUE": queue,
        "RF_PARTITIONS": "2",
        "RF_LOG": str(log),
        "RABBITFLOW_URL": broker_url,
    }
    env.pop("RABBITFLOW_CRASH_JOURNAL", None)
    run = [sys.executable, "-m", "rabbitflow", "run", f"{KILLER}:app", "--workers", "2"]
    with out.open("w") as output:
        supervisor = processes.start(run, env=env, stdout=output, stderr=subprocess.STDOUT)
    await _wait_consumed(admin, queue, 2)
    await _publish_event(admin, queue, "0", {"name": "poison", "poison": True, "pause": 0.3})
    await _publish_event(admin, queue, "1", {"name": "neighbour", "pause": 2})
    async with asyncio.timeout(60):  # each worker takes the poison's partition in turn, and dies
        while len(_lines(log, "kill")) < 3:  # noqa: ASYNC110 - the workers write it
            await asyncio.sleep(0.1)
    supervisor.send_signal(signal.SIGTERM)
    await asyncio.to_thread(supervisor.wait, 20)
    text = out.read_text()
    died = [line for line in text.splitlines() if " died " in line]
    print("\n" + "\n".join(died))
    assert len(died) >= 2, text
    assert all("starting it again in 1 s" in line for line in died), text


# -- a handler that swallows its cancellation / never ends --------------------------------------


async def _swallowing_cancellation(seconds: float) -> None:
    """`seconds` of work in a retry loop under a bare `except:`: every cancellation swallowed."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(0.05)


async def test_a_released_partitions_handler_that_swallows_cancellation_never_runs_beside_its_next_owner(
    broker_url: str, admin: Admin
) -> None:
    """A handler with a retry loop under a bare `except:` swallows CancelledError. Replica A holds
    both partitions, each with a message in such a handler; replica B joins and takes one of them.
    Per-key order means one call of a key at a time, across replicas."""
    service, queue = unique("svc"), unique("part")
    running: collections.Counter[str] = collections.Counter()
    overlaps: list[str] = []
    calls: list[str] = []

    async def handle(event: dict[str, Any]) -> None:
        name = event["name"]
        calls.append(name)
        running[name] += 1
        if running[name] > 1:
            overlaps.append(name)
        try:
            await _swallowing_cancellation(5)
        finally:
            running[name] -= 1

    apps = []
    for _ in range(2):
        app = App(service, url=broker_url, graceful_timeout=1)
        app.consumer(queue, partitions=2, retries=0)(handle)
        apps.append(app)
    admin.forget_app(apps[0])
    a, b = apps
    await a.start()
    try:
        await wait_for(lambda: _held(a) == [0, 1])
        await a.publish({"name": "m0"}, exchange=queue, routing_key="0")
        await a.publish({"name": "m1"}, exchange=queue, routing_key="1")
        await wait_for(lambda: sorted(calls) == ["m0", "m1"])
        await b.start()
        await wait_for(lambda: len(_held(b)) == 1 and len(_held(a)) == 1, timeout=15)
        moved = f"m{_held(b)[0]}"
        await wait_for(lambda: calls.count(moved) == 2 or not running[moved], timeout=10)
        print(f"\ncalls {calls}; overlaps {overlaps}")
        assert overlaps == []
    finally:
        await asyncio.gather(a.stop(), b.stop())
        await wait_for(lambda: not +running, timeout=15)  # the swallowing calls end by themselves


async def test_a_partition_that_never_settles_its_message_is_not_healthy_for_ever(
    broker_url: str, admin: Admin
) -> None:
    """handler_timeout=0.5 s (stall_after: 2 s for a plain consumer); the handler ignores the
    timeout's cancellation and runs 6 s. After 4 s in hand its replica should not look healthy."""
    service, queue = unique("svc"), unique("part")
    app = App(service, url=broker_url, graceful_timeout=1, handler_timeout=0.5)
    running: list[str] = []

    @app.consumer(queue, partitions=2, retries=0)
    async def handle(event: dict[str, Any]) -> None:
        running.append(event["name"])
        try:
            await _swallowing_cancellation(6)
        finally:
            running.remove(event["name"])

    admin.forget_app(app)
    async with app:
        await wait_for(lambda: _held(app) == [0, 1])
        await app.publish({"name": "stuck"}, exchange=queue, routing_key="0")
        await wait_for(lambda: running == ["stuck"])
        await asyncio.sleep(4)
        share = app.health()["partitioned"][0]
        print(f"\nafter 4 s in hand: {share}")
        assert share["oldest_in_hand_age"] > 3  # it knows
        healthy = app.health()["healthy"]
        await wait_for(lambda: not running, timeout=10)
    assert healthy is False


# -- membership ---------------------------------------------------------------------------------


async def test_replicas_that_disagree_on_the_partition_count_leave_no_partition_unconsumed(
    broker_url: str, admin: Admin
) -> None:
    """As in a rolling deploy that changes partitions=2 to 4: old and new replicas run together."""
    service, queue = unique("svc"), unique("part")
    handled: list[str] = []

    async def handle(event: dict[str, Any]) -> None:
        handled.append(event["name"])

    old = App(service, url=broker_url, graceful_timeout=1)
    old.consumer(queue, partitions=2)(handle)
    new = App(service, url=broker_url, graceful_timeout=1)
    new.consumer(queue, partitions=4)(handle)
    admin.forget_app(new)
    await old.start()
    try:
        await new.start()
        await asyncio.sleep(3)  # they hear each other and settle
        print(f"\nold holds {_held(old)}, new holds {_held(new)}")
        for index in range(4):
            await new.publish({"name": f"p{index}"}, exchange=queue, routing_key=str(index))
        with contextlib.suppress(TimeoutError):
            await wait_for(lambda: len(handled) == 4, timeout=8)
        assert sorted(handled) == ["p0", "p1", "p2", "p3"]
    finally:
        await asyncio.gather(old.stop(), new.stop())


async def test_six_replicas_starting_at_once_share_every_partition_once(
    broker_url: str, admin: Admin
) -> None:
    """Six replicas of 12 partitions start together (each a newcomer to all the others): they
    settle on 2 partitions each, none held twice, and every partition's message is handled once."""
    service, queue = unique("svc"), unique("part")
    handled: list[str] = []

    async def handle(event: dict[str, Any]) -> None:
        handled.append(event["name"])

    apps = []
    for _ in range(6):
        app = App(service, url=broker_url, graceful_timeout=1)
        app.consumer(queue, partitions=12)(handle)
        apps.append(app)
    admin.forget_app(apps[0])
    await asyncio.gather(*(app.start() for app in apps))
    try:
        await wait_for(lambda: sorted(len(_held(app)) for app in apps) == [2] * 6, timeout=15)
        held = [p for app in apps for p in _held(app)]
        assert sorted(held) == list(range(12))
        assert all(app.health()["partitioned"][0]["replicas"] == 6 for app in apps)
        for index in range(12):
            await apps[0].publish({"name": f"p{index}"}, exchange=queue, routing_key=str(index))
        await wait_for(lambda: len(handled) == 12)
        await asyncio.sleep(0.3)
        assert sorted(handled) == sorted(f"p{index}" for index in range(12))
    finally:
        await asyncio.gather(*(app.stop() for app in apps))


async def test_junk_on_the_members_exchange_neither_crashes_a_replica_nor_joins_the_group(
    broker_url: str, admin: Admin
) -> None:
    """A foreign publisher sends junk to Q.members: the replica keeps its partitions and its
    partitions keep flowing; a well-formed forged heartbeat does count as a replica for as long as
    it is repeated (anyone who may publish there can take a share: see the report), and its share
    flows again within MISSED heartbeats of its silence."""
    service, queue = unique("svc"), unique("part")
    handled: list[str] = []
    app = App(service, url=broker_url, graceful_timeout=1)

    @app.consumer(queue, partitions=4)
    async def handle(event: dict[str, Any]) -> None:
        handled.append(event["name"])

    admin.forget_app(app)
    members = f"{queue}.members"
    async with app:
        await wait_for(lambda: _held(app) == [0, 1, 2, 3])
        for junk in (
            b"",
            b"\xff\xfe not json",
            b"[1, 2]",
            b'"member"',
            b"17",
            b"{}",
            b'{"member": null, "bye": "yes"}',
            b'{"member": {"nested": [1]}}',
            json.dumps({"member": "x" * 200_000}).encode(),
            b"{" * 10_000,
        ):
            await admin.publish(junk, exchange=members, routing_key="")
        await asyncio.sleep(1.5)
        group = _groups(app)[0]
        print(f"\nafter junk: members {sorted(m[:20] for m in group.membership.members)}")
        # Junk that parses as {"member": ...} joins as a phantom for MISSED heartbeats; the group
        # goes back to this replica alone and it holds every partition again.
        await wait_for(lambda: len(group.membership.members) == 1 and _held(app) == [0, 1, 2, 3], timeout=10)
        for index in range(4):
            await app.publish({"name": f"p{index}"}, exchange=queue, routing_key=str(index))
        await wait_for(lambda: len(handled) == 4)
        # A forged heartbeat, repeated: a phantom replica with a share nobody consumes.
        forging = True

        async def forge() -> None:
            while forging:
                await admin.publish(b'{"member": "phantom"}', exchange=members, routing_key="")
                await asyncio.sleep(0.5)

        forger = asyncio.ensure_future(forge())
        try:
            await wait_for(lambda: len(_held(app)) == 2, timeout=10)
        finally:
            forging = False
            await forger
        await wait_for(lambda: _held(app) == [0, 1, 2, 3], timeout=10)


# -- foreign producers --------------------------------------------------------------------------


async def test_foreign_producers_junk_is_parked_or_handled_and_the_keys_order_goes_on(
    broker_url: str, admin: Admin
) -> None:
    """Into one partition: an undecodable body, a body whose partition_key raises, a key of
    another partition, a huge body, then the key's next events: each is parked or handled, the
    partition goes on in order, and the other partitions never wait."""
    service, queue = unique("svc"), unique("part")
    handled: list[str] = []
    app = App(service, url=broker_url, graceful_timeout=1)

    def key_of(event: dict[str, Any]) -> str:
        return str(event["order"])  # KeyError on a body without it

    @app.consumer(queue, partitions=4, partition_key=key_of, retries=0)
    async def handle(event: dict[str, Any], message: Message) -> None:
        handled.append(str(event.get("name")))

    admin.forget_app(app)
    async with app:
        await wait_for(lambda: _held(app) == [0, 1, 2, 3])
        key = "order-17"
        home = partition(key, 4)
        other = next(f"order-{n}" for n in range(100) if partition(f"order-{n}", 4) != home)
        json_props = {"content_type": "application/json", "delivery_mode": 2}
        await admin.publish(
            b'{"order": "order-17", "name": "first"}', exchange=queue, routing_key=home, **json_props
        )
        await admin.publish(b"{not json", exchange=queue, routing_key=home, message_id="bad", **json_props)
        await admin.publish(b'{"name": "keyless"}', exchange=queue, routing_key=home, **json_props)
        stranger = json.dumps({"order": other, "name": "stranger"}).encode()
        await admin.publish(stranger, exchange=queue, routing_key=home, **json_props)
        huge = json.dumps({"order": key, "name": "huge", "pad": "x" * 5_000_000}).encode()
        await admin.publish(huge, exchange=queue, routing_key=home, **json_props)
        await admin.publish(
            b'{"order": "order-17", "name": "last"}', exchange=queue, routing_key=home, **json_props
        )
        # Unroutable: a partition that does not exist, no routing key at all.
        await admin.publish(
            b'{"order": "x", "name": "nowhere"}', exchange=queue, routing_key="4", **json_props
        )
        await admin.publish(
            b'{"order": "x", "name": "nowhere"}', exchange=queue, routing_key="", **json_props
        )
        with pytest.raises(Unroutable):
            await app.publish({"order": "x", "name": "nowhere"}, exchange=queue, routing_key="4")
        await app.publish({"order": other, "name": "neighbour"}, exchange=queue)  # partition_key routes it
        await wait_for(lambda: "last" in handled and "neighbour" in handled, timeout=20)
        await asyncio.sleep(0.3)
        mine = [name for name in handled if name != "neighbour"]
        assert mine == ["first", "keyless", "stranger", "huge", "last"]
        parked = await admin.drain(f"{queue}.parked")
        assert [
            (m.header.properties.message_id, (m.header.properties.headers or {})["x-rf-reason"])
            for m in parked
        ] == [("bad", "decode-error")]
        assert "nowhere" not in handled


# -- publish(key=...) ----------------------------------------------------------------------------


async def test_publish_key_edge_cases_route_or_refuse_clearly() -> None:
    app = App("svc", url="memory://")

    @app.consumer("orders", partitions=4, partition_key=lambda event: event["id"])
    async def handle(event: dict[str, Any]) -> None: ...

    @app.consumer("plain")
    async def plain(event: dict[str, Any]) -> None: ...

    with pytest.raises(ConfigError, match="not both"):
        await app.publish({"id": "a"}, exchange="orders", key="a", routing_key="1")
    with pytest.raises(ConfigError, match="no partitioned consumer"):
        await app.publish({"id": "a"}, exchange="plain", key="a")
    with pytest.raises(ConfigError, match="str, bytes or int"):
        await app.publish({"id": 1.5}, exchange="orders")  # the partition_key gives a float
    # int and bytes keys route as their text does, so a str producer and an int one agree.
    assert partition(17, 4) == partition("17", 4) == partition(b"17", 4)
    assert partition(-3, 4) == partition("-3", 4)


async def test_a_bool_partition_key_is_refused_with_a_config_error() -> None:
    app = App("svc", url="memory://")

    @app.consumer("orders", partitions=4, partition_key=lambda event: event["vip"])
    async def handle(event: dict[str, Any]) -> None: ...

    with pytest.raises(ConfigError, match="str, bytes or int"):
        await app.publish({"vip": True}, exchange="orders")


def test_two_partitioned_consumers_on_one_exchange_must_agree_on_the_count() -> None:
    app = App("svc", url="memory://")

    @app.consumer("billing", partitions=4, exchange="orders.events")
    async def billing(event: dict[str, Any]) -> None: ...

    with pytest.raises(ConfigError, match="partitions"):

        @app.consumer("shipping", partitions=8, exchange="orders.events")
        async def shipping(event: dict[str, Any]) -> None: ...


def test_two_partitioned_consumers_on_one_exchange_with_one_count_are_two_groups() -> None:
    app = App("svc", url="memory://")

    @app.consumer("billing", partitions=4, exchange="orders.events")
    async def billing(event: dict[str, Any]) -> None: ...

    @app.consumer("shipping", partitions=4, exchange="orders.events")
    async def shipping(event: dict[str, Any]) -> None: ...

    queues = {q.name for q in app.plan.queues}
    assert {f"{q}.p{i}" for q in ("billing", "shipping") for i in range(4)} <= queues


# -- a replica that stops for a while -------------------------------------------------------------


async def test_a_replica_stopped_then_continued_never_runs_a_key_beside_another(
    broker_url: str, admin: Admin, tmp_path: Path
) -> None:
    """Two replicas (processes), 8 partitions, 16 keys streaming, each call 20 ms: one replica is
    SIGSTOPped with calls in hand for 6 s (twice MISSED heartbeats), then SIGCONTed. The other one
    counts it gone after MISSED heartbeats and subscribes to its partitions, and the stopped one,
    once continued, hears nobody for a moment and subscribes to all: the broker's single active
    consumer keeps each partition with one of them, and no key ever runs twice at once or out of
    order."""
    from .partition_ledger import check_ledger, spawn

    service, queue, keys, stopped = unique("svc"), unique("sigstop"), 16, 6.0
    ledger = tmp_path / "ledger"
    ledger.touch()
    _killer_plan(admin, service, queue, 8)
    workers = [spawn(broker_url, service, queue, ledger, 0.02) for _ in range(2)]
    try:
        for worker in workers:
            assert worker.stdout is not None
            assert (await asyncio.to_thread(worker.stdout.readline)).strip() == "ready"
        await asyncio.sleep(1.5)  # they share the partitions
        producer = App(unique("producer"), url=broker_url)
        async with producer:
            seq = 0

            async def publish(rounds: int) -> None:
                nonlocal seq
                for _ in range(rounds):
                    await asyncio.gather(
                        *(
                            producer.publish(
                                {"key": f"k{k}", "seq": seq},
                                exchange=queue,
                                routing_key=partition(f"k{k}", 8),
                            )
                            for k in range(keys)
                        )
                    )
                    seq += 1
                    await asyncio.sleep(0.05)

            await publish(10)
            victim = workers[0]
            victim.send_signal(signal.SIGSTOP)
            await publish(int(stopped / 0.1))
            victim.send_signal(signal.SIGCONT)
            await publish(20)

            def done() -> bool:
                handled = {
                    (line.split()[1], line.split()[2])
                    for line in ledger.read_text().splitlines()
                    if line[0] == "E"
                }
                return len(handled) == keys * seq

            await wait_for(done, timeout=60)
            await asyncio.sleep(1)
        lines = ledger.read_text().splitlines()
        tally = check_ledger(lines, set())
        print(f"\nstopped {stopped} s: {tally}")
        assert tally.handled == keys * seq
    finally:
        for worker in workers:
            with contextlib.suppress(ProcessLookupError):
                worker.send_signal(signal.SIGCONT)
                worker.send_signal(signal.SIGTERM)
        for worker in workers:
            try:
                await asyncio.to_thread(worker.wait, 15)
            except subprocess.TimeoutExpired:
                worker.kill()
            assert worker.stdout is not None
            worker.stdout.close()
