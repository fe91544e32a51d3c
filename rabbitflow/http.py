"""A service over HTTP: `/health` and `/metrics` as an ASGI app to mount in a web server, and the
one small HTTP/1.1 server of `rabbitflow run --http-port`, which serves them and, given one, the
operator console at `/console` (`rabbitflow.console`).

- `/health`: `app.health()` as JSON; 200 when `healthy`, else 503.
- `/metrics`: the Prometheus text of `registry` (by default: the registry of the app's
  `PrometheusMiddleware`, else prometheus-client's global one); 501 without prometheus-client.

Everything reads the app on the event loop that runs it. Standard library only
(prometheus-client when installed): no web framework needed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

import orjson

if TYPE_CHECKING:
    from rabbitflow.app import App

__all__ = ["HttpServer", "health_app", "metrics_and_health", "serve", "service_app"]

log = logging.getLogger("rabbitflow.http")

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
Response = tuple[int, list[tuple[bytes, bytes]], bytes]

_JSON = b"application/json"
_TEXT = b"text/plain; charset=utf-8"
_REASONS = {200: "OK", 303: "See Other", 400: "Bad Request", 403: "Forbidden", 404: "Not Found",
            405: "Method Not Allowed", 413: "Content Too Large", 500: "Internal Server Error",
            501: "Not Implemented", 503: "Service Unavailable"}  # fmt: skip
_MAX_HEAD = 16 * 1024  # bytes of request line and headers read before giving up
_MAX_BODY = 64 * 1024  # a console form; nothing else takes a body
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


def service_app(app: App, console: ASGIApp | None = None, registry: Any = None) -> ASGIApp:
    """`/console...` to `console` (mounted there) when given; every other path to `/health` and
    `/metrics`."""
    endpoints = metrics_and_health(app, registry)
    if console is None:
        return endpoints

    async def route(scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] == "http" and (path == "/console" or path.startswith("/console/")):
            await console({**scope, "root_path": scope.get("root_path", "") + "/console"}, receive, send)
        else:
            await endpoints(scope, receive, send)

    return route


# -- a server of its own --------------------------------------------------------------------------


class HttpServer:
    """A small HTTP/1.1 server for an ASGI app: GET, HEAD and POST, one request per connection
    (closed after the response), a bounded head and body. Enough for a scraper and an operator's
    browser, without a web server dependency.

        async with HttpServer(service_app(app), 9000):  # or: server = await serve(app, 9000)
            await app.serve()
    """

    def __init__(self, asgi: ASGIApp, port: int, host: str = "127.0.0.1") -> None:
        self.asgi = asgi
        self.host = host
        self.port = port  # the bound port once started (useful with port=0)
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
            await self._exchange(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError):
            pass
        except Exception:
            log.exception("http: answering a request failed")
        finally:
            self._connections.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _exchange(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(_READ_TIMEOUT):
                head = await _head(reader)
        except (asyncio.LimitOverrunError, ValueError):
            head = None
        if head is None:
            await _write(writer, *_plain(400, b"request too large\n"))
            return
        lines = head.decode("latin-1").replace("\r\n", "\n").split("\n")
        try:
            method, target, _version = lines[0].split()
        except ValueError:
            await _write(writer, *_plain(400, b"bad request line\n"))
            return
        headers = []
        for line in lines[1:]:
            if not line:
                continue
            name, sep, value = line.partition(":")
            if not sep:
                await _write(writer, *_plain(400, b"bad header line\n"))
                return
            headers.append((name.strip().lower().encode("latin-1"), value.strip().encode("latin-1")))
        length = next((v for n, v in headers if n == b"content-length"), b"0")
        if not length.isdigit() or int(length) > _MAX_BODY:
            await _write(writer, *_plain(413 if length.isdigit() else 400, b"bad or too large body\n"))
            return
        async with asyncio.timeout(_READ_TIMEOUT):
            body = await reader.readexactly(int(length)) if int(length) else b""
        path, _, query = _origin(target).partition("?")
        peer, sock = writer.get_extra_info("peername"), writer.get_extra_info("sockname")
        scope: Scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "method": method.upper(),
            "scheme": "http",
            "path": unquote(path),
            "raw_path": path.encode("latin-1"),
            "query_string": query.encode("latin-1"),
            "root_path": "",
            "headers": headers,
            "client": (peer[0], peer[1]) if isinstance(peer, tuple) else None,
            "server": (sock[0], sock[1]) if isinstance(sock, tuple) else None,
        }
        received = False

        async def receive() -> MutableMapping[str, Any]:
            nonlocal received
            if received:
                return {"type": "http.disconnect"}
            received = True
            return {"type": "http.request", "body": body, "more_body": False}

        response: dict[str, Any] = {"status": 500, "headers": [], "body": []}

        async def send(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                response["status"], response["headers"] = message["status"], list(message.get("headers", []))
            elif message["type"] == "http.response.body":
                response["body"].append(message.get("body", b""))

        await self.asgi(scope, receive, send)
        content = b"" if scope["method"] == "HEAD" else b"".join(response["body"])
        await _write(writer, response["status"], response["headers"], content)


async def _head(reader: asyncio.StreamReader) -> bytes | None:
    """The request line and headers, up to the empty line; lines may end in CRLF or, as RFC 9112
    lets a server accept, a bare LF. None when longer than `_MAX_HEAD`."""
    head = b""
    while True:
        line = await reader.readline()
        if not line:
            raise asyncio.IncompleteReadError(head, None)
        head += line
        if len(head) > _MAX_HEAD:
            return None
        if line in (b"\r\n", b"\n") and head != line:
            return head


def _origin(target: str) -> str:
    """The origin form (`/health?x`) of a request target, also of the absolute form
    (`http://host/health`, what a client talking to a proxy sends)."""
    if "://" in target.split("?", 1)[0]:
        parts = urlsplit(target)
        return (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return target


async def _write(
    writer: asyncio.StreamWriter, status: int, headers: list[tuple[bytes, bytes]], body: bytes
) -> None:
    lines = [f"HTTP/1.1 {status} {_REASONS.get(status, '')}".encode()]
    lines += [n + b": " + v for n, v in headers if n.lower() not in (b"content-length", b"connection")]
    lines += [b"content-length: " + str(len(body)).encode(), b"connection: close", b"", b""]
    writer.write(b"\r\n".join(lines) + body)
    await writer.drain()


async def serve(
    app: App,
    port: int,
    host: str = "127.0.0.1",
    *,
    console: ASGIApp | None = None,
    registry: Any = None,
) -> HttpServer:
    """Start serving `/health`, `/metrics` and, given a `console` (`rabbitflow.console.console_app`),
    `/console` for `app` on `host:port` (port 0: any free one, then `server.port`; 127.0.0.1
    unless told otherwise); returns the running server: `await server.close()` stops it, and it
    is an async context manager too. `registry` as for `metrics_and_health`."""
    server = HttpServer(service_app(app, console, registry), port, host)
    await server.start()
    return server
