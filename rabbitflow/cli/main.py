"""The command line: import `module:app`, configure logging, call the library."""

from __future__ import annotations

import argparse
import asyncio
import errno
import json
import logging
import logging.config
import os
import shlex
import signal
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from rabbitflow import __version__
from rabbitflow.app import App
from rabbitflow.cli.apps import load_app, module_directory
from rabbitflow.cli.asyncapi import add_asyncapi
from rabbitflow.cli.parked import add_parked
from rabbitflow.cli.publish import add_publish
from rabbitflow.cli.sql import add_sql
from rabbitflow.cli.workers import EXIT_PORT_TAKEN, PARENT_FD_ENV, WORKER_ENV, Supervisor, follow_parent
from rabbitflow.errors import ConfigError, RabbitflowError
from rabbitflow.logs import ContextFilter, JsonFormatter
from rabbitflow.runtime import loops
from rabbitflow.settings import read_env_file
from rabbitflow.topology.render import render
from rabbitflow.urls import mask

__all__ = ["main", "parser"]

log = logging.getLogger("rabbitflow.cli.main")


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
    console = "actions" if args.console_actions else "read-only" if args.console else None
    if console and args.http_port is None:
        raise SystemExit("rabbitflow: the console is served on --http-port; give one")
    if console == "actions" and not os.environ.get("RABBITFLOW_CONSOLE_TOKEN"):
        raise SystemExit(
            "rabbitflow: --console-actions needs an operator token in RABBITFLOW_CONSOLE_TOKEN "
            "(the environment, never the command line)"
        )
    if args.reload:
        return _run_reloading(args)
    if args.workers > 1:
        return _run_workers(args)
    app = load_app(args.app)
    if args.url_from_env:  # a worker of `--workers N`: the parent's --url, kept out of `ps`
        app.use_url(os.environ["RABBITFLOW_URL"])
    elif args.url:
        app.use_url(args.url)
    loops.chosen(args.loop)  # --loop uvloop without uvloop fails here, with what to do
    if args.http_port is None and not os.environ.get(PARENT_FD_ENV):
        app.run(loop=args.loop)
        return 0
    # Worker N of `--workers` serves on PORT + N - 1: one scrape target per process.
    port = None if args.http_port is None else args.http_port + int(os.environ.get(WORKER_ENV) or 1) - 1
    try:
        loops.run(_serve(app, port, args.http_host, console), args.loop)
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            raise
        log.error("cannot serve HTTP on %s:%s: the port is taken (%s)", args.http_host, port, exc)
        return EXIT_PORT_TAKEN
    return 0


async def _serve(app: App, port: int | None, host: str, console: str | None) -> None:
    """`app.serve()`, under `--workers` stopping when the supervisor goes, with the HTTP server
    of `--http-port` (bound before the app starts: a taken port fails at once)."""
    follow_parent(lambda: os.kill(os.getpid(), signal.SIGTERM))  # app.serve's graceful stop
    if port is None:
        await app.serve()
    else:
        await _serve_with_http(app, port, host, console)


async def _serve_with_http(app: App, port: int, host: str, console: str | None) -> None:
    from rabbitflow.http import serve

    try:
        from rabbitflow.middleware.prometheus import PrometheusMiddleware
    except ImportError:  # no prometheus-client: /metrics answers 501, /health works
        pass
    else:
        if not any(isinstance(m, PrometheusMiddleware) for m in app.middleware):
            metrics = PrometheusMiddleware()  # /metrics is about this app, not only the process
            app.middleware = (*app.middleware, metrics)
            metrics.bind(app)
    panel = None
    if console:
        from rabbitflow.console import Rates, console_app

        if not any(isinstance(m, Rates) for m in app.middleware):
            app.middleware = (*app.middleware, Rates())  # the console's charts, by fate
        # Replay and purge only with --console-actions, behind RABBITFLOW_CONSOLE_TOKEN.
        panel = console_app(app, enable_actions=console == "actions")
    server = await serve(app, port, host, console=panel)
    log.info("serving /health, /metrics%s on %s:%d", " and /console" if panel else "", host, server.port)
    try:
        await app.serve()
    finally:
        await server.close()


def _run_workers(args: argparse.Namespace) -> int:
    """N worker processes kept running (supervisor.py). The URL goes to them in the environment:
    a command line is visible to every user in `ps`."""
    load_app(args.app)  # a module that cannot load fails here, once, not in N restarting workers
    command, env = _child(args)
    return Supervisor(command, args.workers, env).run()


def _child(args: argparse.Namespace) -> tuple[list[str], dict[str, str]]:
    """The command line and environment of a child `rabbitflow run` (a worker, or the service
    under --reload): the URL goes in the environment, since a command line shows in `ps`."""
    command = [sys.executable, "-m", "rabbitflow", "run", args.app, "--log-level", args.log_level]
    command += ["--loop", args.loop]
    if args.http_port is not None:
        command += ["--http-port", str(args.http_port), "--http-host", args.http_host]
    command += ["--console"] * args.console + ["--console-actions"] * args.console_actions
    env = dict(os.environ)
    for name in ("RABBITFLOW_WORKERS", "RABBITFLOW_RELOAD"):  # the child is one plain process
        env.pop(name, None)
    env.update(_log_environment(args))
    if args.url:
        command.append("--url-from-env")
        env["RABBITFLOW_URL"] = args.url
    return command, env


def _run_reloading(args: argparse.Namespace) -> int:
    """The service in a child process, started again whenever a .py file under its module's
    directory changes (watchfiles); the URL goes to the child in the environment, as for workers."""
    try:
        import watchfiles
    except ImportError:
        raise SystemExit("rabbitflow: --reload needs watchfiles: pip install 'rabbitflow[reload]'") from None
    app = load_app(args.app)  # a module that cannot load fails here, before watching
    command, env = _child(args)
    directory = module_directory(args.app)
    log.warning("watching %s for changes to .py files (--reload)", directory)
    os.environ.update(env)  # watchfiles starts the command with this process's environment
    # watchfiles stops on KeyboardInterrupt (it turns SIGTERM into one). A shell's background job
    # starts with SIGINT ignored, and then Python raises none: stop on SIGINT whatever we inherited.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    watchfiles.run_process(
        directory,
        target=shlex.join(command),
        target_type="command",
        watch_filter=watchfiles.PythonFilter(),
        # SIGINT is the service's graceful stop: in-flight handlers get graceful_timeout to finish.
        sigint_timeout=int(app.settings.graceful_timeout) + 5,
        callback=lambda changes: log.warning(
            "restarting: %s changed", ", ".join(sorted({Path(p).name for _, p in changes}))
        ),
    )
    return 0


def _topology(args: argparse.Namespace) -> int:
    app = load_app(args.app)
    if args.url:
        app.use_url(args.url)
    if args.dry_run and not args.delete:
        raise SystemExit("rabbitflow: --dry-run goes with --delete")
    if args.force and not args.delete:
        raise SystemExit("rabbitflow: --force goes with --delete")
    if args.delete:
        return _delete(app, force=args.force, dry_run=args.dry_run)
    if not (args.check or args.apply):
        destinations = {c.queue: c.publish_to for c in app.consumers if c.publish_to is not None}
        print(render(app.plan, args.format, destinations))
        return 0
    management = args.management_url or os.environ.get("RABBITFLOW_MANAGEMENT_URL") or None
    if management and not args.check:
        raise SystemExit("rabbitflow: --management-url goes with --check")
    return asyncio.run(_against_broker(app, check=args.check, management=management))


def _delete(app: App, *, force: bool, dry_run: bool) -> int:
    """The service's queues (consume, retry, parked) and its own `S.dlx`; the exchanges its
    consumers bind to may be shared with other services, and stay (their bindings to the deleted
    queues go with the queues). A dry run asks the broker too, and says what the real run would do."""
    plan = app.plan
    removal = asyncio.run(app.admin().removal(force=force, dry_run=dry_run))
    would = "would " if dry_run else ""
    if removal.refused:
        print(
            f"rabbitflow: {would}delete nothing: queues hold messages: {', '.join(removal.holding)} "
            "(consume or purge them first; --force deletes them with their messages)",
            file=sys.stderr,
        )
        return 1
    roles = {q.name: q.role for q in plan.queues}
    for name in removal.deleted:
        what = f"queue {name} ({roles[name]})" if name in roles else f"exchange {name}"
        print(f"would delete {what}" if dry_run else f"deleted {name}")
    for name in removal.missing:
        print(f"{name}: already gone, nothing to delete")
    if removal.holding:
        print(f"{would}delete messages with their queues: {', '.join(removal.holding)} (--force)")
    gone = {*removal.deleted, *removal.missing}
    kept = [e.name for e in plan.exchanges if e.name not in gone]
    if dry_run:
        for name in kept:
            print(f"would keep exchange {name} (it may be shared with other services)")
    elif kept:
        print(f"kept exchange(s) {', '.join(kept)}: they may be shared with other services")
    return 0


async def _against_broker(app: App, *, check: bool, management: str | None = None) -> int:
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
    found = [str(d) for d in differences]
    compared = "exchanges and queues; bindings are not readable over AMQP: --management-url compares them"
    if management:
        bindings = await app.admin().check_bindings(management, app.endpoints[0].vhost or "/")
        if bindings.compared:
            found += bindings.differences
            compared = "exchanges, queues, bindings and the consumers of its queues"
        else:
            print(bindings.note)
            compared = "exchanges and queues only; bindings not compared"
    for difference in found:
        print(difference)
    if found:
        print(f"{len(found)} difference(s) between the plan and {node}")
        return 1
    print(f"{node} matches the plan ({compared})")
    return 0


def configure_log_output(fmt: str, config: str | None) -> None:
    """`--log-config FILE`: the user's dictConfig (JSON, or YAML with PyYAML) replaces ours.
    Else every line gets the fields of `rabbitflow.logs.ContextFilter`, and `--log-format json`
    writes one JSON object per line."""
    if config:
        logging.config.dictConfig(_read_log_config(config))
        return
    for handler in logging.getLogger().handlers:
        handler.addFilter(ContextFilter())
        if fmt == "json":
            handler.setFormatter(JsonFormatter())


def _read_log_config(path: str) -> dict[str, Any]:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise SystemExit(f"rabbitflow: --log-config {path}: {exc.strerror}") from None
    try:
        if path.endswith((".yaml", ".yml")):
            try:
                import yaml
            except ImportError:
                raise SystemExit(
                    "rabbitflow: --log-config in YAML needs PyYAML: pip install pyyaml"
                ) from None
            config = yaml.safe_load(text)
        else:
            config = json.loads(text)
    except ValueError as exc:  # json.JSONDecodeError and yaml.YAMLError's parse errors
        raise SystemExit(f"rabbitflow: --log-config {path}: not valid: {exc}") from None
    if not isinstance(config, dict) or "version" not in config:
        raise SystemExit(f"rabbitflow: --log-config {path}: expected a logging dictConfig (with version: 1)")
    # rabbitflow's loggers exist before the file is read: keep them unless the file says otherwise.
    config.setdefault("disable_existing_loggers", False)
    return config


def _log_environment(args: argparse.Namespace) -> dict[str, str]:
    """The log options of a child process (a worker, the --reload child), as its environment."""
    env = {"RABBITFLOW_LOG_FORMAT": getattr(args, "log_format", "text")}
    if getattr(args, "log_config", None):
        env["RABBITFLOW_LOG_CONFIG"] = str(Path(args.log_config).resolve())
    return env


def load_env_file(argv: Sequence[str]) -> None:
    """`--env-file FILE` anywhere in argv: its variables join the environment before the parser
    reads its defaults from it; a variable already set in the environment keeps its value."""
    for n, arg in enumerate(argv):
        if arg == "--env-file" and n + 1 < len(argv):
            path = argv[n + 1]
        elif arg.startswith("--env-file="):
            path = arg.partition("=")[2]
        else:
            continue
        for name, value in read_env_file(path).items():
            os.environ.setdefault(name, value)


# `run`'s flags from the environment (a flag given wins; App options: settings.ENV_OPTIONS).
RUN_ENVIRONMENT: dict[str, tuple[str, Callable[[str], object]]] = {
    "workers": ("RABBITFLOW_WORKERS", int),
    "http_port": ("RABBITFLOW_HTTP_PORT", int),
    "reload": ("RABBITFLOW_RELOAD", lambda text: _flag(text)),
    "log_level": ("RABBITFLOW_LOG_LEVEL", str.lower),
}


def _flag(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(text)


def _environment_defaults(dests: Iterable[str], environ: Mapping[str, str]) -> dict[str, object]:
    defaults: dict[str, object] = {}
    for dest in dests:
        variable, parse = RUN_ENVIRONMENT[dest]
        text = environ.get(variable, "").strip()
        if not text:
            continue
        try:
            value = parse(text)
        except ValueError:
            raise SystemExit(
                f"rabbitflow: {variable}={text!r}: not a valid value for --{dest.replace('_', '-')}"
            ) from None
        if dest == "log_level" and value not in LEVELS:
            raise SystemExit(f"rabbitflow: {variable}={text!r}: expected one of {', '.join(LEVELS)}")
        defaults[dest] = value
    return defaults


def _add_environment_options(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """--log-format, --log-config and --env-file on every command that has --log-level, their
    defaults and run's from RABBITFLOW_* variables."""
    environ = os.environ
    fmt = environ.get("RABBITFLOW_LOG_FORMAT", "").strip().lower() or "text"
    if fmt not in ("text", "json"):
        raise SystemExit(f"rabbitflow: RABBITFLOW_LOG_FORMAT={fmt!r}: expected text or json")
    for command in _commands(commands):
        dests = {action.dest for action in command._actions}
        if "log_level" not in dests:
            continue
        command.add_argument(
            "--log-format",
            choices=["text", "json"],
            default=fmt,
            help="text, or json: one JSON object per line with time, level, logger, message and "
            "service, queue, message_id, correlation_id, attempt, worker where they apply "
            "(default: %(default)s; RABBITFLOW_LOG_FORMAT)",
        )
        command.add_argument(
            "--log-config",
            metavar="FILE",
            default=environ.get("RABBITFLOW_LOG_CONFIG") or None,
            help="configure logging from FILE, a logging dictConfig in JSON (or YAML, .yaml/.yml, "
            "with PyYAML); replaces --log-level and --log-format (RABBITFLOW_LOG_CONFIG)",
        )
        command.add_argument(
            "--env-file",
            metavar="FILE",
            help="read NAME=value lines from FILE into the environment first (RABBITFLOW_URL, "
            "RABBITFLOW_PREFETCH, ...); variables already set keep their value",
        )
        known = [d for d in RUN_ENVIRONMENT if d in dests]
        command.set_defaults(**_environment_defaults(known, environ))


def _commands(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
) -> Iterator[argparse.ArgumentParser]:
    for command in commands.choices.values():
        yield command
        for action in command._actions:
            if isinstance(action, argparse._SubParsersAction):
                yield from _commands(action)


APP_HELP = (
    "where the service is: a module path (`orders.service`) or a file path (`service.py`), a colon, "
    "and the name of the App variable in it (`:app` may be omitted: `app` is the default)"
)
URL_HELP = (
    "broker URL(s), ';'-separated for a cluster; overrides the App's url=, which defaults to the "
    "environment variable RABBITFLOW_URL. A command line is visible to every user in `ps`: for a "
    "password, leave url= out of App(...) and set RABBITFLOW_URL instead"
)
LEVEL_HELP = (
    "debug (rabbitflow's own DEBUG lines; aiormq, aio_pika and pamqp stay at WARNING), "
    "debug-all (theirs too, every frame), info, warning or error (default: %(default)s)"
)


def parser() -> argparse.ArgumentParser:
    """The whole command line; docs/cli.md is generated from it."""
    top = argparse.ArgumentParser(
        prog="rabbitflow",
        description="Run rabbitflow services and inspect or remove their RabbitMQ topology. "
        "A command that talks to a broker uses --url if given, else the App's url=, else the "
        "environment variable RABBITFLOW_URL, else amqp://guest:guest@localhost:5672/.",
    )
    top.add_argument("--version", action="version", version=f"rabbitflow {__version__}")
    commands = top.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser(
        "run",
        help="run a service until SIGTERM or Ctrl-C",
        description="Run the App found at MODULE:APP. SIGTERM/SIGINT stop taking messages, "
        "let running handlers finish within graceful_timeout, then close.",
    )
    run.add_argument("app", metavar="MODULE:APP", help=APP_HELP)
    run.add_argument("--url", help=URL_HELP)
    run.add_argument("--url-from-env", action="store_true", help=argparse.SUPPRESS)
    run.add_argument(
        "--workers", type=int, default=1, metavar="N", help="run N worker processes (default: 1)"
    )
    run.add_argument(
        "--http-port",
        type=int,
        metavar="PORT",
        help="serve /health (200 healthy, 503 not) and /metrics (Prometheus text; the app's metrics "
        "when prometheus-client is installed) on this port; worker N of --workers serves on "
        "PORT + N - 1",
    )
    run.add_argument(
        "--http-host",
        default="127.0.0.1",
        metavar="HOST",
        help="the address --http-port listens on: 0.0.0.0 (or ::) for every interface, e.g. for a "
        "scraper on another host (default: %(default)s, this host only)",
    )
    run.add_argument(
        "--console",
        action="store_true",
        help="also serve the operator console at /console on --http-port, read-only "
        "(docs/console.md); worker N of --workers serves its own on PORT + N - 1",
    )
    run.add_argument(
        "--console-actions",
        action="store_true",
        help="the console with its replay and purge buttons (implies --console); needs an "
        "operator token in the environment variable RABBITFLOW_CONSOLE_TOKEN",
    )
    run.add_argument(
        "--reload",
        action="store_true",
        help="for development: run the service in a child process and start it again whenever a "
        ".py file under the directory of MODULE changes (needs watchfiles: "
        "pip install 'rabbitflow[reload]')",
    )
    run.add_argument(
        "--loop",
        default="auto",
        choices=loops.CHOICES,
        help="the event loop of the service (of each worker): auto is uvloop when it is installed "
        "(pip install 'rabbitflow[uvloop]': less CPU per message), asyncio's own otherwise "
        "(default: %(default)s)",
    )
    run.add_argument(
        "--log-level", default="info", metavar="LEVEL", type=str.lower, choices=LEVELS, help=LEVEL_HELP
    )
    run.set_defaults(handler=_run)

    topo = commands.add_parser(
        "topology",
        help="print, check, declare or delete a service's topology",
        description="Print the exchanges, queues and bindings the service needs (no broker "
        "needed), compare them with a live broker (--check), declare them (--apply), or delete "
        "the service's own queues and exchange (--delete).",
    )
    topo.add_argument("app", metavar="MODULE:APP", help=APP_HELP)
    topo.add_argument(
        "--format",
        choices=["text", "json", "mermaid"],
        default="text",
        help="how to print the plan: text (for reading), json (stable, for tools: service, "
        "exchanges, queues, bindings, consumers) or mermaid (a flowchart for docs and "
        "GitHub) (default: %(default)s)",
    )
    mode = topo.add_mutually_exclusive_group()
    mode.add_argument(
        "--check", action="store_true", help="report missing objects and differing arguments; change nothing"
    )
    mode.add_argument("--apply", action="store_true", help="declare the plan on the broker")
    mode.add_argument(
        "--delete",
        action="store_true",
        help="delete the service's queues (consume, retry and parked) and its own exchange "
        "S.dlx; the exchanges its consumers bind to stay, as other services may use them. "
        "Refuses, deleting nothing, while a queue holds messages (see --force)",
    )
    topo.add_argument(
        "--force",
        action="store_true",
        help="with --delete: delete queues that hold messages, messages and all",
    )
    topo.add_argument(
        "--dry-run",
        action="store_true",
        help="with --delete: print what would be deleted and kept, touch nothing",
    )
    topo.add_argument("--url", help=f"for --check, --apply and --delete: {URL_HELP}")
    topo.add_argument(
        "--management-url",
        metavar="URL",
        help="with --check: also compare bindings, and find consumers of the plan's queues that are "
        "not this service's (two apps sharing a queue), through the management API at URL "
        "(http://user:password@host:15672; default: RABBITFLOW_MANAGEMENT_URL; off when neither)",
    )
    topo.add_argument(
        "--log-level", default="warning", metavar="LEVEL", type=str.lower, choices=LEVELS, help=LEVEL_HELP
    )
    topo.set_defaults(handler=_topology)

    add_parked(commands, LEVELS)
    add_sql(commands)
    add_asyncapi(commands, LEVELS)
    add_publish(commands, LEVELS)
    _add_environment_options(commands)
    return top


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        load_env_file(argv)
    except ConfigError as exc:
        raise SystemExit(f"rabbitflow: {exc}") from None
    args = parser().parse_args(argv)
    worker = os.environ.get(WORKER_ENV) if args.command == "run" else None
    if args.command == "run" and args.workers < 1:
        raise SystemExit("rabbitflow: --workers must be at least 1")
    if args.command == "run" and args.reload and args.workers > 1:
        raise SystemExit("rabbitflow: --reload runs one process; drop --workers")
    if args.command == "run" and (args.workers > 1 or args.reload):
        worker = "main"
    # An operator command ends with one line saying what failed; aiormq's own would repeat it.
    clients = logging.CRITICAL if args.command in ("parked", "publish", "request") else logging.WARNING
    configure_logging(args.log_level, worker=worker, clients=clients)
    configure_log_output(getattr(args, "log_format", "text"), getattr(args, "log_config", None))
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
