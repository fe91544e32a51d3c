"""rabbitflow inside a web server: an HTTP API that publishes orders, and a consumer that
records them, in one process on one event loop. The service starts and stops with the server's
lifespan — FastAPI's and Starlette's take the same async context manager.

Run it:   pip install fastapi uvicorn
          uvicorn web_api:api --app-dir examples          (a broker on localhost:5672)
          curl -X POST localhost:8000/orders -H 'content-type: application/json' \\
               -d '{"id": 1, "item": "tea", "quantity": 2}'
          curl localhost:8000/orders/1
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI, HTTPException
from pydantic import BaseModel
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from rabbitflow import App


class Order(BaseModel):
    id: int
    item: str
    quantity: int


def create_service(
    url: str | None = None, *, name: str = "shop", queue: str = "shop.orders"
) -> tuple[App, dict[int, Order]]:
    """The rabbitflow service, and what its consumer has recorded (a stand-in for a database)."""
    service = App(name, url=url, graceful_timeout=10)
    recorded: dict[int, Order] = {}

    @service.consumer(queue, exchange=name, routing_key="order.placed", retries=3, delay=[1, 5, 30])
    async def on_placed(order: Order) -> None:  # validated by pydantic, as in FastAPI
        recorded[order.id] = order

    return service, recorded


def lifespan_of(service: App) -> Callable[[Any], contextlib.AbstractAsyncContextManager[None]]:
    """The server's lifespan: rabbitflow connects, declares and consumes before the first request,
    and on shutdown stops taking messages and lets running handlers finish (graceful_timeout)."""

    @contextlib.asynccontextmanager
    async def lifespan(server: Any) -> AsyncIterator[None]:
        async with service:
            yield

    return lifespan


def create_fastapi(url: str | None = None, *, name: str = "shop", queue: str = "shop.orders") -> FastAPI:
    service, recorded = create_service(url, name=name, queue=queue)
    api = FastAPI(title="shop", lifespan=lifespan_of(service))
    api.state.service = service

    @api.post("/orders", status_code=202)
    async def place(order: Order) -> dict[str, int]:
        # Returns once the broker confirmed the message: a 202 means it is safe in a queue.
        await service.publish(order.model_dump(), exchange=name, routing_key="order.placed")
        return {"accepted": order.id}

    @api.get("/orders/{order_id}")
    async def show(order_id: int) -> Order:
        if order_id not in recorded:
            raise HTTPException(404, f"order {order_id} not recorded (yet)")
        return recorded[order_id]

    @api.get("/health")
    async def health() -> JSONResponse:
        report = service.health()
        return JSONResponse({"healthy": report["healthy"]}, status_code=200 if report["healthy"] else 503)

    return api


def create_starlette(url: str | None = None, *, name: str = "shop", queue: str = "shop.orders") -> Starlette:
    service, recorded = create_service(url, name=name, queue=queue)

    async def place(request: Request) -> JSONResponse:
        order = Order.model_validate(await request.json())
        await service.publish(order.model_dump(), exchange=name, routing_key="order.placed")
        return JSONResponse({"accepted": order.id}, status_code=202)

    async def show(request: Request) -> JSONResponse:
        order = recorded.get(int(request.path_params["order_id"]))
        if order is None:
            return JSONResponse({"detail": "not recorded (yet)"}, status_code=404)
        return JSONResponse(order.model_dump())

    routes = [Route("/orders", place, methods=["POST"]), Route("/orders/{order_id:int}", show)]
    server = Starlette(routes=routes, lifespan=lifespan_of(service))
    server.state.service = service
    return server


api = create_fastapi()
