"""A small HTTP/1.1 server for an ASGI app, and `serve`: `/health`, `/metrics` and `/console`
on one port for `rabbitflow run --http-port PORT --console`.

One request per connection (closed after the response), GET/HEAD/POST, a bounded head and body:
enough for an operator's browser and a scraper, without a web server dependency. Binds
127.0.0.1 unless told otherwise: the console shows message bodies.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

from rabbitflow.console.application import Console
from rabbitflow.http import metrics_and_health

if TYPE_CHECKING:
    from rabbitflow.app import App

__all__ = ["AsgiServer", "ops_app", "serve"]

log = logging.getLogger("rabbitflow.console")

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_MAX_HEAD = 16 * 1024
_MAX_BODY = 64 * 1024
_READ_TIMEOUT = 10.0
_REASONS = {200: "OK", 303: "See Other", 400: "Bad Request", 403: "Forbidden", 404: "Not Found",
            405: "Method Not Allowed", 413: "Content Too Large", 500: "Internal Server Error",
            501: "Not Implemented", 503: "Service Unavailable"}  # fmt: skip


def ops_app(app: App, console: Console | None, registry: Any = None) -> ASGIApp:
    """`/console...` to the console (mounted there), every other path to `/health` and `/metrics`."""
    ops = metrics_and_health(app, registry)

    async def route(scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if (
            console is not None
            and scope["type"] == "http"
            and (path == "/console" or path.startswith("/console/"))
        ):
            await console({**scope, "root_path": scope.get("root_path", "") + "/console"}, receive, send)
        else:
            await ops(scope, receive, send)

    return route


class AsgiServer:
    """Serves an ASGI app on `host:port` (port 0: any free one, then `.port`)."""

    def __init__(self, asgi: ASGIApp, port: int, host: str = "127.0.0.1") -> None:
        self.asgi = asgi
        self.host = host
        self.port = port
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._connection, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for task in list(self._connections):
            task.cancel()
        if self._connections:
            await asyncio.wait(set(self._connections))
        await server.wait_closed()

    async def __aenter__(self) -> AsgiServer:
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
                head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.LimitOverrunError:
            await _plain(writer, 400, b"request too large\n")
            return
        if len(head) > _MAX_HEAD:
            await _plain(writer, 400, b"request too large\n")
            return
        lines = head.decode("latin-1").split("\r\n")
        try:
            method, target, _version = lines[0].split(" ")
        except ValueError:
            await _plain(writer, 400, b"bad request line\n")
            return
        headers = []
        for line in lines[1:]:
            if not line:
                continue
            name, sep, value = line.partition(":")
            if not sep:
                await _plain(writer, 400, b"bad header line\n")
                return
            headers.append((name.strip().lower().encode("latin-1"), value.strip().encode("latin-1")))
        length = next((v for n, v in headers if n == b"content-length"), b"0")
        if not length.isdigit() or int(length) > _MAX_BODY:
            await _plain(writer, 413 if length.isdigit() else 400, b"bad or too large body\n")
            return
        async with asyncio.timeout(_READ_TIMEOUT):
            body = await reader.readexactly(int(length)) if int(length) else b""
        path, _, query = target.partition("?")
        peer = writer.get_extra_info("peername")
        sock = writer.get_extra_info("sockname")
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
        sent = False

        async def receive() -> MutableMapping[str, Any]:
            nonlocal sent
            if sent:
                return {"type": "http.disconnect"}
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        response: dict[str, Any] = {"status": 500, "headers": [], "body": []}

        async def send(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                response["status"], response["headers"] = message["status"], list(message.get("headers", []))
            elif message["type"] == "http.response.body":
                response["body"].append(message.get("body", b""))

        await self.asgi(scope, receive, send)
        content = b"".join(response["body"])
        if scope["method"] == "HEAD":
            content = b""
        await _write(writer, response["status"], response["headers"], content)


async def _plain(writer: asyncio.StreamWriter, status: int, text: bytes) -> None:
    await _write(writer, status, [(b"content-type", b"text/plain; charset=utf-8")], text)


async def _write(
    writer: asyncio.StreamWriter, status: int, headers: list[tuple[bytes, bytes]], body: bytes
) -> None:
    lines = [f"HTTP/1.1 {status} {_REASONS.get(status, '')}".encode()]
    lines += [
        name + b": " + value
        for name, value in headers
        if name.lower() not in (b"content-length", b"connection")
    ]
    lines += [b"content-length: " + str(len(body)).encode(), b"connection: close", b"", b""]
    writer.write(b"\r\n".join(lines) + body)
    await writer.drain()


async def serve(
    app: App,
    port: int,
    host: str = "127.0.0.1",
    *,
    console: Console | None = None,
    registry: Any = None,
) -> AsgiServer:
    """Start serving `/health`, `/metrics` and (given a `console`) `/console` for `app` on
    `host:port`; returns the running server (`await server.close()`, or `async with`)."""
    server = AsgiServer(ops_app(app, console, registry), port, host)
    await server.start()
    return server
