"""`rabbitflow publish` and `rabbitflow request`: one message from the shell, confirmed.

Each opens a connection of its own (the app's URL or --url; nothing is declared, nothing
consumed), publishes mandatory and persistent, waits for the broker's confirm and, for `request`,
for the reply over direct reply-to. A failure is one line on stderr and an exit code of its own
(EXIT_CODES; docs/operations.md).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import orjson

from rabbitflow.app import App
from rabbitflow.cli.apps import load_app
from rabbitflow.codec import decode
from rabbitflow.errors import (
    ChannelClosed,
    ConnectionFailed,
    LoginRefused,
    PublishNacked,
    RabbitflowError,
    Unroutable,
)
from rabbitflow.transport.base import DIRECT_REPLY_TO, Delivery, Properties
from rabbitflow.urls import mask

__all__ = ["EXIT_CODES", "add_publish", "read_body"]

# Exit codes of `publish` and `request` (argparse's usage errors exit with 2).
EXIT_CODES = {
    "unroutable": 3,  # no queue is bound for the routing key (mandatory publish returned)
    "no-exchange": 4,  # the exchange does not exist (404 NOT_FOUND)
    "login-refused": 5,  # the broker refused the user name or password (ACCESS_REFUSED)
    "unreachable": 6,  # no node answered within the connect budget
    "timeout": 7,  # no confirm (publish) or no reply (request) within --timeout
    "refused": 8,  # the broker nacked the publish, or closed the channel for another reason
}


class Failed(Exception):
    def __init__(self, kind: str, text: str) -> None:
        super().__init__(text)
        self.kind = kind


def read_body(argument: str) -> bytes:
    """BODY as given: text, `@file` (its bytes), or `-` (standard input's bytes)."""
    if argument == "-":
        return sys.stdin.buffer.read()
    if argument.startswith("@"):
        try:
            return Path(argument[1:]).read_bytes()
        except OSError as exc:
            raise SystemExit(
                f"rabbitflow: cannot read the body from {argument[1:]}: {exc.strerror}"
            ) from None
    return argument.encode()


def content_type_of(body: bytes) -> str:
    """application/json for a JSON document, text/plain for other UTF-8 text, else bytes."""
    try:
        orjson.loads(body)
    except orjson.JSONDecodeError:
        try:
            body.decode()
        except UnicodeDecodeError:
            return "application/octet-stream"
        return "text/plain"
    return "application/json"


def _headers(pairs: Sequence[str]) -> dict[str, Any]:
    headers: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"rabbitflow: --header {pair!r}: expected KEY=VALUE")
        headers[key] = value
    return headers


def _destination(args: argparse.Namespace) -> tuple[str, str]:
    if args.queue is not None:
        if args.exchange or args.routing_key is not None:
            raise SystemExit("rabbitflow: --queue goes alone: it publishes to the default exchange")
        return "", args.queue
    if args.routing_key is None:
        raise SystemExit("rabbitflow: say where to: --queue QUEUE, or --exchange EXCHANGE --routing-key KEY")
    return args.exchange or "", args.routing_key


def _where(exchange: str, routing_key: str) -> str:
    return (
        f"queue {routing_key!r}"
        if exchange == ""
        else f"exchange {exchange!r} with routing key {routing_key!r}"
    )


async def _send(app: App, args: argparse.Namespace, *, ask: bool) -> Delivery | None:
    exchange, routing_key = _destination(args)
    body = read_body(args.body)
    properties = Properties(
        content_type=args.content_type or content_type_of(body),
        headers=_headers(args.header) or None,
        delivery_mode=2,
        message_id=args.message_id or uuid.uuid4().hex,
    )
    admin = app.admin()
    admin.budget = min(admin.budget, args.connect_timeout)
    where = _where(exchange, routing_key)
    try:
        async with admin.connection() as transport:
            channel = await transport.channel()
            replies: asyncio.Future[Delivery] = asyncio.get_running_loop().create_future()
            if ask:
                properties.correlation_id = uuid.uuid4().hex
                properties.reply_to = DIRECT_REPLY_TO
                await channel.consume_replies(lambda d: None if replies.done() else replies.set_result(d))
            try:
                async with asyncio.timeout(args.timeout):
                    await channel.publish(
                        body, exchange=exchange, routing_key=routing_key, properties=properties
                    )
                    if not ask:
                        return None
                    return await replies
            except TimeoutError:
                what = "no reply" if ask and not replies.done() else "no confirm"
                raise Failed(
                    "timeout", f"{what} from {transport.node} within {args.timeout}s ({where})"
                ) from None
    except LoginRefused as exc:
        raise Failed("login-refused", str(exc)) from None
    except ConnectionFailed as exc:
        raise Failed("unreachable", str(exc)) from None
    except Unroutable:
        raise Failed("unroutable", f"unroutable: no queue is bound for {where}") from None
    except ChannelClosed as exc:
        if exc.code == 404:
            raise Failed("no-exchange", f"exchange {exchange!r} does not exist ({exc.text})") from None
        raise Failed("refused", f"the broker refused the publish to {where}: {exc}") from None
    except PublishNacked as exc:
        raise Failed("refused", f"{exc} ({where})") from None


def _print_reply(reply: Delivery) -> None:
    try:
        value = decode(reply.body, reply.properties.content_type)
    except RabbitflowError:
        value = reply.body
    if isinstance(value, bytes):
        sys.stdout.buffer.write(value)
        sys.stdout.write("\n")
    elif isinstance(value, str):
        print(value)
    else:
        print(orjson.dumps(value).decode())


def add_publish(commands: Any, levels: Sequence[str]) -> None:
    def handler(ask: bool) -> Callable[[argparse.Namespace], int]:
        def run(args: argparse.Namespace) -> int:
            if args.app is not None:
                app = load_app(args.app)
                if args.url:
                    app.use_url(args.url)
            else:
                app = App("rabbitflow-cli", url=args.url)  # url None: RABBITFLOW_URL, then localhost
            try:
                reply = asyncio.run(_send(app, args, ask=ask))
            except Failed as exc:
                print(f"rabbitflow: {mask(str(exc))}", file=sys.stderr)
                return EXIT_CODES[exc.kind]
            if reply is not None:
                _print_reply(reply)
            elif not args.quiet:
                exchange, routing_key = _destination(args)
                print(f"published to {_where(exchange, routing_key)}, confirmed", file=sys.stderr)
            return 0

        return run

    codes = ", ".join(f"{code} {kind}" for kind, code in EXIT_CODES.items())
    for name, ask, text in (
        ("publish", False, "publish one message and wait for the broker's confirm"),
        ("request", True, "publish a request, wait for its reply (direct reply-to) and print it"),
    ):
        sub = commands.add_parser(
            name,
            help=text,
            description=f"{text[0].upper()}{text[1:]}. Nothing is declared. Exit codes: 0 done, "
            f"{codes}; 1 another error, 2 bad arguments.",
        )
        sub.add_argument(
            "body",
            metavar="BODY",
            help="the body: text, @FILE (the file's bytes) or - (standard input)",
        )
        sub.add_argument(
            "--app", metavar="MODULE:APP", help="use this service's URL (its url= or RABBITFLOW_URL)"
        )
        sub.add_argument("--url", help="the broker URL(s); else the --app's, else RABBITFLOW_URL")
        sub.add_argument("--queue", help="publish to this queue (the default exchange, routing key QUEUE)")
        sub.add_argument("--exchange", default="", help="publish to this exchange (with --routing-key)")
        sub.add_argument("--routing-key", metavar="KEY", help="the routing key")
        sub.add_argument(
            "--header",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="a header (string value); repeat for more",
        )
        sub.add_argument("--message-id", metavar="ID", help="the message id (default: a random one)")
        sub.add_argument(
            "--content-type",
            metavar="TYPE",
            help="default: application/json for a JSON body, text/plain for other text, "
            "application/octet-stream for other bytes",
        )
        sub.add_argument(
            "--timeout",
            type=float,
            default=10.0,
            metavar="SECONDS",
            help="how long to wait for the confirm"
            + (" and the reply" if ask else "")
            + " (default: %(default)s)",
        )
        sub.add_argument(
            "--connect-timeout",
            type=float,
            default=10.0,
            metavar="SECONDS",
            help="how long to keep trying the broker's nodes (default: %(default)s)",
        )
        if not ask:
            sub.add_argument("--quiet", action="store_true", help="print nothing when it was confirmed")
        sub.add_argument(
            "--log-level",
            default="error",
            metavar="LEVEL",
            type=str.lower,
            choices=levels,
            help="log level (default: %(default)s: a failure is the one line that says why)",
        )
        sub.set_defaults(handler=handler(ask), quiet=False)
