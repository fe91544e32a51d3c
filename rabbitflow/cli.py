"""The command line: import `module:app`, configure logging, call the library."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import importlib.util
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

from .app import App
from .errors import RabbitflowError
from .topology.render import render
from .urls import mask

__all__ = ["load_app", "main"]

log = logging.getLogger("rabbitflow.cli")


def load_app(target: str) -> App:
    """`package.module:app` or `path/to/file.py:app` (`:app` may be omitted)."""
    module_name, _, attr = target.partition(":")
    attr = attr or "app"
    if module_name.endswith(".py") or os.sep in module_name:
        path = Path(module_name).resolve()
        if not path.exists():
            raise SystemExit(f"rabbitflow: no such file {module_name!r}")
        sys.path.insert(0, str(path.parent))
        spec = importlib.util.spec_from_file_location(path.stem, path)
        assert spec is not None
        assert spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[path.stem] = module
        spec.loader.exec_module(module)
    else:
        sys.path.insert(0, os.getcwd())
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            raise SystemExit(f"rabbitflow: cannot import {module_name!r}: {exc}") from None
    app = getattr(module, attr, None)
    if not isinstance(app, App):
        raise SystemExit(f"rabbitflow: {module_name}:{attr} is not a rabbitflow.App")
    return app


class _MaskingFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return mask(super().format(record))


def configure_logging(level: str) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(_MaskingFormatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def _run(args: argparse.Namespace) -> int:
    if args.workers > 1:
        return _run_workers(args)
    app = load_app(args.app)
    if args.url_from_env:  # a worker of `--workers N`: the parent's --url, kept out of `ps`
        app.use_url(os.environ["RABBITFLOW_URL"])
    elif args.url:
        app.use_url(args.url)
    app.run()
    return 0


def _run_workers(args: argparse.Namespace) -> int:
    """N worker processes, each a whole app; signals are passed on, the exit waits for all.
    The URL goes to them in the environment: a command line is visible to every user in `ps`."""
    command = [sys.executable, "-m", "rabbitflow", "run", args.app, "--log-level", args.log_level]
    env = None
    if args.url:
        command.append("--url-from-env")
        env = {**os.environ, "RABBITFLOW_URL": args.url}
    children = [subprocess.Popen(command, env=env) for _ in range(args.workers)]
    log.info("started %d workers: %s", len(children), ", ".join(str(c.pid) for c in children))

    def forward(signum: int, _frame: object) -> None:
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    codes = [child.wait() for child in children]
    return max(codes, default=0)


def _topology(args: argparse.Namespace) -> int:
    app = load_app(args.app)
    if args.url:
        app.use_url(args.url)
    if not (args.check or args.apply):
        print(render(app.plan, args.format))
        return 0
    return asyncio.run(_against_broker(app, check=args.check))


async def _against_broker(app: App, *, check: bool) -> int:
    plan = app.plan
    if not check:
        node = await app.declare()
        print(
            f"declared {len(plan.exchanges)} exchange(s), {len(plan.queues)} queue(s) "
            f"and {len(plan.bindings)} binding(s) on {node}"
        )
        return 0
    report = await app.admin().inspect()
    node, differences = report.node, report.differences
    print(f"{node} runs RabbitMQ {report.server_version or '(version not announced)'}")
    for concern in report.concerns:
        print(f"note: {concern}")
    for difference in differences:
        print(difference)
    if differences:
        print(f"{len(differences)} difference(s) between the plan and {node}")
        return 1
    print(f"{node} matches the plan (exchanges and queues; bindings are not readable over AMQP)")
    return 0


def _parked(args: argparse.Namespace) -> int:
    app = load_app(args.app)
    if args.url:
        app.use_url(args.url)
    if args.replay:
        count = asyncio.run(app.replay(args.queue, limit=args.limit))
        print(f"sent {count} parked message(s) back to {args.queue}")
        return 0
    messages = asyncio.run(app.parked(args.queue, limit=args.limit or 20))
    for m in messages:
        print(f"{m.message_id or '-'}  {m.reason:<14} attempts={m.attempts}  {m.error[:120]}")
    print(f"{len(messages)} parked message(s) shown for {args.queue}")
    return 0


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="rabbitflow",
        description="Run rabbitflow services and inspect their RabbitMQ topology.",
    )
    commands = top.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser(
        "run",
        help="run a service until SIGTERM or Ctrl-C",
        description="Run the App found at MODULE:APP. SIGTERM/SIGINT stop taking messages, "
        "let running handlers finish within graceful_timeout, then close.",
    )
    run.add_argument(
        "app", metavar="MODULE:APP", help="dotted module or file path, and the App's name (default: app)"
    )
    run.add_argument(
        "--url",
        help="broker URL(s), ';'-separated; overrides the app's own. A command line is visible to "
        "every user in `ps`: prefer RABBITFLOW_URL in the environment for a password",
    )
    run.add_argument("--url-from-env", action="store_true", help=argparse.SUPPRESS)
    run.add_argument(
        "--workers", type=int, default=1, metavar="N", help="run N worker processes (default: 1)"
    )
    run.add_argument(
        "--log-level",
        default="INFO",
        metavar="LEVEL",
        choices=["DEBUG", "INFO", "WARNING", "ERROR", "debug", "info", "warning", "error"],
        help="DEBUG, INFO (default), WARNING or ERROR",
    )
    run.set_defaults(handler=_run)

    topo = commands.add_parser(
        "topology",
        help="print, check or declare a service's topology",
        description="Print the exchanges, queues and bindings the service needs (no broker "
        "needed), compare them with a live broker (--check), or declare them (--apply).",
    )
    topo.add_argument("app", metavar="MODULE:APP")
    topo.add_argument("--format", choices=["text", "json", "mermaid"], default="text")
    mode = topo.add_mutually_exclusive_group()
    mode.add_argument(
        "--check", action="store_true", help="report missing objects and differing arguments; change nothing"
    )
    mode.add_argument("--apply", action="store_true", help="declare the plan on the broker")
    topo.add_argument("--url", help="broker URL(s) for --check/--apply")
    topo.add_argument("--log-level", default="WARNING", metavar="LEVEL")
    topo.set_defaults(handler=_topology)

    parked = commands.add_parser(
        "parked",
        help="list a queue's parked messages, or send them back (--replay)",
        description="Show the messages parked for the consumer of QUEUE with their reasons "
        "(they stay parked), or with --replay send them back to QUEUE itself (the default exchange, "
        "routing key QUEUE; never the other queues bound where they were first published), without "
        "rabbitflow's headers: they start again at attempt 1.",
    )
    parked.add_argument("app", metavar="MODULE:APP")
    parked.add_argument("queue", metavar="QUEUE", help="the consumer's queue (not the .parked one)")
    parked.add_argument("--replay", action="store_true", help="send them back instead of listing")
    parked.add_argument("--limit", type=int, metavar="N", help="at most N messages (list: 20)")
    parked.add_argument("--url", help="broker URL(s); overrides the app's own")
    parked.add_argument("--log-level", default="WARNING", metavar="LEVEL")
    parked.set_defaults(handler=_parked)
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command == "run" and args.workers < 1:
        raise SystemExit("rabbitflow: --workers must be at least 1")
    configure_logging(args.log_level)
    try:
        code: int = args.handler(args)
    except RabbitflowError as exc:
        print(f"rabbitflow: {mask(str(exc))}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the output was piped into `head` or similar
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return code


if __name__ == "__main__":
    sys.exit(main())
