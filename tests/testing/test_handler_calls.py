"""The test client records every handler call, and runs requests on the virtual clock."""

from __future__ import annotations

import time

import pytest
from pydantic import BaseModel

from rabbitflow import App, Message, Reject, RequestFailed, RequestTimeout, Retry
from rabbitflow.testing import TestClient


class Quote(BaseModel):
    symbol: str
    price: float


async def test_every_handler_call_is_recorded_with_its_arguments_attempt_and_outcome() -> None:
    app = App("calls", url="memory://")

    @app.consumer("orders", retries=1, delay=30)
    async def handle(order: dict[str, int], message: Message) -> int:
        if message.attempt == 1:
            raise ConnectionError("flaky")
        return order["id"] * 10

    @app.consumer("audit")
    def audit(line: str) -> None:  # a sync handler is recorded the same way
        if line == "bad":
            raise Reject("bad line")

    async with TestClient(app) as client:
        await client.publish({"id": 7}, routing_key="orders")
        await client.publish("ok", routing_key="audit")
        await client.publish("bad", routing_key="audit")
        await client.drain()

    calls = client.calls("orders")
    assert [(c.body, c.attempt, c.ok, c.result, c.time) for c in calls] == [
        ({"id": 7}, 1, False, None, 0.0),
        ({"id": 7}, 2, True, 70, 30.0),
    ]
    assert isinstance(calls[0].exception, ConnectionError)
    client.mock("orders").assert_called_with({"id": 7})
    assert client.mock("orders").call_count == 2
    assert [(c.body, type(c.exception).__name__) for c in client.calls("audit")] == [
        ("ok", "NoneType"),
        ("bad", "Reject"),
    ]
    client.mock("audit").assert_any_call("bad")


async def test_a_request_runs_on_the_virtual_clock_through_a_retry_without_drain() -> None:
    """The handler fails once; its retry waits 60 virtual seconds: the request still completes
    (its 120 s timeout is virtual too), in no real time."""
    app = App("quotes", url="memory://")

    @app.consumer("quotes", retries=2, delay=60)
    async def quote(symbol: str, message: Message) -> Quote:
        if message.attempt == 1:
            raise Retry()
        return Quote(symbol=symbol, price=1.5)

    async with TestClient(app) as client:
        started = time.monotonic()
        reply = await client.request("RBT", routing_key="quotes", timeout=120, response_type=Quote)
        took = time.monotonic() - started
        assert client.now == pytest.approx(60.0)
    assert reply == Quote(symbol="RBT", price=1.5)
    assert took < 2


async def test_a_request_times_out_on_the_virtual_clock() -> None:
    app = App("quotes", url="memory://")

    @app.consumer("quotes", retries=2, delay=600)
    async def quote(symbol: str) -> str:
        raise Retry()

    async with TestClient(app) as client:
        started = time.monotonic()
        with pytest.raises(RequestTimeout, match="virtual"):
            await client.request("RBT", routing_key="quotes", timeout=100)
        assert time.monotonic() - started < 2
        assert client.now == pytest.approx(100.0)


async def test_a_rejected_request_fails_at_once_in_the_test_client() -> None:
    app = App("quotes", url="memory://")

    @app.consumer("quotes")
    async def quote(symbol: str) -> str:
        raise Reject(f"unknown symbol {symbol}")

    async with TestClient(app) as client:
        with pytest.raises(RequestFailed, match="unknown symbol XYZ") as failed:
            await client.request("XYZ", routing_key="quotes", timeout=100)
        assert client.now == 0.0
    assert failed.value.reason == "rejected"
    assert client.parked("quotes")[0].reason == "rejected"
