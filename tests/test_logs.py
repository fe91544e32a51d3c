"""rabbitflow's own DEBUG lines say what it did — connect, declare, subscribe, settle — and never
carry the password (issue "Operate it", SPEC §9)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiormq
import pytest

from rabbitflow import App, Message, logs
from rabbitflow.logs import ContextFilter, JsonFormatter

from .helpers import unique, wait_for

ROOT = Path(__file__).resolve().parent.parent


async def test_debug_lines_tell_connect_declare_subscribe_and_settle(
    make_app: Callable[..., App], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="rabbitflow")
    app = make_app()
    queue = unique("logs")
    handled: list[int] = []

    @app.consumer(queue, queue_type="classic", retries=1, delay=0.2)
    async def handle(body: dict[str, int]) -> None:
        handled.append(body["n"])

    async with app:
        for n in range(3):
            await app.publish({"n": n}, routing_key=queue)
        await wait_for(lambda: len(handled) == 3)
        await wait_for(lambda: app.health()["consumers"][0]["in_flight"] == 0)
    ours = [r for r in caplog.records if r.name.startswith("rabbitflow")]
    text = "\n".join(r.getMessage() for r in ours)
    assert "connecting to amqp://guest:**@" in text
    assert f"declared queue {queue}.parked" in text
    assert f"declared queue {queue}.retry.200ms" in text
    assert f"queue {queue}: consuming (prefetch" in text
    assert "ack up to" in text
    assert ":guest@" not in text  # the password (guest's is "guest") is masked everywhere


# -- log fields, --log-format json, --log-config (issue "The tools around a service") -------------


class Lines(logging.Handler):
    """The records a handler of the user's logging config would see, formatted as JSON."""

    def __init__(self) -> None:
        super().__init__()
        self.addFilter(ContextFilter())
        self.setFormatter(JsonFormatter())
        self.lines: list[dict[str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(json.loads(self.format(record)))


async def test_lines_logged_in_a_handler_carry_its_queue_message_and_attempt(
    make_app: Callable[..., App],
) -> None:
    app = make_app()
    queue = unique("logfields")
    user = logging.getLogger("tests.user_handler")
    lines = Lines()
    for name in ("tests.user_handler", "rabbitflow"):
        logging.getLogger(name).addHandler(lines)
    user.setLevel(logging.INFO)
    logging.getLogger("rabbitflow").setLevel(logging.INFO)
    done: list[int] = []

    @app.consumer(queue, queue_type="classic", retries=1, delay=0.2)
    async def handle(body: dict[str, int], message: Message) -> None:
        user.info("handling order %d", body["id"])
        assert logs.current()["attempt"] == message.attempt
        if message.attempt == 1:
            raise ValueError("inventory down")
        done.append(body["id"])

    try:
        async with app:
            await app.publish({"id": 7}, routing_key=queue, message_id="order-7", correlation_id="c-1")
            await app.publish({"id": 8}, routing_key=queue, message_id="order-8")
            await wait_for(lambda: sorted(done) == [7, 8])
    finally:
        for name in ("tests.user_handler", "rabbitflow"):
            logging.getLogger(name).removeHandler(lines)
        user.setLevel(logging.NOTSET)
        logging.getLogger("rabbitflow").setLevel(logging.NOTSET)
    mine = [line for line in lines.lines if line["logger"] == "tests.user_handler"]
    seven = [(line["message"], line["attempt"]) for line in mine if line.get("message_id") == "order-7"]
    assert seven == [("handling order 7", 1), ("handling order 7", 2)]
    assert {line["queue"] for line in mine} == {queue}
    assert all(line.get("correlation_id") == "c-1" for line in mine if line["message_id"] == "order-7")
    assert all("correlation_id" not in line for line in mine if line["message_id"] == "order-8")
    # rabbitflow's own retry line: the same fields, for the delivery it is about
    [retry] = [
        line
        for line in lines.lines
        if line["logger"].startswith("rabbitflow") and "inventory down" in line["message"]
        and line.get("message_id") == "order-7"
    ]  # fmt: skip
    assert (retry["queue"], retry["attempt"]) == (queue, 1)
    # outside a handler: no delivery fields
    assert "queue" not in logs.current()


SERVICE = """
import logging
from rabbitflow import App

app = App("logsvc")
log = logging.getLogger("logsvc")

@app.consumer({queue!r}, queue_type="classic")
async def handle(body: dict) -> None:
    log.info("got %s", body["n"])
"""


def test_run_log_format_json_and_log_config(broker_url: str, tmp_path: Path) -> None:
    async def publish(queue: str) -> None:
        connection = await aiormq.connect(broker_url)
        channel = await connection.channel()
        await channel.basic_publish(
            b'{"n": 1}',
            routing_key=queue,
            properties=aiormq.spec.Basic.Properties(content_type="application/json", message_id="m-42"),
        )
        await connection.close()

    async def delete(queue: str) -> None:
        connection = await aiormq.connect(broker_url)
        channel = await connection.channel()
        for name in (queue, f"{queue}.parked", f"{queue}.retry.10s"):
            await channel.queue_delete(name)
        await channel.exchange_delete("logsvc.dlx")
        await connection.close()

    config = tmp_path / "logging.json"
    config.write_text(
        json.dumps(
            {
                "version": 1,
                "filters": {"fields": {"()": "rabbitflow.logs.ContextFilter"}},
                "formatters": {"plain": {"format": "%(levelname)s [%(queue)s %(message_id)s] %(message)s"}},
                "handlers": {
                    "err": {"class": "logging.StreamHandler", "formatter": "plain", "filters": ["fields"]}
                },
                "root": {"level": "INFO", "handlers": ["err"]},
            }
        )
    )
    for flags in (["--log-format", "json"], ["--log-config", str(config)]):
        queue = unique("logrun")
        (tmp_path / "logsvc.py").write_text(SERVICE.format(queue=queue))
        process = subprocess.Popen(
            [sys.executable, "-m", "rabbitflow", "run", "logsvc.py", *flags],
            cwd=tmp_path,
            env={**os.environ, "RABBITFLOW_URL": broker_url, "PYTHONPATH": str(ROOT)},
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert process.stderr is not None
            seen: list[str] = []
            for line in process.stderr:
                seen.append(line)
                if "consuming 1 queue" in line:
                    asyncio.run(publish(queue))
                if "got 1" in line:
                    break
            process.send_signal(signal.SIGINT)
            assert process.wait(30) == 0
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(10)
            if process.stderr is not None:
                process.stderr.close()
            asyncio.run(delete(queue))
        if flags[0] == "--log-format":
            records = [json.loads(line) for line in seen]  # every line is one JSON object
            [got] = [r for r in records if r["message"] == "got 1"]
            assert got["logger"] == "logsvc"
            assert (got["service"], got["queue"], got["message_id"], got["attempt"]) == (
                "logsvc",
                queue,
                "m-42",
                1,
            )
            assert {"time", "level"} <= set(got)
            assert not any(":guest@" in line for line in seen)
        else:
            assert f"INFO [{queue} m-42] got 1\n" in seen
