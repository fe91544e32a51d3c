"""`/health` and `/metrics` over HTTP: an ASGI app to mount in a web server, and a small server
of its own for `rabbitflow run --http-port`.

- `/health`: `app.health()` as JSON; 200 when `healthy`, else 503.
- `/metrics`: the Prometheus text of `registry` (by default: the registry of the app's
  `PrometheusMiddleware`, else prometheus-client's global one); 501 without prometheus-client.

Both read the app on the event loop that runs it. Standard library only (prometheus-client
when installed): no web framework needed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import orjson

if TYPE_CHECKING:
    from rabbitflow.app import App

__all__ = ["HttpServer", "health_app", "metrics_and_health", "serve"]

log = logging.getLogger("rabbitflow.http")

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
Response = tuple[int, list[tuple[bytes, bytes]], bytes]

_JSON = b"application/json"
_TEXT = b"text/plain; charset=utf-8"
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            501: "Not Implemented", 503: "Service Unavailable"}  # fmt: skip
_MAX_REQUEST = 8192  # bytes of request line and headers read before giving up
_READ_TIMEOUT = 5.0


class _Endpoints:
    """What each path answers: one place for the ASGI app and the server."""

    def __init__(self, app: App, registry: Any = None, *, metrics: bool = True) -> None:
        self.app = app
        self.metrics = metrics
        self._registry = registry

    def respond(self, method: str, path: str) -> Response:
        if path not in ("/health", "/metrics") or (path == "/metrics" and not self.metrics):
            return _plain(404, b"not found: try /health or /metrics\n")
        if method not in ("GET", "HEAD"):
            status, headers, body = _plain(405, b"only GET and HEAD\n")
            return status, [*headers, (b"allow", b"GET, HEAD")], body
        return self.health() if path == "/health" else self.prometheus()

    def health(self) -> Response:
        report = self.app.health()
        body = orjson.dumps(report, default=repr, option=orjson.OPT_NON_STR_KEYS)
        return (200 if report.get("healthy") else 503), [(b"content-type", _JSON)], body

    def prometheus(self) -> Response:
        try:
            from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
        except ImportError:
            return _plain(501, b"metrics need prometheus-client: pip install 'rabbitflow[prometheus]'\n")
        registry = self._registry if self._registry is not None else _registry_of(self.app)
        return 200, [(b"content-type", CONTENT_TYPE_LATEST.encode())], generate_latest(registry)


def _registry_of(app: App) -> Any:
    """The registry of the app's PrometheusMiddleware, else prometheus-client's global one."""
    from rabbitflow.middleware.prometheus import PrometheusMiddleware

    for middleware in app.middleware:
        if isinstance(middleware, PrometheusMiddleware):
            return middleware.registry
    from prometheus_client import REGISTRY

    return REGISTRY


def _plain(status: int, text: bytes) -> Response:
    return status, [(b"content-type", _TEXT)], text


# -- ASGI -----------------------------------------------------------------------------------------


def metrics_and_health(app: App, registry: Any = None) -> ASGIApp:
    """An ASGI app serving `/health` and `/metrics` for `app` (mount it, e.g. at `/ops`, in the
    web server the service runs in). `registry`: a `prometheus_client.CollectorRegistry`, by
    default the one of the app's `PrometheusMiddleware`, else the global one."""
    return _asgi(_Endpoints(app, registry))


def health_app(app: App) -> ASGIApp:
    """An ASGI app serving `/health` only."""
    return _asgi(_Endpoints(app, metrics=False))


def _asgi(endpoints: _Endpoints) -> ASGIApp:
    async def asgi(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            # Served on its own: nothing to start (the service's lifespan starts the App).
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            raise RuntimeError(f"rabbitflow.http serves HTTP, not {scope['type']!r}")
        # Mounted under a prefix: the path past it (servers differ on whether `path` has it).
        root, path = scope.get("root_path", ""), scope["path"]
        if root and path.startswith(root):
            path = path[len(root) :] or "/"
        status, headers, body = endpoints.respond(scope["method"], path)
        headers = [*headers, (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else body})

    return asgi


# -- a server of its own --------------------------------------------------------------------------


class HttpServer:
    """A small HTTP/1.1 server for `/health` and `/metrics`: GET and HEAD, one request per
    connection (closed after the response).

        async with HttpServer(app, 9000):  # or: server = await serve(app, 9000) ... await server.close()
            await app.serve()
    """

    def __init__(self, app: App, port: int, host: str = "0.0.0.0", registry: Any = None) -> None:
        self.host = host
        self.port = port  # the bound port once started (useful with port=0)
        self._endpoints = _Endpoints(app, registry)
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._connection, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        """Stop listening and end the connections still open."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for task in list(self._connections):
            task.cancel()
        if self._connections:
            await asyncio.wait(set(self._connections))
        await server.wait_closed()

    async def __aenter__(self) -> HttpServer:
        if self._server is None:
            await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            response = await self._read(reader)
            if response is not None:
                writer.write(response)
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except Exception:
            log.exception("http: answering a request failed")
        finally:
            self._connections.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _read(self, reader: asyncio.StreamReader) -> bytes | None:
        try:
            async with asyncio.timeout(_READ_TIMEOUT):
                head = await _head(reader)
        except (TimeoutError, asyncio.IncompleteReadError):
            return None
        except (asyncio.LimitOverrunError, ValueError):
            return _encode("GET", _plain(400, b"request too large\n"))
        if head is None:
            return _encode("GET", _plain(400, b"request too large\n"))
        try:
            method, target, _version = head.split(b"\n", 1)[0].decode("latin-1").split()
        except ValueError:
            return _encode("GET", _plain(400, b"bad request line\n"))
        return _encode(method, self._endpoints.respond(method, _path(target)))


async def _head(reader: asyncio.StreamReader) -> bytes | None:
    """The request line and headers, up to the empty line; lines may end in CRLF or, as RFC 9112
    lets a server accept, a bare LF. None when longer than `_MAX_REQUEST`."""
    head = b""
    while True:
        line = await reader.readline()
        if not line:
            raise asyncio.IncompleteReadError(head, None)
        head += line
        if len(head) > _MAX_REQUEST:
            return None
        if line in (b"\r\n", b"\n") and head != line:
            return head


def _path(target: str) -> str:
    """The path of a request target: origin-form (`/health?x`) or absolute-form
    (`http://host/health`, what a client talking to a proxy sends)."""
    if "://" in target.split("?", 1)[0]:
        target = urlsplit(target).path or "/"
    return target.split("?", 1)[0]


def _encode(method: str, response: Response) -> bytes:
    status, headers, body = response
    lines = [f"HTTP/1.1 {status} {_REASONS.get(status, '')}".encode()]
    lines += [name + b": " + value for name, value in headers]
    lines += [b"content-length: " + str(len(body)).encode(), b"connection: close", b"", b""]
    return b"\r\n".join(lines) + (b"" if method == "HEAD" else body)


async def serve(app: App, port: int, host: str = "0.0.0.0", registry: Any = None) -> HttpServer:
    """Start serving `/health` and `/metrics` for `app` on `host:port` (port 0: any free one,
    then `server.port`); returns the running server: `await server.close()` stops it, and it is
    an async context manager too. `registry` as for `metrics_and_health`."""
    server = HttpServer(app, port, host, registry)
    await server.start()
    return server
