"""`/health` and `/metrics` (SPEC §6): real HTTP requests to `serve`, and the ASGI app called as
a server would, against an app on RabbitMQ."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, MutableMapping
from typing import Any

import orjson
from prometheus_client import CollectorRegistry

from rabbitflow import App
from rabbitflow.http import health_app, metrics_and_health, serve
from rabbitflow.prometheus import PrometheusMiddleware

from .helpers import unique, wait_for


async def get(port: int, path: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    """One request with urllib, in a thread (as a scraper would send it)."""

    def fetch() -> tuple[int, dict[str, str], bytes]:
        request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return response.status, dict(response.headers), response.read()
        except urllib.error.HTTPError as error:
            return error.code, dict(error.headers), error.read()

    return await asyncio.to_thread(fetch)


async def test_the_server_answers_health_and_metrics_for_a_running_app(make_app: Callable[..., App]) -> None:
    metrics = PrometheusMiddleware(CollectorRegistry())
    app = make_app(middleware=[metrics])
    metrics.bind(app)
    queue = unique("http")
    handled: list[int] = []

    @app.consumer(queue, queue_type="classic")
    async def handle(body: dict[str, int]) -> None:
        handled.append(body["n"])

    async with await serve(app, 0, host="127.0.0.1") as server:
        status, _, body = await get(server.port, "/health")
        assert status == 503  # not started yet
        assert orjson.loads(body)["state"] == "unopened"

        async with app:
            await app.publish({"n": 1}, routing_key=queue)
            await wait_for(lambda: handled == [1])
            status, headers, body = await get(server.port, "/health")
            assert status == 200
            assert headers["content-type"] == "application/json"
            report = orjson.loads(body)
            assert report["healthy"] is True
            assert [c["queue"] for c in report["consumers"]] == [queue]

            status, headers, body = await get(server.port, "/metrics")
            assert status == 200
            assert headers["content-type"].startswith("text/plain; version=")
            text = body.decode()
            labels = f'app_name="{app.name}",broker="rabbitmq",handler="{queue}"'
            assert f"rabbitflow_received_messages_total{{{labels}}} 1.0" in text
            assert f'rabbitflow_consumer_subscribed{{app_name="{app.name}",queue="{queue}"}} 1.0' in text

            status, _, body = await get(server.port, "/health", method="HEAD")
            assert (status, body) == (200, b"")
            assert (await get(server.port, "/nope"))[0] == 404
            status, headers, _ = await get(server.port, "/health", method="POST")
            assert (status, headers["allow"]) == (405, "GET, HEAD")

        status, _, body = await get(server.port, "/health?verbose=1")
        assert status == 503  # stopped
        assert orjson.loads(body)["state"] == "closed"
    # Closed: nothing listens there any more.
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", server.port)
    except OSError:
        pass
    else:
        writer.close()
        raise AssertionError("the server still accepts connections after close()")


async def test_a_request_that_is_not_http_gets_a_400_and_a_closed_connection(
    make_app: Callable[..., App],
) -> None:
    server = await serve(make_app(), 0, host="127.0.0.1")
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"hello\r\n\r\n")
        answer = await asyncio.wait_for(reader.read(), 5)  # to EOF: the server closes
        writer.close()
    finally:
        await server.close()
    assert answer.startswith(b"HTTP/1.1 400 Bad Request\r\n")


async def call(
    asgi: Any, path: str, method: str = "GET", root_path: str = ""
) -> tuple[int, dict[bytes, bytes], bytes]:
    """The ASGI app called as a server calls it."""
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": method, "path": path, "root_path": root_path, "headers": []}
    await asgi(scope, receive, send)
    start, body = sent
    assert start["type"] == "http.response.start"
    return start["status"], dict(start["headers"]), body["body"]


async def test_the_asgi_app_serves_the_same_under_a_prefix(make_app: Callable[..., App]) -> None:
    registry = CollectorRegistry()
    metrics = PrometheusMiddleware(registry)
    app = make_app(middleware=[metrics])
    metrics.bind(app)
    queue = unique("http")

    @app.consumer(queue, queue_type="classic")
    async def handle(body: object) -> None: ...

    asgi = metrics_and_health(app)
    assert (await call(asgi, "/health"))[0] == 503
    async with app:
        status, headers, body = await call(asgi, "/health")
        assert status == 200
        assert orjson.loads(body)["consumers"][0]["queue"] == queue
        assert headers[b"content-length"] == str(len(body)).encode()
        status, _, body = await call(asgi, "/ops/metrics", root_path="/ops")
        assert status == 200
        assert f'rabbitflow_consumer_subscribed{{app_name="{app.name}",queue="{queue}"}} 1.0' in body.decode()
        # The health-only app has no /metrics.
        assert (await call(health_app(app), "/metrics"))[0] == 404
        assert (await call(health_app(app), "/health"))[0] == 200


async def test_the_asgi_app_answers_a_lifespan() -> None:
    asgi = metrics_and_health(App("svc", url="memory://"))
    inbox = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
    sent: list[MutableMapping[str, Any]] = []

    async def receive() -> MutableMapping[str, Any]:
        return inbox.pop(0)

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message)

    await asgi({"type": "lifespan"}, receive, send)
    assert sent == [{"type": "lifespan.startup.complete"}, {"type": "lifespan.shutdown.complete"}]


def test_metrics_without_prometheus_client_is_a_501() -> None:
    code = """
import asyncio, sys
sys.modules["prometheus_client"] = None  # as if not installed
from rabbitflow import App
from rabbitflow.http import metrics_and_health

async def main():
    sent = []
    async def receive(): return {"type": "http.request"}
    async def send(message): sent.append(message)
    scope = {"type": "http", "method": "GET", "path": "/metrics", "headers": []}
    await metrics_and_health(App("svc", url="memory://"))(scope, receive, send)
    print(sent[0]["status"], sent[1]["body"].decode().strip())

asyncio.run(main())
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "501 metrics need prometheus-client: pip install 'rabbitflow[prometheus]'"


async def _raw(port: int, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        async with asyncio.timeout(3):
            return await reader.read()
    finally:
        writer.close()
        await writer.wait_closed()


async def test_the_server_reads_absolute_form_targets_and_bare_lf_requests() -> None:
    """A client speaking to a proxy sends `GET http://host/health`; a hand-typed or minimal client
    ends its lines with a bare LF (RFC 9112 lets a server accept both): both get the answer."""
    app = App(unique("svc"), url="amqp://guest:guest@127.0.0.1:1/")  # not started: 503, unopened
    async with await serve(app, 0, host="127.0.0.1") as server:
        for request in (
            b"GET http://127.0.0.1/health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
            b"GET https://example.org:9000/health?verbose=1 HTTP/1.1\r\nHost: x\r\n\r\n",
            b"GET /health HTTP/1.1\nHost: 127.0.0.1\n\n",
            b"GET http://127.0.0.1/health HTTP/1.0\n\n",
        ):
            answer = await _raw(server.port, request)
            head, _, body = answer.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 503 "), (request, answer)
            assert orjson.loads(body)["state"] == "unopened"
        answer = await _raw(server.port, b"GET http://127.0.0.1/nothing HTTP/1.1\n\n")
        assert answer.startswith(b"HTTP/1.1 404 ")
