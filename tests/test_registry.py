"""What the decorator and App() refuse at import time: names, delays and options that AMQP or
RabbitMQ cannot take, and queues whose names collide with another consumer's derived names."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pamqp.constants
import pytest

from rabbitflow import App, ConfigError, Message, Retry, names

from .helpers import Admin, unique, wait_for

URL = "amqp://guest:guest@localhost/"


async def handler(body: Any) -> None: ...


def register(queue: object, app: App | None = None, **options: Any) -> App:
    app = app or App("svc", url=URL)
    app.consumer(queue, **options)(handler)  # type: ignore[arg-type]
    return app


def test_name_characters_are_the_amqp_librarys() -> None:
    theirs = pamqp.constants.DOMAIN_REGEX["queue-name"]
    assert theirs.pattern == pamqp.constants.DOMAIN_REGEX["exchange-name"].pattern
    for code in range(0x3000):
        char = chr(code)
        assert bool(names.NAME_CHARACTERS.fullmatch(char)) == bool(theirs.fullmatch(char)), repr(char)


def test_the_limits_follow_from_the_longest_derived_names() -> None:
    assert names.MAX_TTL_MS == 2**32 - 1
    assert names.retry_queue("Q", names.MAX_DELAY) == "Q.retry.4294967295ms"
    assert names.MAX_QUEUE == 255 - len(".retry.4294967295ms") == 236
    assert names.MAX_SERVICE == 251


def test_a_queue_whose_derived_names_do_not_fit_is_refused() -> None:
    longest = "q" * names.MAX_QUEUE
    app = register(longest, delay=names.MAX_DELAY)
    assert max(len(q.name) for q in app.plan.queues) == 255
    with pytest.raises(ConfigError) as info:
        register("q" * (names.MAX_QUEUE + 1))
    message = str(info.value)
    assert "237 bytes" in message
    assert "at most 236 bytes" in message
    assert "Q.retry.4294967295ms" in message
    assert "255" in message
    # Length is in bytes of UTF-8, as AMQP counts it.
    with pytest.raises(ConfigError, match="240 bytes; a queue name is at most 236 bytes"):
        register("é" * 120)


@pytest.mark.parametrize(
    ("queue", "problem"),
    [
        ("orders\x00", r"'\\x00' cannot be in a queue or exchange name"),
        ("line\nbreak", r"'\\n' cannot be in a queue or exchange name"),
        ("café", "'é' cannot be in a queue or exchange name"),
        ("half\udc80", "not encodable as UTF-8"),
        ("", "expected a non-empty string"),
        (b"orders", "expected a non-empty string"),
    ],
)
def test_queue_names_that_are_no_amqp_name_are_refused(queue: object, problem: str) -> None:
    with pytest.raises(ConfigError, match=problem) as info:
        register(queue)
    assert str(info.value).startswith(f"@app.consumer({queue!r})")


def test_exchange_and_routing_key_must_be_amqp_short_strings() -> None:
    with pytest.raises(ConfigError, match=r"exchange='ex\\t': '\\t' cannot be"):
        register("q", exchange="ex\t")
    with pytest.raises(ConfigError, match=r"exchange=.*256 bytes; AMQP names are at most 255 bytes"):
        register("q", exchange="x" * 256)
    with pytest.raises(ConfigError, match=r"routing_key=.*not encodable as UTF-8"):
        register("q", exchange="ex", routing_key="key\ud800")
    with pytest.raises(ConfigError, match=r"routing_key=.*256 bytes"):
        register("q", exchange="ex", routing_key="é" * 128)
    # A routing key is any UTF-8 text: no character rule.
    app = register("q", exchange="ex", routing_key="bestellung.größe.*")
    assert app.plan.bindings[-1].routing_key == "bestellung.größe.*"


def test_binding_to_the_services_own_exchange_is_refused() -> None:
    with pytest.raises(ConfigError, match=re.escape("'svc.dlx' is service 'svc''s own dead-letter exchange")):
        register("q", exchange="svc.dlx")


@pytest.mark.parametrize(
    ("delay", "problem"),
    [
        (float("inf"), "finite number of seconds"),
        (float("nan"), "finite number of seconds"),
        ([1, float("inf")], "finite number of seconds"),
        (names.MAX_DELAY + 0.001, "4294967.296s is longer than the longest delay"),
        (10**12, "longer than the longest delay RabbitMQ can hold a message for, 4294967.295s"),
    ],
)
def test_delays_rabbitmq_cannot_hold_are_refused(delay: object, problem: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(problem)) as info:
        register("q", delay=delay)
    assert f"delay={delay!r}" in str(info.value)


@pytest.mark.parametrize("delay", [float("inf"), float("nan"), 1e10, names.MAX_DELAY + 0.001, "5", True, -1])
def test_a_retry_signal_with_a_delay_rabbitmq_cannot_hold_is_a_config_error(delay: Any) -> None:
    with pytest.raises(ConfigError, match=re.escape(f"Retry(delay={delay!r})")):
        Retry(delay=delay)
    assert Retry(delay=names.MAX_DELAY).delay == names.MAX_DELAY


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("orders", "orders.parked"),
        ("orders", "orders.retry.5s"),
        ("orders", "orders.retry.7s"),  # not planned: a later Retry(delay=7) would make it
        ("orders", "orders.retry.x.y"),
        ("orders.parked", "orders"),
        ("orders.retry.5s", "orders"),
        ("a.retry.b", "a.retry.b.parked"),
    ],
)
def test_a_queue_that_is_another_consumers_derived_name_is_refused(first: str, second: str) -> None:
    app = register(first, delay=5)
    with pytest.raises(ConfigError) as info:
        register(second, app)
    message = str(info.value)
    derived, base = (second, first) if len(second) > len(first) else (first, second)
    assert message.startswith(f"@app.consumer({second!r})")
    assert f"queue {derived!r}" in message
    assert f"derives for queue {base!r}" in message
    assert "rename one of the two queues" in message
    assert [c.queue for c in app.consumers] == [first]


def test_similar_names_that_are_no_derived_names_are_fine() -> None:
    app = register("orders")
    for queue in ("orders.parked2", "orders-retry.5s", "orders.retry", "ordersparked", "x.orders.parked"):
        register(queue, app)
    assert len(app.consumers) == 6


@pytest.mark.parametrize("partitioned_first", [True, False])
def test_an_exchange_a_partitioned_consumer_needs_direct_cannot_be_another_consumers_topic(
    partitioned_first: bool,
) -> None:
    """Its producers' exchange is the queue's name unless given: a consumer binding a topic
    exchange of that name is refused when the second of the two is declared, in either order."""
    app = App("svc", url=URL)
    steps = [
        lambda: app.consumer("orders", partitions=4)(handler),
        lambda: app.consumer("audit", exchange="orders", exchange_type="topic", routing_key="#")(handler),
    ]
    first, second = steps if partitioned_first else steps[::-1]
    first()
    with pytest.raises(ConfigError, match="exchange 'orders' is used as"):
        second()
    assert len(app.consumers) == 1
    assert {e.name for e in app.plan.exchanges} >= {"svc.dlx", "orders"}


def test_the_plan_of_many_consumers_is_the_plan_of_all_of_them_at_once() -> None:
    """Consumers are checked one by one as they are declared; the plan is compiled once, from
    all of them (declaring n consumers takes time in n, not n²: 1,500 took 30-50 s before)."""
    from rabbitflow.topology.compiler import compile_plan

    app = App("svc", url=URL)
    for n in range(300):
        options: dict[str, Any] = {"retries": n % 3, "delay": 1 + n % 5}
        if n % 7 == 0:
            options = {"exchange": f"ex{n % 4}", "exchange_type": "topic", "routing_key": "#"}
        if n % 50 == 0:
            options = {"partitions": 2}
        app.consumer(f"q{n}", **options)(handler)
    assert app.plan == compile_plan("svc", app.consumers)
    assert len([q for q in app.plan.queues if q.name.endswith(".parked")]) == 300


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("s" * 252, "252 bytes; a service name is at most 251 bytes, so that its exchange <name>.dlx fits"),
        ("amq.orders", "RabbitMQ reserves exchange names starting with 'amq.'"),
        ("bestellungen-größe", "'ßö' cannot be in a queue or exchange name"),
        ("svc\udc80", "not encodable as UTF-8"),
    ],
)
def test_a_service_name_whose_exchange_rabbitmq_cannot_take_is_refused(name: str, problem: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(problem)):
        App(name, url=URL)
    App("s" * 251, url=URL)


def test_prefetch_and_heartbeat_must_fit_an_amqp_short() -> None:
    with pytest.raises(ConfigError, match="prefetch=65536: at most 65535"):
        App("svc", url=URL, prefetch=65536)
    with pytest.raises(ConfigError, match="heartbeat=70000: at most 65535"):
        App("svc", url=URL, heartbeat=70000)
    with pytest.raises(ConfigError, match="prefetch=100000: at most 65535"):
        register("q", prefetch=100_000)
    App("svc", url=URL, prefetch=65535, concurrency=100_000)


async def test_the_longest_names_and_delays_allowed_work_on_the_broker(
    make_app: Callable[..., App], admin: Admin
) -> None:
    """The limits are RabbitMQ's, not guesses: a queue of the longest name, with the longest
    planned delay, declares; a handler's Retry with the longest delay gets its queue."""
    app = make_app()
    queue = unique("long").ljust(names.MAX_QUEUE, "x")
    longest = names.retry_queue(queue, names.MAX_DELAY)
    attempts: list[int] = []

    @app.consumer(queue, retries=1, delay=1)
    async def handle(body: Any, message: Message) -> None:
        attempts.append(message.attempt)
        raise Retry(delay=names.MAX_DELAY)

    admin.queues.add(longest)
    async with app:
        await app.publish({"n": 1}, routing_key=queue)
        await wait_for(lambda: attempts == [1])
        # Settled once its copy was confirmed: the unplanned retry queue exists and holds it.
        await wait_for(lambda: app.health()["consumers"][0]["settled"] == 1)
        assert await admin.count(longest) == 1
        assert await admin.count(f"{queue}.parked") == 0
    assert len(longest) == 255
    assert attempts == [1]  # waiting 49.7 days in the longest retry queue
