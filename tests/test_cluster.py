"""Failover on a real 3-node RabbitMQ cluster with quorum queues (scripts/cluster.sh)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from rabbitflow import App, Message, PublishTimeout, Reject, RequestFailed

from .brokers import cluster_ports
from .helpers import unique, wait_for

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "cluster.sh"
PORTS = cluster_ports()  # 5673-5675, or 5691-5693 with RABBITFLOW_BROKER_VERSION=4.0


def url(node: int) -> str:
    return f"amqp://guest:guest@127.0.0.1:{PORTS[node]}/"


def node_of(app: App) -> int:
    node = app.health()["node"]
    assert node is not None
    return next(n for n, port in PORTS.items() if f":{port}/" in node)


async def cluster(*args: str) -> None:
    process = await asyncio.create_subprocess_exec(
        str(SCRIPT), *args, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
    )
    _, err = await process.communicate()
    assert process.returncode == 0, f"cluster.sh {' '.join(args)} failed: {err.decode()}"


async def all_members_online(queue: str, via: int, timeout: float = 60) -> None:
    """Wait until every node runs its member of the quorum queue: a node that just rejoined may
    still be recovering, and losing another node before that would leave the queue without a
    majority — for any client."""
    async with asyncio.timeout(timeout):
        while True:
            process = await asyncio.create_subprocess_exec(
                str(SCRIPT),
                "ctl",
                str(via),
                "list_queues",
                "name",
                "online",
                "--formatter",
                "json",
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.DEVNULL,
            )
            out, _ = await process.communicate()
            try:
                rows = json.loads(out or b"[]")
            except json.JSONDecodeError:
                rows = []
            if any(row.get("name") == queue and len(row.get("online", [])) == 3 for row in rows):
                return
            await asyncio.sleep(0.5)


@pytest.fixture(scope="module")
def running_cluster() -> Iterator[None]:
    """The 3-node cluster; started here (and stopped after) when `make test` did not start it."""
    started_here = subprocess.run([str(SCRIPT), "status"], capture_output=True, check=False).returncode != 0
    if started_here:
        result = subprocess.run([str(SCRIPT), "start"], capture_output=True, text=True, check=False)
        if result.returncode != 0:
            pytest.fail(f"the local 3-node cluster did not start: {result.stderr}", pytrace=False)
    yield
    if started_here:
        subprocess.run([str(SCRIPT), "stop"], capture_output=True, check=False)


async def test_consumer_and_producer_survive_losing_their_nodes(
    running_cluster: None, capsys: pytest.CaptureFixture[str]
) -> None:
    at_least = 2000
    window = 10
    prefetch = 50
    queue = unique("cluster")
    consumer = App(unique("consumer"), url=[url(1), url(2), url(3)], prefetch=prefetch, heartbeat=2)
    producer = App(unique("producer"), url=[url(2), url(3), url(1)], heartbeat=2)
    handled: Counter[int] = Counter()
    stamps: list[tuple[float, int]] = []  # (time, consumer reconnects) per handled message
    confirmed: set[int] = set()
    both_nodes_lost = asyncio.Event()
    next_n = 0

    @consumer.consumer(queue, queue_type="quorum")
    async def handle(body: dict[str, Any]) -> None:
        handled[body["n"]] += 1
        stamps.append((time.monotonic(), consumer.reconnects))

    async def publish(n: int) -> None:
        await producer.publish({"n": n}, routing_key=queue, timeout=60)
        confirmed.add(n)

    async def produce() -> None:
        """Windows of publishes until both losses are behind us and `at_least` went out: a fixed
        count could be used up before the second loss on a slow machine."""
        nonlocal next_n
        while next_n < at_least or not both_nodes_lost.is_set():
            await asyncio.gather(*(publish(n) for n in range(next_n, next_n + window)))
            next_n += window
            await asyncio.sleep(0.04)

    async def until(what: str, predicate: Any, timeout: float = 60) -> None:
        """wait_for, with the state of both apps in the failure: a cluster is slow to debug."""
        try:
            await wait_for(predicate, timeout=timeout)
        except TimeoutError:
            raise AssertionError(
                f"{what} within {timeout}s; handled {len(handled)}/{next_n}; "
                f"consumer {consumer.health()}; producer {producer.health()}"
            ) from None

    def resumed_after(cut: float, reconnects: int) -> float:
        return min(t for t, r in stamps if r >= reconnects) - cut

    stopped: list[int] = []
    try:
        async with consumer, producer:
            feeding = asyncio.create_task(produce())
            await until("300 messages handled", lambda: len(handled) >= 300, timeout=30)

            # 1. The consumer's node goes down (clean shutdown).
            victim = node_of(consumer)
            cut = time.monotonic()
            await cluster("stop-node", str(victim))
            stopped.append(victim)
            # ">= 1": a surviving node may drop the new connection too (541 INTERNAL_ERROR while the
            # quorum queue elects its new leader); the consumer then fails over once more.
            await until("consumer resumed", lambda: consumer.reconnects >= 1 and stamps[-1][1] >= 1)
            consumer_resume = resumed_after(cut, 1)
            await cluster("start-node", str(victim))  # keep the quorum for the second loss
            stopped.remove(victim)
            await all_members_online(queue, via=victim)

            # 2. The producer's node crashes (SIGKILL, no goodbye).
            victim = node_of(producer)
            cut = time.monotonic()
            await cluster("kill-node", str(victim))
            stopped.append(victim)
            await until("producer reconnected", lambda: producer.reconnects >= 1)
            first_after = next_n + window  # published after the reconnect, not before the kill
            await until("the producer's messages flowing again", lambda: max(handled) >= first_after)
            producer_resume = time.monotonic() - cut
            both_nodes_lost.set()

            await asyncio.wait_for(feeding, 120)
            total = next_n
            await until("every message handled", lambda: len(handled) == total, timeout=120)
            await asyncio.sleep(1)  # late duplicates arrive now
    finally:
        for node in stopped:
            await cluster("start-node", str(node))
        await _delete(consumer)

    duplicates = sum(handled.values()) - total
    with capsys.disabled():
        print(
            f"\n[cluster failover] {total} messages, none lost, {duplicates} duplicates; "
            f"consumer resumed {consumer_resume:.2f}s after its node stopped; producer's messages "
            f"flowed again {producer_resume:.2f}s after its node was killed"
        )
    assert total >= at_least
    assert confirmed == set(range(total))
    assert set(handled) == set(range(total))
    # Duplicates come only from deliveries in flight at a loss (prefetch) and re-sent publishes.
    assert duplicates <= 3 * (prefetch + window)
    assert consumer_resume < 30
    assert producer_resume < 30


async def _delete(app: App) -> None:
    import aiormq

    connection = await aiormq.connect(url(1))
    channel = await connection.channel()
    for name in (q.name for q in app.plan.queues):
        await channel.queue_delete(name)
    await channel.exchange_delete(f"{app.name}.dlx")
    await connection.close()


async def test_a_resource_alarm_blocks_publishes_visibly(running_cluster: None) -> None:
    app = App(unique("alarm"), url=url(1))
    queue = unique("alarm")
    got: list[int] = []

    @app.consumer(queue, queue_type="quorum")
    async def handle(body: dict[str, int]) -> None:
        got.append(body["n"])

    try:
        async with app:
            await app.publish({"n": 1}, routing_key=queue)
            await wait_for(lambda: got == [1])
            # A memory alarm (the watermark below what the node uses) blocks publishers cluster-wide.
            await cluster("ctl", "1", "set_vm_memory_high_watermark", "0.0000001")
            try:
                started = time.monotonic()
                with pytest.raises(PublishTimeout, match="blocked by a resource alarm"):
                    await app.publish({"n": 2}, routing_key=queue, timeout=2)
                assert 1.9 <= time.monotonic() - started <= 5
                await wait_for(lambda: app.health()["blocked"] is True)
                waiting = asyncio.create_task(app.publish({"n": 3}, routing_key=queue, timeout=60))
                await asyncio.sleep(1)
                assert not waiting.done()  # waits for the alarm to clear instead of failing
            finally:
                await cluster("ctl", "1", "set_vm_memory_high_watermark", "0.4")
            await asyncio.wait_for(waiting, 30)
            assert app.health()["blocked"] is False
            # n=2's outcome was unknown when it timed out: the broker may still take it.
            await wait_for(lambda: 3 in got, timeout=15)
    finally:
        await _delete(app)


async def test_acks_flow_during_a_memory_alarm(running_cluster: None) -> None:
    """Publishing and consuming use their own connections: an alarm that blocks the publishing
    one leaves the consumer draining its queue."""
    app = App(unique("drain"), url=url(1), prefetch=8)
    queue = unique("drain")
    gate = asyncio.Event()
    got: list[int] = []

    @app.consumer(queue, queue_type="classic")
    async def handle(body: dict[str, int]) -> None:
        await gate.wait()
        got.append(body["n"])

    try:
        async with app:
            for n in range(100):
                await app.publish({"n": n}, routing_key=queue)
            await cluster("ctl", "1", "set_vm_memory_high_watermark", "0.0000001")
            try:
                with pytest.raises(PublishTimeout):
                    await app.publish({"n": -1}, routing_key=queue, timeout=1)  # now blocked
                gate.set()
                # 100 messages through a prefetch of 8: only acks sent during the alarm get there.
                await wait_for(lambda: len(got) == 100, timeout=20)
                await wait_for(lambda: app.health()["consumers"][0]["in_flight"] == 0)
                assert app.health()["blocked"] is True
            finally:
                await cluster("ctl", "1", "set_vm_memory_high_watermark", "0.4")
    finally:
        await _delete(app)
    # n=-1's outcome was unknown when it timed out: the broker may take it once the alarm clears.
    assert sorted(n for n in got if n >= 0) == list(range(100))


async def test_a_nacked_copy_is_sent_again_not_requeued(running_cluster: None) -> None:
    """The broker nacks copies into a full retry queue (a policy: max-length 0, reject-publish):
    the copy is published again with backoff until it is taken; the handler is not called again
    meanwhile."""
    app = App(unique("nack"), url=url(1), handler_timeout=0.5)
    queue = unique("nack")
    calls: list[int] = []

    @app.consumer(queue, queue_type="classic", retries=2, delay=0.2)
    async def handle(body: dict[str, int], message: Message) -> None:
        calls.append(message.attempt)
        if message.attempt == 1:
            raise RuntimeError("once")

    policy = unique("full")
    try:
        async with app:
            await cluster(
                "ctl",
                "1",
                "set_policy",
                "--apply-to",
                "queues",
                policy,
                f"^{queue}\\.retry\\.",
                '{"max-length": 0, "overflow": "reject-publish"}',
            )
            try:
                await app.publish({"n": 1}, routing_key=queue)
                await asyncio.sleep(3)  # the copy is nacked, again and again
                assert calls == [1]
                health = app.health()
                assert health["consumers"][0]["in_flight"] == 1
                # Holding a delivery it cannot settle for longer than 2 x 0.5 + 1 s: stalled.
                assert health["consumers"][0]["stalled"] is True
                assert health["healthy"] is False
            finally:
                await cluster("ctl", "1", "clear_policy", policy)
            await wait_for(lambda: calls == [1, 2], timeout=15)
            await wait_for(lambda: app.health()["consumers"][0]["in_flight"] == 0)
            assert app.health()["healthy"] is True
    finally:
        await _delete(app)
    assert calls == [1, 2]


async def _connection_pid(node: int, connection_name: str) -> str:
    """The pid `rabbitmqctl close_connection` takes, of the connection with this client name."""
    process = await asyncio.create_subprocess_exec(
        str(SCRIPT),
        "ctl",
        str(node),
        "list_connections",
        "pid",
        "client_properties",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    out, _ = await process.communicate()
    wanted = f'{{"connection_name","{connection_name}"}}'
    (pid,) = [line.split("\t", 1)[0] for line in out.decode().splitlines() if wanted in line]
    return pid


async def test_losing_only_the_publishing_connection_loses_and_parks_nothing(
    running_cluster: None,
) -> None:
    """The broker closes the publishing connection while retry copies are in flight: the
    session fails over with both connections; no message is parked or lost for it."""
    app = App(unique("publoss"), url=url(1))
    queue = unique("publoss")
    handled: set[int] = set()

    @app.consumer(queue, queue_type="quorum", retries=3, delay=0.2)
    async def handle(body: dict[str, int], message: Message) -> None:
        if message.attempt == 1:
            raise RuntimeError("every message fails once")
        handled.add(body["n"])

    try:
        async with app:
            for n in range(300):
                await app.publish({"n": n}, routing_key=queue)
            await wait_for(lambda: len(handled) >= 50, timeout=20)
            pid = await _connection_pid(1, f"{app.name}:publish")
            await cluster("ctl", "1", "close_connection", pid, "test: the publishing connection only")
            await wait_for(lambda: app.reconnects == 1, timeout=20)
            await wait_for(lambda: len(handled) == 300, timeout=30)
            parked = await _count(f"{queue}.parked")
    finally:
        await _delete(app)
    assert parked == 0


async def _count(queue: str) -> int:
    import aiormq

    connection = await aiormq.connect(url(1))
    try:
        channel = await connection.channel()
        ok = await channel.queue_declare(queue, passive=True)
        return int(ok.message_count or 0)
    finally:
        await connection.close()


@dataclass
class Quote:
    sku: str
    price: int


async def test_typed_and_error_replies_across_a_failover(running_cluster: None) -> None:
    """Requests in flight while the caller's node is killed are answered on the next one, typed;
    a responder that fails one for good answers at once, before and after the failover."""
    queue = unique("quotes")
    responder = App(unique("pricing"), url=[url(1), url(2), url(3)], heartbeat=2)
    caller = App(unique("orders"), url=[url(2), url(3), url(1)], heartbeat=2)

    @responder.consumer(queue, retries=2, delay=0.2)
    async def price(req: dict[str, Any], message: Message) -> Quote:
        if req["sku"] == "bad":
            raise Reject("no such sku")
        if req["sku"] == "flaky" and message.attempt == 1:
            raise RuntimeError("the price list is loading")
        await asyncio.sleep(1.0)  # in flight when the caller's node goes
        return Quote(req["sku"], 42)

    async def ask(sku: str) -> Quote:
        return await caller.request({"sku": sku}, routing_key=queue, response_type=Quote, timeout=90)

    victim = 0
    try:
        async with responder, caller:
            assert node_of(responder) != node_of(caller)
            assert await ask("a") == Quote("a", 42)
            started = time.monotonic()
            with pytest.raises(RequestFailed) as failed:
                await ask("bad")
            assert failed.value.reason == "rejected"
            assert "no such sku" in failed.value.error
            assert time.monotonic() - started < 10  # at once, not after the request's timeout

            victim = node_of(caller)
            in_flight = [asyncio.create_task(ask(sku)) for sku in ("k1", "k2", "k3", "flaky")]
            await asyncio.sleep(0.5)
            await cluster("kill-node", str(victim))
            answers = await asyncio.wait_for(asyncio.gather(*in_flight), 120)
            assert answers == [Quote("k1", 42), Quote("k2", 42), Quote("k3", 42), Quote("flaky", 42)]
            assert caller.reconnects >= 1
            with pytest.raises(RequestFailed):
                await ask("bad")
    finally:
        if victim:
            await cluster("start-node", str(victim))
        await _delete(responder)
