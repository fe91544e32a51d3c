"""The command line: import `module:app`, configure logging, call the library."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import importlib.util
import logging
import os
import sys
from pathlib import Path

from .app import App
from .cli_parked import add_parked, old_parked_form
from .errors import RabbitflowError
from .supervisor import WORKER_ENV, Supervisor
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


LEVELS = ["debug", "debug-all", "info", "warning", "error"]
# The client libraries' loggers: at DEBUG aiormq logs every frame. `--log-level debug` keeps them
# at WARNING; `debug-all` (or RABBITFLOW_DEBUG_ALL=1) lets them through.
_CLIENT_LOGGERS = ("aiormq", "aio_pika", "pamqp")


def configure_logging(level: str, *, worker: str | None = None, clients: int = logging.WARNING) -> None:
    """Log lines to stderr, passwords masked; under `--workers N` each names its worker
    (`worker=2 pid=4711`; the supervisor's own say `worker=main`). The client libraries log at
    `clients` and above, unless the level is `debug-all`."""
    level = level.lower()
    everything = level == "debug-all" or os.environ.get("RABBITFLOW_DEBUG_ALL") == "1"
    who = f"worker={worker} pid=%(process)d " if worker is not None else ""
    handler = logging.StreamHandler()
    handler.setFormatter(_MaskingFormatter(f"%(asctime)s %(levelname)-7s {who}%(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel("DEBUG" if level == "debug-all" else level.upper())
    for name in _CLIENT_LOGGERS:
        logging.getLogger(name).setLevel(logging.NOTSET if everything else clients)


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
    """N worker processes kept running (supervisor.py). The URL goes to them in the environment:
    a command line is visible to every user in `ps`."""
    load_app(args.app)  # a module that cannot load fails here, once, not in N restarting workers
    command = [sys.executable, "-m", "rabbitflow", "run", args.app, "--log-level", args.log_level]
    env = dict(os.environ)
    if args.url:
        command.append("--url-from-env")
        env["RABBITFLOW_URL"] = args.url
    return Supervisor(command, args.workers, env).run()


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
        type=str.lower,
        choices=LEVELS,
        help="debug (rabbitflow's own DEBUG lines; aiormq, aio_pika and pamqp stay at WARNING), "
        "debug-all (theirs too, every frame), info (default), warning or error",
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
    topo.add_argument("--log-level", default="warning", metavar="LEVEL", type=str.lower, choices=LEVELS)
    topo.set_defaults(handler=_topology)

    add_parked(commands, load_app, LEVELS)
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(old_parked_form(sys.argv[1:] if argv is None else argv))
    worker = os.environ.get(WORKER_ENV) if args.command == "run" else None
    if args.command == "run" and args.workers < 1:
        raise SystemExit("rabbitflow: --workers must be at least 1")
    if args.command == "run" and args.workers > 1:
        worker = "main"
    # An operator command ends with one line saying what failed; aiormq's own would repeat it.
    clients = logging.CRITICAL if args.command == "parked" else logging.WARNING
    configure_logging(args.log_level, worker=worker, clients=clients)
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
