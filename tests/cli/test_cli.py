"""`rabbitflow run` and `rabbitflow topology` as real processes against the real broker."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import aiormq
import pytest

from ..helpers import Admin, unique, wait_for
from .conftest import Processes

ROOT = Path(__file__).resolve().parents[2]
SERVICE = "tests.services.worker:app"


class Worker:
    """One `rabbitflow run` process and the log its handler writes."""

    def __init__(self, log: Path, env: dict[str, str]) -> None:
        self.log = log
        self.out = log.with_name(f"{unique('worker')}.out")
        with self.out.open("w") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "rabbitflow", "run", SERVICE, "--log-level", "WARNING"],
                cwd=ROOT,
                env={**os.environ, **env, "RF_LOG": str(log)},
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # the fixture kills its group; a terminal's signals miss it
            )

    def lines(self, word: str) -> list[list[str]]:
        if not self.log.exists():
            return []
        return [line.split() for line in self.log.read_text().splitlines() if line.startswith(word)]

    async def wait_lines(self, word: str, count: int, timeout: float = 20) -> list[list[str]]:
        async with asyncio.timeout(timeout):
            while len(found := self.lines(word)) < count:
                assert self.process.poll() is None, self.output()
                await asyncio.sleep(0.02)
        return found

    def output(self) -> str:
        return self.out.read_text()

    async def wait_exit(self, timeout: float = 20) -> int:
        async with asyncio.timeout(timeout):
            while self.process.poll() is None:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        return self.process.returncode


class Service:
    """A test service's names and the worker processes started for it."""

    def __init__(self, log: Path, broker_url: str) -> None:
        self.log = log
        self.queue = unique("cli")
        self.env = {"RF_SERVICE": unique("svc"), "RF_QUEUE": self.queue, "RABBITFLOW_URL": broker_url}
        self.workers: list[Worker] = []

    def start(self, **extra: str) -> Worker:
        worker = Worker(self.log, {**self.env, **extra})
        self.workers.append(worker)
        return worker


@pytest.fixture
def service(tmp_path: Path, broker_url: str, admin: Admin) -> Iterator[Service]:
    svc = Service(tmp_path / "handled.log", broker_url)
    yield svc
    for worker in svc.workers:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(worker.process.pid, signal.SIGKILL)
        worker.process.wait()
    forget_service(admin, svc.env)


async def wait_consumers(admin: Admin, queue: str, count: int = 1, timeout: float = 20) -> None:
    async with asyncio.timeout(timeout):
        while True:
            try:
                ok = await admin.channel.queue_declare(queue, passive=True)
            except Exception:
                ok = None
                admin.channel = await admin.channel.connection.channel()
            if ok is not None and ok.consumer_count == count:
                return
            await asyncio.sleep(0.05)


async def test_sigterm_lets_running_handlers_finish_and_keeps_the_rest(
    service: Service, admin: Admin
) -> None:
    worker = service.start(RF_SLEEP="1.5", RF_CONCURRENCY="3", RF_PREFETCH="3")
    queue = service.queue
    await wait_consumers(admin, queue)
    for n in range(10):
        await admin.publish(
            json.dumps({"n": n}).encode(), routing_key=queue, content_type="application/json", delivery_mode=2
        )
    started = await worker.wait_lines("start", 3)
    worker.process.send_signal(signal.SIGTERM)
    assert await worker.wait_exit() == 0, worker.output()

    done = worker.lines("done")
    assert sorted(line[1] for line in done) == sorted(line[1] for line in started)
    assert len(worker.lines("start")) == 3  # nothing new was taken after SIGTERM
    assert await admin.count(queue) == 7  # the rest stay queued: 3 handled + 7 = 10, none lost


async def test_sigkill_mid_handler_redelivers_to_the_next_worker(service: Service, admin: Admin) -> None:
    queue = service.queue
    doomed = service.start(RF_SLEEP="60")
    await wait_consumers(admin, queue)
    await admin.publish(b'{"n": 1}', routing_key=queue, content_type="application/json")
    await doomed.wait_lines("start", 1)
    doomed.process.kill()
    await doomed.wait_exit()

    survivor = service.start(RF_SLEEP="0")
    try:
        done = await survivor.wait_lines("done", 1)
        assert done[0][1] == "1"
        second_start = survivor.lines("start")[-1]
        assert second_start[3] == "1"  # redelivered
    finally:
        survivor.process.send_signal(signal.SIGTERM)
        assert await survivor.wait_exit() == 0


async def test_sigkill_mid_retry_loses_nothing(service: Service, admin: Admin) -> None:
    queue = service.queue
    doomed = service.start(RF_MODE="fail-once", RF_SLEEP="0")
    await wait_consumers(admin, queue)
    await admin.publish(b'{"n": 5}', routing_key=queue, content_type="application/json")
    await doomed.wait_lines("fail", 1)
    doomed.process.kill()
    await doomed.wait_exit()

    survivor = service.start(RF_MODE="fail-once", RF_SLEEP="0")
    try:
        done = await survivor.wait_lines("done", 1)
        assert done[0][1:] == ["5", "2"]  # handled on its second attempt, after the delay
    finally:
        survivor.process.send_signal(signal.SIGTERM)
        assert await survivor.wait_exit() == 0
    assert await admin.count(f"{queue}.parked") == 0


async def test_workers_option_runs_several_processes(
    service: Service, admin: Admin, processes: Processes
) -> None:
    queue = service.queue
    parent = processes.start(
        [sys.executable, "-m", "rabbitflow", "run", SERVICE, "--workers", "2"],
        cwd=ROOT,
        env={**os.environ, **service.env, "RF_LOG": str(service.log)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        await wait_consumers(admin, queue, count=2)
    finally:
        parent.send_signal(signal.SIGTERM)
        assert parent.wait(20) == 0


@pytest.mark.parametrize(("option", "expected"), [((), "uvloop"), (("--loop", "asyncio"), "asyncio")])
async def test_every_worker_runs_its_handlers_on_uvloop_unless_told_otherwise(
    service: Service, admin: Admin, processes: Processes, option: tuple[str, ...], expected: str
) -> None:
    """uvloop is installed with the dev tools: `rabbitflow run` uses it in every worker (with an
    HTTP port too), and `--loop asyncio` goes back to asyncio's own loop."""
    port = _free_ports(2)
    command = [sys.executable, "-m", "rabbitflow", "run", SERVICE, "--workers", "2", "--http-port", str(port)]
    parent = processes.start(
        [*command, *option],
        cwd=ROOT,
        env={**os.environ, **service.env, "RF_LOG": str(service.log), "RF_MODE": "loop"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        await wait_consumers(admin, service.queue, count=2)
        for n in range(8):
            await admin.publish(
                f'{{"n": {n}}}'.encode(), routing_key=service.queue, content_type="application/json"
            )
        await wait_for(lambda: service.log.exists() and len(service.log.read_text().splitlines()) == 8)
        loops = {line.split()[2] for line in service.log.read_text().splitlines()}
        assert loops == {expected}
    finally:
        parent.send_signal(signal.SIGTERM)
        assert parent.wait(20) == 0


def test_loop_uvloop_names_what_to_install_when_it_is_missing(tmp_path: Path) -> None:
    # A Python that cannot import uvloop: a stand-in module that raises ImportError first on the path.
    (tmp_path / "uvloop.py").write_text("raise ImportError('no uvloop here')\n")
    env = {
        **os.environ,
        "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}",
        "RF_SERVICE": "x",
        "RF_QUEUE": "x",
        "RF_LOG": "x",
    }
    done = run_cli("run", SERVICE, "--loop", "uvloop", env=env)
    assert done.returncode != 0
    assert "pip install 'rabbitflow[uvloop]'" in done.stderr
    assert "Traceback" not in done.stderr


def children_of(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def command_line(pid: int) -> str:
    """What `ps` shows of process `pid` (its arguments, NUL-separated)."""
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode()


async def test_workers_get_the_url_in_the_environment_not_on_their_command_line(
    service: Service, admin: Admin, broker_url: str, processes: Processes
) -> None:
    """`ps` shows every user a process's command line: the password must not be on the workers'.
    The URL list's second node carries a password of its own, which must not show either."""
    secret = "s3cret;p@ss"
    url = f"{broker_url};amqp://rf:{secret}@127.0.0.1:1/"
    parent = processes.start(
        [sys.executable, "-m", "rabbitflow", "run", SERVICE, "--workers", "2", "--url", url],
        cwd=ROOT,
        # The workers' own environment points nowhere: only --url can bring them to the broker.
        env={
            **os.environ,
            **service.env,
            "RF_LOG": str(service.log),
            "RABBITFLOW_URL": "amqp://127.0.0.1:1/",
        },
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        await wait_consumers(admin, service.queue, count=2)
        children = children_of(parent.pid)
        assert len(children) == 2
        for child in children:
            cmdline = command_line(child)
            assert "rabbitflow" in cmdline
            assert "s3cret" not in cmdline
            assert "amqp://" not in cmdline
    finally:
        parent.send_signal(signal.SIGTERM)
        assert parent.wait(20) == 0


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rabbitflow", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=60,
        check=False,
    )


def forget_service(admin: Admin, env: dict[str, str]) -> None:
    """Delete after the test whatever the test service declares, as its own plan names it."""
    shown = run_cli("topology", SERVICE, "--format", "json", env={"RF_LOG": "/dev/null", **env})
    plan = json.loads(shown.stdout)
    admin.queues.update(q["name"] for q in plan["queues"])
    admin.exchanges.update(e["name"] for e in plan["exchanges"] if e["name"])


def test_help_reads_well() -> None:
    result = run_cli("--help")
    assert result.returncode == 0
    assert "run" in result.stdout
    assert "topology" in result.stdout
    run_help = run_cli("run", "--help").stdout
    for option in ("MODULE:APP", "--url", "--workers", "--log-level"):
        assert option in run_help


def test_topology_json_needs_no_broker() -> None:
    result = run_cli(
        "topology",
        "examples/orders.py:app",
        "--format",
        "json",
        env={"RABBITFLOW_URL": "amqp://guest:guest@127.0.0.1:1/"},
    )
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert set(plan) == {"service", "exchanges", "queues", "bindings", "consumers"}
    assert plan["service"] == "orders"
    roles = {q["name"]: q["role"] for q in plan["queues"]}
    assert roles["orders.created"] == "consume"
    assert roles["orders.created.parked"] == "parked"
    assert any(role == "retry" for role in roles.values())


def test_bad_module_says_what_is_wrong() -> None:
    result = run_cli("run", "no_such_module:app")
    assert result.returncode != 0
    assert "cannot import 'no_such_module'" in result.stderr


def test_topology_apply_then_check_on_the_broker(broker_url: str, admin: Admin, broker_version: str) -> None:
    env = {
        "RF_SERVICE": unique("svc"),
        "RF_QUEUE": unique("topo"),
        "RF_LOG": "/dev/null",
        "RABBITFLOW_URL": broker_url,
    }
    queue = env["RF_QUEUE"]
    forget_service(admin, env)

    before = run_cli("topology", SERVICE, "--check", env=env)
    assert before.returncode == 1
    assert f"queue {queue}: missing" in before.stdout
    assert "guest:guest" not in before.stdout + before.stderr

    applied = run_cli("topology", SERVICE, "--apply", env=env)
    assert applied.returncode == 0, applied.stderr
    assert "declared 1 exchange(s), 3 queue(s) and 2 binding(s)" in applied.stdout

    after = run_cli("topology", SERVICE, "--check", env=env)
    assert after.returncode == 0, after.stdout
    assert "matches the plan" in after.stdout
    assert f"runs RabbitMQ {broker_version}\n" in after.stdout  # the server's version, from its properties


def test_a_bad_option_fails_at_import_with_what_to_change(tmp_path: Path) -> None:
    module = tmp_path / "badsvc.py"
    module.write_text(
        "from rabbitflow import App\n"
        "app = App('bad', url='amqp://guest:s3cret@localhost/')\n"
        "@app.consumer('orders', retries=3, delay=[1, -5])\n"
        "async def handle(body): ...\n"
    )
    result = run_cli("run", f"{module}:app")
    assert result.returncode == 2
    assert "@app.consumer('orders')" in result.stderr
    assert "every delay must be a finite number of seconds >= 0" in result.stderr
    assert "s3cret" not in result.stderr


RUN = [sys.executable, "-m", "rabbitflow", "run"]


async def test_a_killed_worker_is_started_again_and_every_log_line_names_its_worker(
    tmp_path: Path, broker_url: str, admin: Admin, processes: Processes
) -> None:
    service, queue = unique("svc"), unique("pids")
    admin.queues.update({queue, f"{queue}.parked"})
    admin.exchanges.add(f"{service}.dlx")
    log = tmp_path / "run.log"
    with log.open("w") as out:
        parent = processes.start(
            [*RUN, "tests.services.pids:app", "--workers", "2", "--log-level", "debug"],
            cwd=ROOT,
            env={**os.environ, "RF_SERVICE": service, "RF_QUEUE": queue, "RABBITFLOW_URL": broker_url},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        await wait_consumers(admin, queue, count=2)
        first = children_of(parent.pid)
        assert len(first) == 2
        victim = first[0]
        os.kill(victim, signal.SIGKILL)
        async with asyncio.timeout(20):
            while victim in (now := children_of(parent.pid)) or len(now) < 2:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        [newcomer] = set(now) - set(first)
        await wait_consumers(admin, queue, count=2)
        for n in range(20):
            await admin.publish(
                json.dumps({"n": n}).encode(), routing_key=queue, content_type="application/json"
            )
        async with asyncio.timeout(20):  # the new worker consumes: it handles its share
            while f"pid={newcomer} pids: handled" not in log.read_text():  # noqa: ASYNC110
                await asyncio.sleep(0.05)
    finally:
        parent.send_signal(signal.SIGTERM)
        code = parent.wait(30)
    text = log.read_text()
    assert code == 0, text
    lines = text.splitlines()
    assert lines
    for line in lines:
        assert re.search(r" worker=(main|1|2) pid=\d+ ", line), line
    number = re.search(rf"worker (\d) started: pid {victim}\b", text)
    assert number is not None, text
    assert f"worker {number[1]} (pid {victim}) died (killed by SIGKILL)" in text
    assert "starting it again in 1 s" in text
    assert f"worker {number[1]} started: pid {newcomer}" in text
    assert "DEBUG   worker=main" in text  # rabbitflow's own debug lines...
    assert "aiormq" not in text  # ...and none of aiormq's frame dumps
    assert "all 2 workers stopped" in text


def test_version_names_the_installed_release() -> None:
    result = run_cli("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"rabbitflow {importlib.metadata.version('rabbitflow')}"


def _arguments(parser: argparse.ArgumentParser, path: str) -> Iterator[tuple[str, argparse.Action]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _arguments(sub, f"{path} {name}")
        elif action.help != argparse.SUPPRESS:
            yield path, action


def test_every_argument_says_what_it_takes() -> None:
    from rabbitflow.cli.main import parser

    top = parser()
    assert "RABBITFLOW_URL" in (top.description or "")
    undocumented = [
        f"{path} {action.option_strings or action.metavar}"
        for path, action in _arguments(top, "rabbitflow")
        if not action.help
    ]
    assert undocumented == []
    run_help = run_cli("run", "--help").stdout
    assert "a colon" in run_help
    assert "App variable" in run_help
    assert "RABBITFLOW_URL" in " ".join(run_help.split())  # --url: where else the URL comes from
    topology_help = " ".join(run_cli("topology", "--help").stdout.split())
    assert "mermaid (a flowchart" in topology_help  # --format explains its choices


SHARED_SERVICE = """
from rabbitflow import App

app = App({service!r})

@app.consumer({queue!r}, exchange={exchange!r}, queue_type="classic", retries=1, delay=5)
async def handle(body: dict) -> None: ...
"""


def test_topology_delete_refuses_a_queue_with_a_message_until_forced(
    tmp_path: Path, broker_url: str, admin: Admin
) -> None:
    service, queue, exchange = unique("svc"), unique("del"), unique("shared")
    admin.queues.update({queue, f"{queue}.parked", f"{queue}.retry.5s"})
    admin.exchanges.update({exchange, f"{service}.dlx"})
    path = tmp_path / "svc.py"
    path.write_text(SHARED_SERVICE.format(service=service, queue=queue, exchange=exchange))
    target, env = f"{path}:app", {"RABBITFLOW_URL": broker_url}
    assert run_cli("topology", target, "--apply", env=env).returncode == 0

    async def publish_one() -> None:
        connection = await aiormq.connect(broker_url)
        channel = await connection.channel()
        await channel.basic_publish(b"{}", routing_key=queue)
        await connection.close()

    asyncio.run(publish_one())

    # the dry run asks the broker: it promises what the real run does (a refusal here)
    promise = run_cli("topology", target, "--delete", "--dry-run", env=env)
    assert promise.returncode == 1
    assert f"would delete nothing: queues hold messages: {queue} (1)" in promise.stderr
    assert "would delete queue" not in promise.stdout
    plan = run_cli("topology", target, "--delete", "--dry-run", "--force", env=env)
    assert plan.returncode == 0, plan.stderr
    assert f"would delete queue {queue}.parked (parked)" in plan.stdout
    assert f"would delete messages with their queues: {queue} (1)" in plan.stdout
    assert f"would delete exchange {service}.dlx" in plan.stdout
    assert f"would keep exchange {exchange}" in plan.stdout

    refused = run_cli("topology", target, "--delete", env=env)
    assert refused.returncode == 1
    assert f"{queue} (1)" in refused.stderr
    assert "--force" in refused.stderr
    assert queue_exists(broker_url, queue)  # nothing was deleted

    forced = run_cli("topology", target, "--delete", "--force", env=env)
    assert forced.returncode == 0, forced.stderr
    for name in (queue, f"{queue}.parked", f"{queue}.retry.5s", f"{service}.dlx"):
        assert f"deleted {name}" in forced.stdout
    assert f"kept exchange(s) {exchange}" in forced.stdout
    assert not queue_exists(broker_url, queue)
    assert not queue_exists(broker_url, f"{queue}.retry.5s")

    again = run_cli("topology", target, "--delete", env=env)  # nothing left: nothing "deleted"
    assert again.returncode == 0, again.stderr
    assert "deleted" not in again.stdout
    assert f"{queue}: already gone, nothing to delete" in again.stdout

    after = run_cli("topology", target, "--check", env=env)
    assert f"exchange {service}.dlx: missing" in after.stdout
    assert f"exchange {exchange}: missing" not in after.stdout  # shared: kept


def queue_exists(url: str, queue: str) -> bool:
    async def probe() -> bool:
        connection = await aiormq.connect(url)
        try:
            channel = await connection.channel()
            await channel.queue_declare(queue, passive=True)
        except aiormq.exceptions.ChannelNotFoundEntity:
            return False
        finally:
            await connection.close()
        return True

    return asyncio.run(probe())


RELOADED_SERVICE = """
import os

from rabbitflow import App

with open({log!r}, "a") as log:
    log.write(f"started {{os.getpid()}}\\n")

app = App({service!r}, graceful_timeout=2)

@app.consumer({queue!r}, queue_type="classic", retries=0)
async def handle(body: dict) -> None: ...
"""


async def test_run_reload_starts_the_service_again_when_a_file_changes(
    tmp_path: Path, broker_url: str, admin: Admin, processes: Processes
) -> None:
    service, queue = unique("svc"), unique("reload")
    admin.queues.update({queue, f"{queue}.parked"})
    admin.exchanges.add(f"{service}.dlx")
    starts = tmp_path / "starts.log"
    code = tmp_path / "app" / "svc.py"
    code.parent.mkdir()
    code.write_text(RELOADED_SERVICE.format(log=str(starts), service=service, queue=queue))
    out = tmp_path / "run.out"
    with out.open("w") as output:
        parent = processes.start(
            [*RUN, f"{code}:app", "--reload"],
            cwd=ROOT,
            env={**os.environ, "RABBITFLOW_URL": broker_url},
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    try:
        await wait_consumers(admin, queue, count=1)
        [first] = children_of(parent.pid)
        (code.parent / "helpers.py").write_text("# a new module next to the service\n")
        async with asyncio.timeout(30):
            while len(children_of(parent.pid)) != 1 or children_of(parent.pid) == [first]:
                assert parent.poll() is None, out.read_text()
                await asyncio.sleep(0.1)
        await wait_consumers(admin, queue, count=1)
        (code.parent / "notes.txt").write_text("not python: no restart\n")
        await asyncio.sleep(1.5)
    finally:
        parent.send_signal(signal.SIGINT)
        status = parent.wait(30)
    text = out.read_text()
    assert status == 0, text
    assert "restarting: helpers.py changed" in text
    assert "notes.txt" not in text
    # The parent loaded the module once to check it, and each child once: 1 + 2 starts.
    assert len(starts.read_text().splitlines()) == 3, text


def _free_ports(count: int) -> int:
    """A base port with `count` free ports from it (best effort: nothing holds them after)."""
    import socket

    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base = probe.getsockname()[1]
        if base + count >= 65535:
            continue
        try:
            held = []
            for port in range(base, base + count):
                sock = socket.socket()
                held.append(sock)
                sock.bind(("127.0.0.1", port))
        except OSError:
            continue
        finally:
            for sock in held:
                sock.close()
        return base
    raise RuntimeError("no free ports")


def _get(port: int, path: str) -> tuple[int, bytes]:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


async def _wait_status(port: int, path: str, status: int, timeout: float = 30) -> bytes:
    async with asyncio.timeout(timeout):
        while True:
            try:
                code, body = await asyncio.to_thread(_get, port, path)
                if code == status:
                    return body
            except OSError:
                pass
            await asyncio.sleep(0.1)


async def test_run_http_port_serves_health_and_metrics_per_worker(
    service: Service, admin: Admin, processes: Processes
) -> None:
    port = _free_ports(2)
    parent = processes.start(
        [sys.executable, "-m", "rabbitflow", "run", SERVICE, "--workers", "2", "--http-port", str(port)],
        cwd=ROOT,
        env={**os.environ, **service.env, "RF_LOG": str(service.log)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        await wait_consumers(admin, service.queue, count=2)
        for worker_port in (port, port + 1):
            health = json.loads(await _wait_status(worker_port, "/health", 200))
            assert health["healthy"] is True
            assert health["consumers"][0]["queue"] == service.queue
            metrics = await _wait_status(worker_port, "/metrics", 200)
            # The CLI adds the metrics middleware when the app has none: the app's own series.
            assert b"rabbitflow_received_messages_total" in metrics
            assert b"rabbitflow_consumer_stalled" in metrics
    finally:
        parent.send_signal(signal.SIGTERM)
        assert parent.wait(30) == 0


async def test_run_console_serves_each_workers_console_read_only(
    service: Service, admin: Admin, processes: Processes
) -> None:
    port = _free_ports(2)
    env = {k: v for k, v in os.environ.items() if k != "RABBITFLOW_CONSOLE_TOKEN"}
    command = [sys.executable, "-m", "rabbitflow", "run", SERVICE, "--workers", "2", "--http-port", str(port)]
    parent = processes.start(
        [*command, "--console"],
        cwd=ROOT,
        env={**env, **service.env, "RF_LOG": str(service.log)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        await wait_consumers(admin, service.queue, count=2)
        for number, worker_port in enumerate((port, port + 1), start=1):
            page = (await _wait_status(worker_port, "/console", 200)).decode()
            assert service.queue in page  # its consumer, with its health
            assert f"{number} of 2" in page  # which worker's console this is
            assert "replay" not in page.lower() or "disabled" in page.lower() or "<form" not in page
            assert (await _wait_status(worker_port, "/health", 200)).startswith(b"{")
    finally:
        parent.send_signal(signal.SIGTERM)
        assert parent.wait(30) == 0


def test_run_console_actions_need_a_token_from_the_environment() -> None:
    env = {k: v for k, v in os.environ.items() if k != "RABBITFLOW_CONSOLE_TOKEN"}
    refused = subprocess.run(
        [sys.executable, "-m", "rabbitflow", "run", SERVICE, "--http-port", "0", "--console-actions"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode != 0
    assert "RABBITFLOW_CONSOLE_TOKEN" in refused.stderr
    no_port = subprocess.run(
        [sys.executable, "-m", "rabbitflow", "run", SERVICE, "--console"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert no_port.returncode != 0
    assert "--http-port" in no_port.stderr
