"""Dependencies of handlers (`Depends`), and the `App` parameter: the same on RabbitMQ and on the
memory broker."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Annotated, Any

import pytest

from rabbitflow import App, ConfigError, Depends, Message, Reject, Router

from .helpers import unique, wait_for

events: list[Any] = []


def settings() -> dict[str, str]:
    events.append("settings")
    return {"dsn": "db://x"}


async def client(config: Annotated[dict[str, str], Depends(settings)]) -> str:
    events.append("client")
    await asyncio.sleep(0)
    return f"client({config['dsn']})"


def session(config: dict[str, str] = Depends(settings)) -> Iterator[str]:  # noqa: B008
    events.append("session-open")
    try:
        yield "session"
    except Exception as exc:
        events.append(("session-saw", type(exc).__name__))
        raise
    finally:
        events.append("session-close")


async def transaction(
    message: Message, s: Annotated[str, Depends(session)]
) -> AsyncIterator[tuple[str, int]]:
    events.append("tx-begin")
    try:
        yield s, message.attempt
    except Exception as exc:
        events.append(("tx-rollback", type(exc).__name__))
        raise
    else:
        events.append("tx-commit")


def fresh() -> object:
    return object()


@pytest.fixture(params=["rabbitmq", "memory"])
def app_on(request: pytest.FixtureRequest, make_app: Callable[..., App]) -> Callable[..., App]:
    events.clear()
    if request.param == "rabbitmq":
        return make_app
    return lambda **options: App(unique("svc"), url="memory://", **options)


async def test_dependencies_of_dependencies_resolve_once_per_attempt_and_tear_down_after_it(
    app_on: Callable[..., App],
) -> None:
    app = app_on()
    queue = unique("deps")
    seen: list[Any] = []

    @app.consumer(queue, queue_type="classic", retries=1, delay=0.05)
    async def handle(
        body: dict[str, int],
        c: Annotated[str, Depends(client)],
        tx: Annotated[tuple[str, int], Depends(transaction)],
        a: object = Depends(fresh),
        b: object = Depends(fresh, use_cache=False),
    ) -> None:
        seen.append((c, tx, a is not b))
        events.append("handler")
        if tx[1] == 1:
            raise RuntimeError("first attempt fails")

    async with app:
        await app.publish({"n": 1}, routing_key=queue)
        await wait_for(lambda: events.count("session-close") == 2)
    assert seen == [("client(db://x)", ("session", 1), True), ("client(db://x)", ("session", 2), True)]
    one_attempt_fails = [
        "settings",  # once, although client and session both ask for it
        "client",
        "session-open",
        "tx-begin",
        "handler",
        ("tx-rollback", "RuntimeError"),
        ("session-saw", "RuntimeError"),
        "session-close",
    ]
    second_succeeds = [
        "settings",
        "client",
        "session-open",
        "tx-begin",
        "handler",
        "tx-commit",
        "session-close",
    ]
    assert events == one_attempt_fails + second_succeeds


def swallowing() -> Iterator[None]:
    try:
        yield
    except Exception:
        events.append("swallowed")  # no re-raise: the attempt fails all the same


async def test_a_teardown_cannot_turn_a_failed_attempt_into_a_success(app_on: Callable[..., App]) -> None:
    app = app_on()
    queue = unique("deps")

    @app.consumer(queue, queue_type="classic")
    async def handle(body: object, _: None = Depends(swallowing)) -> None:
        raise Reject("no")

    async with app:
        await app.publish("x", routing_key=queue)
        parked = await _parked(app, queue)
    assert events == ["swallowed"]
    assert parked[0].reason == "rejected"


async def _parked(app: App, queue: str) -> list[Any]:
    async with asyncio.timeout(10):
        while not (parked := await app.parked(queue)):  # noqa: ASYNC110
            await asyncio.sleep(0.05)
    return parked


def who(app: App) -> str:
    return app.name


async def test_a_handler_in_a_router_gets_the_running_app(app_on: Callable[..., App]) -> None:
    """No import of the app's module: the parameter's annotation is enough, in a dependency too."""
    router = Router()
    queue = unique("app")
    got: list[Any] = []

    @router.consumer(queue, queue_type="classic")
    async def handle(body: object, app: App, name: Annotated[str, Depends(who)]) -> None:
        got.append((app, name))

    app = app_on()
    app.include_router(router)
    async with app:
        await app.publish("x", routing_key=queue)
        await wait_for(lambda: bool(got))
    assert got == [(app, app.name)]


def needs_something(thing: int) -> int:
    return thing


def loop_a(b: int = Depends(lambda: 1)) -> int:
    return b


def test_bad_declarations_fail_when_the_decorator_runs() -> None:
    app = App("deps", url="memory://")
    with pytest.raises(ConfigError, match="'thing' has no default"):

        @app.consumer("q1")
        async def one(body: object, x: int = Depends(needs_something)) -> None:
            pass

    with pytest.raises(ConfigError, match="'other' has no default"):

        @app.consumer("q2")
        async def two(body: object, other: int) -> None:
            pass

    with pytest.raises(ConfigError, match="expected a function"):
        Depends(42)  # type: ignore[arg-type]

    def cyclic(x: int = Depends(lambda: 0)) -> int:
        return x

    cyclic.__defaults__ = (Depends(cyclic),)
    with pytest.raises(ConfigError, match="depends on itself"):

        @app.consumer("q3")
        async def three(body: object, x: int = Depends(cyclic)) -> None:
            pass

    assert app.consumers == ()


def test_a_handler_without_dependencies_takes_the_plain_path() -> None:
    app = App("deps", url="memory://")

    @app.consumer("q")
    async def plain(body: object, message: Message) -> None:
        pass

    assert app.consumers[0].signature.plain
