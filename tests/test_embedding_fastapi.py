"""examples/web_api.py on the real broker: rabbitflow runs inside FastAPI's and Starlette's
lifespan, on the server's event loop, and stops with it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from web_api import create_fastapi, create_starlette

from rabbitflow import App

from .helpers import Admin, unique


@asynccontextmanager
async def serving(server: Starlette) -> AsyncIterator[httpx.AsyncClient]:
    """What an ASGI server does: enter the app's lifespan, serve requests, exit the lifespan."""
    async with server.router.lifespan_context(server):
        transport = httpx.ASGITransport(app=server)
        async with httpx.AsyncClient(transport=transport, base_url="http://shop") as client:
            yield client


async def wait_recorded(client: httpx.AsyncClient, order_id: int, timeout: float = 15) -> httpx.Response:
    async with asyncio.timeout(timeout):
        while (response := await client.get(f"/orders/{order_id}")).status_code == 404:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
    return response


@pytest.mark.parametrize("create", [create_fastapi, create_starlette], ids=["fastapi", "starlette"])
async def test_an_order_posted_over_http_is_consumed_by_the_embedded_service(
    create: Callable[..., Starlette], broker_url: str, admin: Admin
) -> None:
    server = create(broker_url, name=unique("shop"), queue=unique("orders"))
    service: App = server.state.service
    admin.forget_app(service)
    order: dict[str, Any] = {"id": 7, "item": "tea", "quantity": 2}
    assert not service.health()["healthy"]  # nothing runs before the server starts

    async with serving(server) as client:
        assert service.health()["healthy"]
        placed = await client.post("/orders", json=order)
        assert placed.status_code == 202, placed.text
        assert placed.json() == {"accepted": 7}
        assert (await wait_recorded(client, 7)).json() == order
        assert (await client.get("/orders/8")).status_code == 404
        [consumer] = service.health()["consumers"]
        assert consumer["subscribed"]

    assert not service.health()["healthy"]  # stopped with the server
    assert await admin.count(service.plan.consumers[0].queue) == 0  # the message was acked


async def test_fastapi_reports_the_embedded_service_health(broker_url: str, admin: Admin) -> None:
    server = create_fastapi(broker_url, name=unique("shop"), queue=unique("orders"))
    admin.forget_app(server.state.service)
    async with serving(server) as client:
        response = await client.get("/health")
    assert (response.status_code, response.json()) == (200, {"healthy": True})
