"""Routers: consumers declared in several modules and included in one App, checked and run
exactly as if they had been declared on the app."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from rabbitflow import App, ConfigError, Router, StateError

from .helpers import Admin, unique, wait_for
from .services.shop import orders, payments, shipping
from .services.shop.app import create_app

URL = "amqp://guest:guest@localhost/"


async def handler(body: Any) -> None: ...


async def other(body: Any) -> None: ...


def router_of(*queues: str, **options: Any) -> Router:
    router = Router()
    for queue in queues:
        router.consumer(queue, **options)(handler)
    return router


async def test_a_service_split_over_three_modules_handles_every_queue(broker_url: str, admin: Admin) -> None:
    app = create_app(unique("shop"), url=broker_url, graceful_timeout=5)
    admin.forget_app(app)
    assert {c.queue for c in app.consumers} == {orders.QUEUE, payments.QUEUE, shipping.QUEUE}
    for module in (orders, payments, shipping):
        module.handled.clear()
    async with app:
        await app.publish(
            {"id": "o-1", "lines": [{"sku": "x", "qty": "2"}]},
            exchange=orders.EXCHANGE,
            routing_key="order.created",
        )
        await app.publish({"amount": 12}, routing_key=payments.QUEUE)
        await app.publish("label 7", routing_key=shipping.QUEUE)
        await wait_for(lambda: bool(orders.handled and payments.handled and shipping.handled))
    assert orders.handled == [(orders.Order("o-1", [orders.Line("x", 2)]), "order.created")]
    assert payments.handled == [{"amount": 12}]
    assert shipping.handled == ["label 7"]
    # Each router's options reached the broker: the retry queues and the classic queue exist.
    assert await admin.count(f"{orders.QUEUE}.retry.1s") == 0
    assert await admin.count(f"{shipping.QUEUE}.retry.2s") == 0
    assert app.plan.queue(shipping.QUEUE).arguments.get("x-queue-type") is None


def test_an_included_consumer_is_the_one_declared_on_the_app() -> None:
    """Same spec, same plan: the app's defaults are resolved when it starts, for both alike."""
    router = Router()
    router.consumer("a", exchange="ex", routing_key="k", retries=2, delay=[1, 5])(handler)
    router.consumer("b", queue_type="classic", prefetch=3)(other)
    included = App("svc", url=URL, prefetch=7)
    included.include_router(router)
    direct = App("svc", url=URL, prefetch=7)
    direct.consumer("a", exchange="ex", routing_key="k", retries=2, delay=[1, 5])(handler)
    direct.consumer("b", queue_type="classic", prefetch=3)(other)
    assert included.consumers == direct.consumers
    assert included.plan == direct.plan
    assert included.consumers[0].prefetch is None  # not frozen to a default: the app's applies


async def test_the_apps_defaults_apply_to_included_consumers(
    make_app: Callable[..., App], admin: Admin
) -> None:
    """prefetch and handler_timeout left unset on the router come from App(...); set, they win."""
    app = make_app(prefetch=2, concurrency=2, handler_timeout=0.3)
    slow_q, stuck_q = unique("slow"), unique("stuck")
    release = asyncio.Event()
    started: list[int] = []
    router = Router()

    @router.consumer(slow_q, retries=0, handler_timeout=30)
    async def slow(body: dict[str, int]) -> None:
        started.append(body["n"])
        await release.wait()

    @router.consumer(stuck_q, retries=0)
    async def stuck(body: dict[str, int]) -> None:
        await asyncio.sleep(60)

    app.include_router(router)
    async with app:
        for n in range(5):
            await app.publish({"n": n}, routing_key=slow_q)
        await app.publish({"n": 0}, routing_key=stuck_q)
        await wait_for(lambda: len(started) == 2)
        assert await admin.count(slow_q) == 3  # the app's prefetch of 2 holds the rest back
        parked = None
        async with asyncio.timeout(10):
            while parked is None:
                parked = await admin.get(f"{stuck_q}.parked")
        release.set()
        await wait_for(lambda: len(started) == 5)
        assert await admin.count(f"{slow_q}.parked") == 0
    headers = parked.header.properties.headers
    assert headers["x-rf-exception"] == "builtins.TimeoutError"
    assert "handler_timeout of 0.3s" in headers["x-rf-error"]


def test_a_queue_declared_twice_across_routers_is_refused_at_include() -> None:
    app = App("svc", url=URL)
    app.include_router(router_of("orders"))
    second = router_of("payments", "orders")
    with pytest.raises(ConfigError) as info:
        app.include_router(second)
    message = str(info.value)
    assert message.startswith("app.include_router(Router(orders, payments)): @router.consumer('orders'):")
    assert (
        "queue 'orders' already has a consumer (tests.test_router.handler); one queue, one consumer"
        in message
    )
    # All or nothing: the router's other consumer was not added either, and it may be fixed.
    assert [c.queue for c in app.consumers] == ["orders"]
    assert [q.name for q in app.plan.queues if q.role == "consume"] == ["orders"]


def test_a_routers_queue_against_the_apps_own_consumer_is_refused() -> None:
    app = App("svc", url=URL)
    app.consumer("orders")(handler)
    with pytest.raises(ConfigError, match=r"queue 'orders' already has a consumer"):
        app.include_router(router_of("orders"))


@pytest.mark.parametrize(("first", "second"), [("orders", "orders.parked"), ("orders.retry.5s", "orders")])
def test_a_derived_name_across_app_and_router_is_refused(first: str, second: str) -> None:
    app = App("svc", url=URL)
    app.consumer(first, delay=5)(handler)
    with pytest.raises(ConfigError, match="is a name rabbitflow derives for queue 'orders'"):
        app.include_router(router_of(second))


def test_the_services_own_exchange_is_refused_at_include() -> None:
    router = router_of("q", exchange="svc.dlx")  # the router cannot know the service yet
    with pytest.raises(ConfigError, match=r"'svc.dlx' is service 'svc''s own dead-letter exchange"):
        App("svc", url=URL).include_router(router)
    App("other", url=URL).include_router(router)  # for another service it is just an exchange


def test_an_exchange_with_two_types_is_refused() -> None:
    app = App("svc", url=URL)
    app.consumer("a", exchange="events", exchange_type="fanout")(handler)
    with pytest.raises(
        ConfigError, match=r"exchange 'events' is 'fanout' for tests.test_router.handler and 'topic'"
    ):
        app.include_router(router_of("b", exchange="events", exchange_type="topic"))
    # Within one router it is refused when the decorator runs.
    router = router_of("a", exchange="events", exchange_type="fanout")
    with pytest.raises(ConfigError, match=r"@router.consumer\('b'\): exchange 'events' is 'fanout'"):
        router.consumer("b", exchange="events", exchange_type="direct")(other)


def test_a_router_checks_its_own_consumers_when_decorating() -> None:
    router = router_of("orders")
    with pytest.raises(ConfigError, match=r"^@router.consumer\('orders'\): queue 'orders' already has"):
        router.consumer("orders")(other)
    with pytest.raises(ConfigError, match=r"^@router.consumer\('orders.parked'\): queue 'orders.parked'"):
        router.consumer("orders.parked")(other)
    with pytest.raises(ConfigError, match=r"^@router.consumer\('x'\): unknown option\(s\) retires"):
        router.consumer("x", retires=3)(other)
    with pytest.raises(ConfigError, match="is a generator"):  # a `def` runs in a thread; no generator
        router.consumer("y")(lambda body: (yield))  # type: ignore[arg-type, return-value]


def test_a_router_included_takes_no_more_consumers_and_may_join_other_apps() -> None:
    router = router_of("orders")
    first, second = App("one", url=URL), App("two", url=URL)
    first.include_router(router)
    with pytest.raises(ConfigError, match=r"already included .* declare every consumer of a router before"):
        router.consumer("late")(other)
    second.include_router(router)
    assert [c.queue for c in second.consumers] == ["orders"]
    with pytest.raises(ConfigError, match="queue 'orders' already has a consumer"):
        first.include_router(router)


def test_routers_nest() -> None:
    inner, outer = router_of("a"), router_of("b")
    outer.include_router(inner)
    app = App("svc", url=URL)
    app.include_router(outer)
    assert sorted(c.queue for c in app.consumers) == ["a", "b"]
    with pytest.raises(ConfigError, match="cannot include itself"):
        outer.include_router(outer)
    with pytest.raises(ConfigError, match=r"expected a rabbitflow\.Router"):
        app.include_router(app)  # type: ignore[arg-type]


async def test_a_running_app_includes_no_router() -> None:
    app = App("svc", url="memory://")
    async with app:
        with pytest.raises(StateError, match="before the app starts"):
            app.include_router(router_of("late"))
    assert app.consumers == ()
