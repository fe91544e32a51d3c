"""Shared fixtures. Integration tests talk to the real RabbitMQ and fail (never skip) without it."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiormq
import pytest

from rabbitflow import App

from .brokers import broker_version  # noqa: F401 - a fixture: the test broker's version
from .helpers import BROKER_URL, Admin, unique


@pytest.fixture(scope="session")
def broker_url() -> str:
    """The broker's URL, after checking it answers: a missing broker fails the test loudly."""

    async def probe() -> None:
        connection = await asyncio.wait_for(aiormq.connect(BROKER_URL), 10)
        await connection.close()

    try:
        asyncio.run(probe())
    except Exception as exc:
        pytest.fail(
            f"RabbitMQ is not reachable at {BROKER_URL.split('@')[-1]} ({exc!r}); start it with "
            "`rabbitmq-server -detached` (or `make broker`)",
            pytrace=False,
        )
    return BROKER_URL


@pytest.fixture
async def admin(broker_url: str) -> AsyncIterator[Admin]:
    connection = await aiormq.connect(broker_url)
    channel = await connection.channel()
    helper = Admin(channel)
    yield helper
    cleanup = await connection.channel()
    for queue in helper.queues:
        await cleanup.queue_delete(queue)
    for exchange in helper.exchanges:
        await cleanup.exchange_delete(exchange)
    await connection.close()


@pytest.fixture
def make_app(broker_url: str, admin: Admin) -> Callable[..., App]:
    """A new App with a unique service name; everything its plan declares is deleted afterwards."""
    apps: list[App] = []

    def make(**options: Any) -> App:
        options.setdefault("url", broker_url)
        options.setdefault("graceful_timeout", 5)
        app = App(unique("svc"), **options)
        apps.append(app)
        return app

    yield make  # type: ignore[misc]
    for app in apps:
        admin.forget_app(app)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A test that reaches RabbitMQ (through the `broker_url` fixture, the contract suite's
    "rabbitmq" parameter, or on the 3-node cluster) is `broker`; every other one is `unit` and
    runs alone in seconds (`make test-unit`). A `management` test runs where the broker's
    management API is given (RABBITFLOW_TEST_MANAGEMENT_URL: make test's 4.0.5 phase, whose node
    runs it); elsewhere it is deselected, not skipped."""
    if not os.environ.get("RABBITFLOW_TEST_MANAGEMENT_URL"):
        deselected = [item for item in items if item.get_closest_marker("management") is not None]
        if deselected:
            config.hook.pytest_deselected(items=deselected)
            items[:] = [item for item in items if item not in deselected]
    for item in items:
        fixtures = getattr(item, "fixturenames", ())
        callspec = getattr(item, "callspec", None)
        on_rabbitmq = callspec is not None and "rabbitmq" in callspec.params.values()
        if "broker_url" in fixtures or on_rabbitmq or item.get_closest_marker("cluster") is not None:
            item.add_marker(pytest.mark.broker)
        else:
            item.add_marker(pytest.mark.unit)


def pytest_configure(config: pytest.Config) -> None:
    # pytest-asyncio (1.5) asks for "the current event loop" around each async test; with none
    # set, Python 3.11 makes one, which nobody closes and whose ResourceWarning then fails the
    # next test's setup. Saying "no loop" once makes that ask answer None instead.
    asyncio.set_event_loop(None)
