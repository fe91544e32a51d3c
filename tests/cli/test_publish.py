"""`rabbitflow publish` and `rabbitflow request` as real processes against the real broker."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Callable
from pathlib import Path

from rabbitflow import App, Message
from rabbitflow.cli.publish import EXIT_CODES

from ..helpers import Admin, unique

ROOT = Path(__file__).resolve().parents[2]


async def cli(*args: str, stdin: bytes = b"", env: dict[str, str] | None = None) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "rabbitflow",
        *args,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(stdin), 60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_publish_to_a_queue_with_headers_id_and_content_type(
    broker_url: str, admin: Admin, tmp_path: Path
) -> None:
    queue = unique("cli-pub")
    admin.queues.add(queue)
    await admin.channel.queue_declare(queue)
    code, _, err = await cli(
        "publish", "--url", broker_url, "--queue", queue, '{"id": 7}',
        "--header", "tenant=acme", "--header", "source=shell", "--message-id", "m-1",
    )  # fmt: skip
    assert (code, err.strip()) == (0, f"published to queue {queue!r}, confirmed")
    [message] = await admin.drain(queue)
    assert message.body == b'{"id": 7}'
    assert message.header.properties.content_type == "application/json"
    assert message.header.properties.message_id == "m-1"
    assert message.header.properties.delivery_mode == 2
    assert message.header.properties.headers == {"tenant": "acme", "source": "shell"}

    (tmp_path / "body.bin").write_bytes(b"\xff\x00raw")
    assert (await cli("publish", "--url", broker_url, "--queue", queue, f"@{tmp_path / 'body.bin'}"))[0] == 0
    code, _, _ = await cli(
        "publish", "--url", broker_url, "--queue", queue, "-", "--content-type", "text/csv", "--quiet",
        stdin=b"a,b\n1,2\n",
    )  # fmt: skip
    assert code == 0
    from_file, from_stdin = await admin.drain(queue)
    assert from_file.body == b"\xff\x00raw"
    assert from_file.header.properties.content_type == "application/octet-stream"
    assert (from_stdin.body, from_stdin.header.properties.content_type) == (b"a,b\n1,2\n", "text/csv")
    assert from_file.header.properties.message_id != from_stdin.header.properties.message_id


async def test_publish_to_an_exchange_reaches_its_bound_queues_only(broker_url: str, admin: Admin) -> None:
    exchange, hit, miss = unique("cli-x"), unique("cli-hit"), unique("cli-miss")
    admin.exchanges.add(exchange)
    admin.queues.update((hit, miss))
    await admin.channel.exchange_declare(exchange, exchange_type="direct")
    for queue, key in ((hit, "a"), (miss, "b")):
        await admin.channel.queue_declare(queue)
        await admin.channel.queue_bind(queue, exchange, routing_key=key)
    code, _, err = await cli(
        "publish", "--url", broker_url, "--exchange", exchange, "--routing-key", "a", "x"
    )
    assert code == 0, err
    assert [m.body for m in await admin.drain(hit)] == [b"x"]
    assert await admin.count(miss) == 0


async def test_request_prints_the_reply_of_a_running_service(make_app: Callable[..., App]) -> None:
    app = make_app()
    queue = unique("cli-req")

    @app.consumer(queue, queue_type="classic")
    async def price(item: dict[str, str], message: Message) -> dict[str, object]:
        return {"item": item["item"], "cents": 250, "tenant": message.headers.get("tenant")}

    async with app:
        url = str(app.endpoints[0].url)
        code, out, err = await cli(
            "request", "--url", url, "--queue", queue, '{"item": "tea"}', "--header", "tenant=acme"
        )
    assert code == 0, err
    assert out == '{"item":"tea","cents":250,"tenant":"acme"}\n'


async def test_the_app_url_is_used_and_failures_are_one_line_with_their_exit_code(
    broker_url: str, admin: Admin
) -> None:
    env = {"RABBITFLOW_URL": broker_url}
    queue = unique("cli-silent")
    admin.queues.add(queue)
    await admin.channel.queue_declare(queue)

    # the service's URL (examples/orders.py has url=None: RABBITFLOW_URL)
    code, _, err = await cli("publish", "--app", "examples/orders.py:app", "--queue", queue, "hi", env=env)
    assert code == 0, err
    assert len(await admin.drain(queue)) == 1

    failures = {
        "unroutable": ("publish", "--queue", unique("nobody"), "x"),
        "no-exchange": ("publish", "--exchange", unique("nox"), "--routing-key", "k", "x"),
        "timeout": ("request", "--queue", queue, "--timeout", "1", "x"),  # nobody consumes it
    }
    for kind, args in failures.items():
        code, _, err = await cli(*args, env=env)
        assert code == EXIT_CODES[kind], (kind, err)
        assert len(err.strip().splitlines()) == 1, err
        assert err.startswith("rabbitflow: ")
    assert "does not exist" in (await cli(*failures["no-exchange"], env=env))[2]
    assert len(await admin.drain(queue)) == 1  # the request was published; its reply never came

    wrong = broker_url.replace("guest:guest@", "guest:not-the-password@")
    code, _, err = await cli("publish", "--url", wrong, "--queue", queue, "x")
    assert code == EXIT_CODES["login-refused"]
    assert "refused the login" in err
    assert "not-the-password" not in err
    code, _, err = await cli(
        "publish", "--url", "amqp://guest:guest@127.0.0.1:1/", "--connect-timeout", "1", "--queue", queue, "x"
    )
    assert code == EXIT_CODES["unreachable"]
    assert len(err.strip().splitlines()) == 1, err
