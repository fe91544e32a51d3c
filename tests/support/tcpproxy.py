"""A small asyncio TCP proxy that injects network faults, for failover tests.

    async with TcpProxy(target_port=5672) as proxy:
        url = f"amqp://guest:guest@127.0.0.1:{proxy.port}/"
        ...
        proxy.blackhole()   # every socket stays open, no byte moves either way
        proxy.reset()       # RST on every connection, new ones are reset too
        proxy.resume()      # new connections are forwarded again

Modes (``proxy.mode``):

``FORWARD``
    Bytes flow both ways; a client's FIN is passed on as a half-close.
``BLACKHOLE``
    Like a dead host behind a firewall that drops packets: current connections
    stay open but nothing is forwarded in either direction, and no FIN or RST is
    ever sent. New connections are accepted (the kernel completes the TCP
    handshake) and then held silently: no upstream connection is made, so a
    client's AMQP handshake hangs. Bytes already read are held, not dropped.
``RESET``
    Like a crashed node: every current connection is aborted with an RST (to the
    client and to the target) and each new connection is reset right after it
    is accepted.

``resume()`` returns to ``FORWARD`` for new connections. Connections that were
black-holed stay stalled (a client has to notice that they are dead) unless
``resume(heal=True)`` is used, which lets their held bytes through and forwards
them again, as TCP does once a partition heals.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import socket
import struct
from types import TracebackType
from typing import Self

__all__ = ["ProxyMode", "TcpProxy"]

_CHUNK = 64 * 1024
# SO_LINGER on with a zero timeout: close() sends RST instead of FIN.
_LINGER_RST = struct.pack("ii", 1, 0)


class ProxyMode(enum.Enum):
    FORWARD = "forward"
    BLACKHOLE = "blackhole"
    RESET = "reset"


def _abort(writer: asyncio.StreamWriter | None, *, rst: bool) -> None:
    if writer is None or writer.transport.is_closing():
        return
    if rst:
        sock = writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
    writer.transport.abort()


class _Link:
    """One client connection and, once made, its connection to the target."""

    def __init__(self, client_writer: asyncio.StreamWriter, forwarding: bool) -> None:
        self.client_writer = client_writer
        self.upstream_writer: asyncio.StreamWriter | None = None
        self.gate = asyncio.Event()  # set = bytes may flow
        if forwarding:
            self.gate.set()
        self.aborted = False

    def abort(self, *, rst: bool) -> None:
        self.aborted = True
        self.gate.set()  # wake the pumps so they notice and finish
        _abort(self.client_writer, rst=rst)
        _abort(self.upstream_writer, rst=rst)


class TcpProxy:
    """Forward TCP connections from ``listen_host:port`` to ``target_host:target_port``."""

    def __init__(
        self,
        target_port: int,
        target_host: str = "127.0.0.1",
        *,
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
    ) -> None:
        self._target = (target_host, target_port)
        self._listen_host = listen_host
        self._listen_port = listen_port
        self._port: int | None = None
        self._server: asyncio.Server | None = None
        self._mode = ProxyMode.FORWARD
        self._links: set[_Link] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._accepted = 0
        self._closed = False

    # -------------------------------------------------------------- state --

    @property
    def host(self) -> str:
        """The address the proxy listens on."""
        return self._listen_host

    @property
    def port(self) -> int:
        """The port the proxy listens on (only after ``start()``)."""
        if self._port is None:
            raise RuntimeError("TcpProxy is not started")
        return self._port

    @property
    def target(self) -> tuple[str, int]:
        """``(host, port)`` that connections are forwarded to."""
        return self._target

    @property
    def mode(self) -> ProxyMode:
        return self._mode

    @property
    def active_connections(self) -> int:
        """Client connections currently open through the proxy."""
        return len(self._links)

    @property
    def accepted_connections(self) -> int:
        """Client connections accepted since the proxy started."""
        return self._accepted

    def __repr__(self) -> str:
        where = f"{self._listen_host}:{self._port}" if self._port is not None else "not started"
        return (
            f"<TcpProxy {where} -> {self._target[0]}:{self._target[1]} "
            f"{self._mode.value} active={len(self._links)}>"
        )

    # ---------------------------------------------------------- lifecycle --

    async def start(self) -> int:
        """Start listening; return the port (an ephemeral one if ``listen_port`` was 0)."""
        if self._server is not None or self._closed:
            raise RuntimeError("TcpProxy can only be started once")
        self._server = await asyncio.start_server(self._on_client, self._listen_host, self._listen_port)
        self._port = int(self._server.sockets[0].getsockname()[1])
        return self._port

    async def close(self) -> None:
        """Stop listening and drop every connection. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for link in list(self._links):
            link.abort(rst=False)
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if server is not None:
            await server.wait_closed()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # --------------------------------------------------------------- faults --

    def blackhole(self) -> None:
        """Stop forwarding on every connection, keeping all sockets open."""
        self._mode = ProxyMode.BLACKHOLE
        for link in self._links:
            if not link.aborted:
                link.gate.clear()

    def reset(self) -> None:
        """Abort every current connection with RST; reset new ones until ``resume()``."""
        self._mode = ProxyMode.RESET
        for link in list(self._links):
            link.abort(rst=True)

    def resume(self, *, heal: bool = False) -> None:
        """Forward new connections again; with ``heal=True`` also un-stall black-holed ones."""
        self._mode = ProxyMode.FORWARD
        if heal:
            for link in self._links:
                link.gate.set()

    # ------------------------------------------------------------ plumbing --

    def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # A plain callback that starts our own task: asyncio (3.11) reports a
        # cancelled client_connected_cb task as an error, and close() cancels.
        if self._closed:
            _abort(writer, rst=False)
            return
        self._accepted += 1
        link = _Link(writer, forwarding=self._mode is ProxyMode.FORWARD)
        self._links.add(link)
        task = asyncio.get_running_loop().create_task(self._handle(link, reader))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _handle(self, link: _Link, reader: asyncio.StreamReader) -> None:
        try:
            if self._mode is ProxyMode.RESET:
                link.abort(rst=True)
                return
            await self._serve(link, reader)
        except asyncio.CancelledError:
            link.abort(rst=False)
            raise
        except Exception:
            link.abort(rst=True)
        finally:
            self._links.discard(link)
            # Make sure nothing is left open (no ResourceWarning).
            _abort(link.client_writer, rst=False)
            _abort(link.upstream_writer, rst=False)

    async def _serve(self, link: _Link, client_reader: asyncio.StreamReader) -> None:
        await link.gate.wait()  # a connection accepted while black-holed waits here
        if link.aborted:
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._target)
        except OSError:
            link.abort(rst=True)  # target down: the client sees a reset
            return
        link.upstream_writer = up_writer
        if link.aborted:  # reset() or close() while we were connecting
            _abort(up_writer, rst=True)
            return
        await asyncio.gather(
            self._pump(link, client_reader, up_writer),
            self._pump(link, up_reader, link.client_writer),
        )

    @staticmethod
    async def _pump(link: _Link, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while not link.aborted:
                await link.gate.wait()
                if link.aborted:
                    return
                data = await src.read(_CHUNK)
                # Bytes read while (or just before) black-holing are held here.
                await link.gate.wait()
                if link.aborted:
                    return
                if not data:
                    if dst.can_write_eof() and not dst.transport.is_closing():
                        dst.write_eof()  # pass the half-close on
                    return
                dst.write(data)
                await dst.drain()
        except (ConnectionError, OSError):
            link.abort(rst=True)
