"""`rabbitflow parked list|show|replay|purge MODULE:APP QUEUE`: the parking lot from a shell.

Thin: each command parses its filters, calls one `Admin` method and prints what it returned.
A progress bar (rich) goes to stderr, and only when stderr is a terminal.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
from collections.abc import Iterator, Sequence
from typing import Any

from rabbitflow.admin import Admin
from rabbitflow.cli.apps import load_app
from rabbitflow.parking.message import Filter, Group, ParkedMessage, WalkResult
from rabbitflow.parking.walk import Progress

__all__ = ["ACTIONS", "add_parked"]

ACTIONS = ("list", "show", "replay", "purge")


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative; give a count >= 0")
    return value


def add_parked(commands: Any, levels: Sequence[str]) -> None:
    parked = commands.add_parser(
        "parked",
        help="list, show, replay or purge the messages a consumer parked",
        description="Work on the parking queue of the consumer of QUEUE (QUEUE.parked). Every "
        "action takes the messages parked when it began, head first; a message parked meanwhile "
        "waits for the next one. Looking (list, show, --dry-run) leaves every message parked, in "
        "its order, however often it is done.",
    )
    actions = parked.add_subparsers(dest="action", required=True, metavar="ACTION")
    helps = {
        "list": "count the parked messages by reason and exception type, and list the first --limit",
        "show": "print one parked message (--id, else the head): body, headers, traceback",
        "replay": "send matching messages back to QUEUE itself (the default exchange, routing key "
        "QUEUE; never the other queues bound where they were first published), without "
        "rabbitflow's headers: they start again at attempt 1. The others stay parked, in order",
        "purge": "delete the matching parked messages; the others stay parked, unchanged",
    }
    for action, text in helps.items():
        sub = actions.add_parser(action, help=text, description=text)
        sub.add_argument(
            "app",
            metavar="MODULE:APP",
            help="the service: a module path or file path, a colon, the App variable (default: app)",
        )
        sub.add_argument("queue", metavar="QUEUE", help="the consumer's queue (its .parked name works too)")
        sub.add_argument("--reason", help="only messages parked for this reason (exhausted, rejected, ...)")
        sub.add_argument(
            "--exception", metavar="TYPE", help="only this exception type (`ValueError` or `mod.Error`)"
        )
        sub.add_argument("--id", dest="message_id", metavar="MESSAGE_ID", help="only this message id")
        sub.add_argument("--json", action="store_true", help="print JSON instead of text")
        if action != "show":
            default = "20" if action == "list" else "all"
            sub.add_argument(
                "--limit",
                type=_count,
                default=20 if action == "list" else None,
                metavar="N",
                help="list at most N messages (groups count them all)"
                if action == "list"
                else f"{action} at most N messages (default: {default})",
            )
        if action in ("replay", "purge"):
            sub.add_argument(
                "--dry-run", action="store_true", help=f"say what would {action}; change nothing"
            )
        sub.add_argument("--url", help="broker URL(s); overrides the app's own")
        sub.add_argument(
            "--timeout",
            type=float,
            metavar="SECONDS",
            help="give up connecting after this (default: the app's)",
        )
        sub.add_argument(
            "--log-level",
            default="error",
            metavar="LEVEL",
            type=str.lower,
            choices=levels,
            help=f"{', '.join(levels)} (default: %(default)s)",
        )
        sub.set_defaults(handler=_parked)


def _parked(args: argparse.Namespace) -> int:
    filter = Filter(reason=args.reason, exception=args.exception, message_id=args.message_id)
    app = load_app(args.app)
    if args.url:
        app.use_url(args.url)
    admin = app.admin()
    if args.timeout is not None:
        admin.budget = args.timeout
    run = {"list": _list, "show": _show, "replay": _change, "purge": _change}[args.action]
    return asyncio.run(run(admin, args, filter))


@contextlib.contextmanager
def _progress(what: str) -> Iterator[Progress | None]:
    if not sys.stderr.isatty():
        yield None
        return
    from rich.console import Console
    from rich.progress import Progress as Bar

    with Bar(console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(what, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, ensure_ascii=False))


def _groups(groups: list[Group]) -> None:
    if not groups:
        return
    rows = [("COUNT", "REASON", "EXCEPTION", "FIRST FAILURE", "LAST FAILURE", "ERROR")]
    rows += [
        (
            str(g.count),
            g.reason or "-",
            g.exception or "-",
            g.first_failure or "-",
            g.last_failure or "-",
            (g.error or "-").splitlines()[0][:80] if g.error else "-",
        )
        for g in groups
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    for row in rows:
        cells = [row[0].rjust(widths[0])] + [row[i].ljust(widths[i]) for i in range(1, 5)]
        print("  ".join([*cells, row[5]]))


async def _list(admin: Admin, args: argparse.Namespace, filter: Filter) -> int:
    with _progress("reading the parking queue") as progress:
        listing = await admin.list_parked(args.queue, filter=filter, limit=args.limit, progress=progress)
    if args.json:
        _print_json(listing.to_json())
        return 0
    groups = f" in {len(listing.groups)} group(s)" if listing.groups else ""
    print(f"{listing.queue}: {listing.total} parked message(s){' matching' if _any(filter) else ''}{groups}")
    _groups(listing.groups)
    if listing.messages:
        print(f"\nthe first {len(listing.messages)}, head first:")
        ids = max(len(m.message_id or "-") for m in listing.messages)
        reasons = max(len(m.reason or "-") for m in listing.messages)
        for m in listing.messages:
            error = (
                f"  {m.exception.rpartition('.')[2] or '-'}: {m.error.splitlines()[0][:80]}"
                if m.error
                else ""
            )
            print(
                f"  #{m.position:<4} {(m.message_id or '-').ljust(ids)}  {(m.reason or '-').ljust(reasons)}"
                f"  attempts={m.attempts}{error}"
            )
    return 0


def _any(filter: Filter) -> bool:
    return any(v is not None for v in (filter.reason, filter.exception, filter.message_id))


async def _show(admin: Admin, args: argparse.Namespace, filter: Filter) -> int:
    message = await admin.show_parked(args.queue, filter=filter)
    if message is None:
        which = f"matching {_describe(filter)}" if _any(filter) else "at all"
        print(f"rabbitflow: no message parked for {args.queue!r} {which}", file=sys.stderr)
        return 1
    if args.json:
        _print_json(message.details())
        return 0
    _print_message(message)
    return 0


def _describe(filter: Filter) -> str:
    parts = [("--reason", filter.reason), ("--exception", filter.exception), ("--id", filter.message_id)]
    return " ".join(f"{flag} {value}" for flag, value in parts if value is not None)


def _print_message(m: ParkedMessage) -> None:
    details = m.details()
    fields = [
        ("message id", m.message_id or "-"),
        ("position", str(m.position)),
        ("reason", m.reason or "-"),
        ("attempts", str(m.attempts)),
        ("exception", m.exception or "-"),
        ("error", m.error or "-"),
        ("first failure", m.first_failure or "-"),
        ("last failure", m.last_failure or "-"),
        ("content type", m.content_type or "-"),
    ]
    if m.undecodable:
        fields.append(("undecodable", f"{m.undecodable} (kept as it came, byte for byte)"))
    for name, value in fields:
        print(f"{name + ':':<15}{value}")
    origin = details["origin"]
    if origin:
        print("came from:")
        for key, value in origin.items():
            name = "correlation id" if key == "correlation_id" else key.removeprefix("x-rf-")
            print(f"  {name}: {value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)}")
    print("headers:")
    for key, value in details["headers"].items():
        if key != "x-rf-traceback":
            print(f"  {key}: {json.dumps(value, ensure_ascii=False)}")
    print(f"body ({len(m.body)} bytes, {details['body_encoding']}):")
    print(f"  {details['body']}")
    if m.traceback:
        print("traceback:")
        for line in m.traceback.rstrip().splitlines():
            print(f"  {line}")


async def _change(admin: Admin, args: argparse.Namespace, filter: Filter) -> int:
    replay = args.action == "replay"
    method = admin.replay_parked if replay else admin.purge_parked
    with _progress("replaying" if replay else "purging") as progress:
        outcome = await method(
            args.queue, filter=filter, limit=args.limit, dry_run=args.dry_run, progress=progress
        )
    if args.json:
        _print_json(_outcome_json(outcome))
        return 0
    verb = (
        ("would replay" if replay else "would remove")
        if outcome.dry_run
        else ("replayed" if replay else "removed")
    )
    target = f" to {outcome.queue.removesuffix('.parked')}" if replay else ""
    print(f"{verb} {outcome.done} of {outcome.found} parked message(s){target}")
    _groups(outcome.groups)
    if outcome.skipped:
        print(f"skipped {outcome.skipped}: not matching {_describe(filter)}; still parked, in their order")
    rest = outcome.left - outcome.skipped if not outcome.dry_run else 0
    if rest > 0:
        print(f"{rest} more beyond --limit {args.limit}: still parked")
    return 0


def _outcome_json(o: WalkResult) -> dict[str, Any]:
    return {
        "queue": o.queue,
        "found": o.found,
        "done": o.done,
        "skipped": o.skipped,
        "left": o.left,
        "dry_run": o.dry_run,
        "groups": [g.to_json() for g in o.groups],
    }
