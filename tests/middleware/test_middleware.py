"""The middleware seam (SPEC §9): what a middleware sees of each delivery, attempt, outcome and
publish, on RabbitMQ."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from rabbitflow import App, ConfigError, Message, Middleware, Reject, Unroutable
from rabbitflow.middleware import Fate, Outcome, Outgoing

from ..helpers import Admin, unique, wait_for


class Recorder(Middleware):
    """Every hook call, in order, tagged with this middleware's name."""

    def __init__(self, name: str, events: list[tuple[Any, ...]]) -> None:
        self.name = name
        self.events = events
        self.outcomes: list[tuple[Any, Outcome]] = []

    def received(self, message: Message) -> None:
        self.events.append((self.name, "received", message.attempt))

    async def attempt(self, message: Message, call_next: Callable[[], Awaitable[Any]]) -> Any:
        self.events.append((self.name, "before", message.attempt))
        try:
            result = await call_next()
        except BaseException as exc:
            self.events.append((self.name, "raised", type(exc).__name__))
            raise
        self.events.append((self.name, "returned", result))
        return result

    def settled(self, message: Message, outcome: Outcome) -> None:
        self.outcomes.append((orjson_body(message), outcome))
        self.events.append((self.name, "settled", outcome.fate))

    async def publish(self, outgoing: Outgoing, call_next: Callable[[], Awaitable[None]]) -> None:
        outgoing.headers[f"x-seen-by-{self.name}"] = outgoing.exchange or "(default)"
        self.events.append((self.name, "publish", outgoing.routing_key))
        try:
            await call_next()
        except Exception as exc:
            self.events.append((self.name, "publish failed", type(exc).__name__))
            raise
        self.events.append((self.name, "confirmed", outgoing.routing_key))


def orjson_body(message: Message) -> Any:
    import orjson

    try:
        return orjson.loads(message.body)
    except orjson.JSONDecodeError:
        return message.body


async def test_hooks_nest_in_order_around_one_handled_delivery(make_app: Callable[..., App]) -> None:
    events: list[tuple[Any, ...]] = []
    app = make_app(middleware=[Recorder("outer", events), Recorder("inner", events)])
    queue = unique("mw")

    @app.consumer(queue, queue_type="classic")
    async def handle(body: dict[str, int]) -> int:
        events.append(("handler", body["n"]))
        return body["n"] * 2

    async with app:
        await app.publish({"n": 21}, routing_key=queue)
        await wait_for(lambda: ("inner", "settled", Fate.HANDLED) in events)
    consumed = [e for e in events if e[1] not in {"publish", "confirmed"}]
    assert consumed == [
        ("outer", "received", 1),
        ("inner", "received", 1),
        ("outer", "before", 1),
        ("inner", "before", 1),
        ("handler", 21),
        ("inner", "returned", 42),
        ("outer", "returned", 42),
        ("outer", "settled", Fate.HANDLED),
        ("inner", "settled", Fate.HANDLED),
    ]


async def test_outcomes_say_retried_with_the_delay_and_parked_with_the_reason(
    make_app: Callable[..., App], admin: Admin
) -> None:
    events: list[tuple[Any, ...]] = []
    recorder = Recorder("m", events)
    app = make_app(middleware=[recorder])
    queue = unique("mw")

    @app.consumer(queue, retries=1, delay=0.2, queue_type="classic")
    async def handle(body: dict[str, str]) -> None:
        if body["do"] == "fail":
            raise ValueError("downstream said no")
        if body["do"] == "reject":
            raise Reject("not ours")

    async with app:
        for do in ("fail", "reject"):
            await app.publish({"do": do}, routing_key=queue)
        await admin.publish(b"{not json", routing_key=queue, content_type="application/json")
        await wait_for(lambda: len(recorder.outcomes) == 4, timeout=15)
    by_body: dict[str, list[Outcome]] = {}
    for body, outcome in recorder.outcomes:
        key = body["do"] if isinstance(body, dict) else "undecodable"
        by_body.setdefault(key, []).append(outcome)
    retried, parked = by_body["fail"]
    assert retried.fate is Fate.RETRIED
    assert retried.delay == 0.2
    assert isinstance(retried.exception, ValueError)
    assert parked.fate is Fate.PARKED
    assert parked.reason == "exhausted"
    (rejected,) = by_body["reject"]
    assert rejected.fate is Fate.PARKED
    assert rejected.reason == "rejected"
    (undecodable,) = by_body["undecodable"]
    assert undecodable.fate is Fate.PARKED
    assert undecodable.reason == "decode-error"
    # No attempt ran for the undecodable one: received and settled only.
    assert events.count(("m", "received", 1)) == 3
    assert events.count(("m", "before", 1)) == 2


async def test_an_attempt_hook_that_raises_fails_the_attempt(
    make_app: Callable[..., App], admin: Admin
) -> None:
    class Refuses(Middleware):
        async def attempt(self, message: Message, call_next: Callable[[], Awaitable[Any]]) -> Any:
            if message.attempt == 1:
                raise RuntimeError("middleware says not yet")
            return await call_next()

    app = make_app(middleware=[Refuses()])
    queue = unique("mw")
    calls: list[int] = []

    @app.consumer(queue, retries=1, delay=0.2, queue_type="classic")
    async def handle(body: dict[str, int], message: Message) -> None:
        calls.append(message.attempt)

    async with app:
        await app.publish({"n": 1}, routing_key=queue)
        await wait_for(lambda: calls == [2], timeout=10)
    assert await admin.count(f"{queue}.parked") == 0


async def test_hooks_that_break_do_not_stop_the_consumer(make_app: Callable[..., App], admin: Admin) -> None:
    class Broken(Middleware):
        def received(self, message: Message) -> None:
            raise KeyError("received")

        def settled(self, message: Message, outcome: Outcome) -> None:
            raise KeyError("settled")

    app = make_app(middleware=[Broken()])
    queue = unique("mw")
    handled: list[int] = []

    @app.consumer(queue, queue_type="classic")
    async def handle(body: dict[str, int]) -> None:
        handled.append(body["n"])

    async with app:
        for n in range(5):
            await app.publish({"n": n}, routing_key=queue)
        await wait_for(lambda: len(handled) == 5)
        await wait_for(lambda: app.health()["consumers"][0]["in_flight"] == 0)
        assert app.health()["healthy"]
    assert sorted(handled) == list(range(5))
    assert await admin.count(queue) == 0


async def test_publish_hooks_add_headers_and_see_the_broker_answer(
    make_app: Callable[..., App],
) -> None:
    events: list[tuple[Any, ...]] = []
    app = make_app(middleware=[Recorder("a", events), Recorder("b", events)])
    queue = unique("mw")
    got: list[dict[str, Any]] = []

    @app.consumer(queue, queue_type="classic")
    async def handle(body: Any, message: Message) -> None:
        got.append(dict(message.headers))

    async with app:
        await app.publish({"n": 1}, routing_key=queue, headers={"own": "kept"})
        await wait_for(lambda: len(got) == 1)
        with pytest.raises(Unroutable):
            await app.publish({"n": 2}, routing_key=unique("nobody"))
    assert got[0] == {"own": "kept", "x-seen-by-a": "(default)", "x-seen-by-b": "(default)"}
    published = [e for e in events if e[1].startswith("publish") or e[1] == "confirmed"]
    assert published[:4] == [
        ("a", "publish", queue),
        ("b", "publish", queue),
        ("b", "confirmed", queue),
        ("a", "confirmed", queue),
    ]
    assert published[-2:] == [("b", "publish failed", "Unroutable"), ("a", "publish failed", "Unroutable")]


def test_a_middleware_that_is_not_one_is_refused_at_import() -> None:
    class Lookalike:
        def received(self, message: Message) -> None: ...

    with pytest.raises(ConfigError, match=r"is not a rabbitflow\.Middleware"):
        App("svc", url="memory://", middleware=[Lookalike()])  # type: ignore[list-item]


def test_only_the_hooks_a_middleware_overrides_are_on_the_path() -> None:
    from rabbitflow.middleware.base import overriding

    class Counts(Middleware):
        def settled(self, message: Message, outcome: Outcome) -> None: ...

    class Traces(Middleware):
        async def publish(self, outgoing: Outgoing, call_next: Callable[[], Awaitable[None]]) -> None:
            await call_next()

    counts, traces, plain = Counts(), Traces(), Middleware()
    chain = (counts, traces, plain)
    assert overriding(chain, "publish") == (traces,)
    assert overriding(chain, "settled") == (counts,)
    assert overriding(chain, "attempt") == ()
