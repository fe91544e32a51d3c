"""`rabbitflow parked list|show|replay|purge` as real processes against the real broker."""

from __future__ import annotations

import contextlib
import json
import os
import pty
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from rabbitflow.cli.apps import load_app

from ..helpers import Admin, unique

ROOT = Path(__file__).resolve().parents[2]


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rabbitflow", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ},
        timeout=60,
        check=False,
    )


class Lot:
    """A service file with one consumer, its topology declared, and its parking queue filled by
    hand with what rabbitflow writes when it parks."""

    def __init__(self, path: Path, queue: str) -> None:
        self.target = f"{path}:app"
        self.queue = queue
        self.parked = f"{queue}.parked"

    def cli(self, action: str, *options: str, queue: str | None = None) -> subprocess.CompletedProcess[str]:
        return run_cli("parked", action, self.target, queue or self.queue, *options)

    def json(self, action: str, *options: str) -> Any:
        result = self.cli(action, *options, "--json")
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)


def service_file(tmp_path: Path, broker_url: str, queue: str, queue_type: str) -> Path:
    path = tmp_path / f"{unique('lot').replace('-', '_')}.py"
    path.write_text(
        "from rabbitflow import App\n"
        f"app = App({unique('svc')!r}, url={broker_url!r})\n"
        f"@app.consumer({queue!r}, queue_type={queue_type!r}, retries=0)\n"
        "async def handle(body): ...\n"
    )
    return path


async def park(
    admin: Admin, lot: Lot, n: int, reason: str = "exhausted", exception: str | None = None
) -> None:
    headers: dict[str, Any] = {
        "x-rf-reason": reason,
        "x-rf-attempts": 1 if reason == "rejected" else 3,
        "x-rf-queue": lot.queue,
        "x-rf-original-exchange": "shop",
        "x-rf-original-routing-key": "order.created",
        "x-rf-first-failure": f"2026-01-01T10:00:0{n}.000Z",
        "x-rf-last-failure": f"2026-01-01T10:01:0{n}.000Z",
        "tenant": "acme",
    }
    if exception is not None:
        headers["x-rf-exception"] = exception
        headers["x-rf-error"] = f"bad order {n}"
        headers["x-rf-traceback"] = f"Traceback (most recent call last):\n  ...\n{exception}: bad order {n}\n"
    await admin.publish(
        f'{{"n": {n}}}'.encode(),
        routing_key=lot.parked,
        message_id=f"m-{n}",
        content_type="application/json",
        headers=headers,
        delivery_mode=2,
    )


@pytest.fixture(params=["quorum", "classic"])
async def lot(request: pytest.FixtureRequest, tmp_path: Path, broker_url: str, admin: Admin) -> Lot:
    """m-0, m-2, m-4: exhausted with ValueError; m-1, m-3: rejected, no exception."""
    queue = unique("lot")
    path = service_file(tmp_path, broker_url, queue, request.param)
    app = load_app(f"{path}:app")
    admin.forget_app(app)
    await app.declare()
    found = Lot(path, queue)
    for n in range(5):
        if n % 2:
            await park(admin, found, n, "rejected")
        else:
            await park(admin, found, n, exception="builtins.ValueError")
    return found


async def parked_ids(admin: Admin, lot: Lot) -> list[str]:
    """Takes the parking queue's messages, head first (the test's last look)."""
    return [m.header.properties.message_id for m in await admin.drain(lot.parked)]


async def test_list_groups_by_reason_and_exception_and_keeps_every_message(lot: Lot, admin: Admin) -> None:
    shown = lot.json("list")
    assert list(shown) == ["queue", "total", "groups", "messages"]
    assert (shown["queue"], shown["total"]) == (lot.parked, 5)
    assert shown["groups"] == [
        {
            "reason": "exhausted",
            "exception": "builtins.ValueError",
            "count": 3,
            "first_failure": "2026-01-01T10:00:00.000Z",
            "last_failure": "2026-01-01T10:01:04.000Z",
            "error": "bad order 4",
        },
        {
            "reason": "rejected",
            "exception": None,
            "count": 2,
            "first_failure": "2026-01-01T10:00:01.000Z",
            "last_failure": "2026-01-01T10:01:03.000Z",
            "error": None,
        },
    ]
    assert [m["message_id"] for m in shown["messages"]] == ["m-0", "m-1", "m-2", "m-3", "m-4"]
    assert shown["messages"][0]["attempts"] == 3
    assert shown["messages"][0]["original_routing_key"] == "order.created"

    none = lot.json("list", "--limit", "0")
    assert (none["total"], none["messages"]) == (5, [])  # 0 means 0 (it used to list 20)
    assert lot.json("list", "--reason", "rejected", "--limit", "1")["total"] == 2

    text = lot.cli("list", queue=lot.parked)  # the .parked name works too
    assert text.returncode == 0, text.stderr
    assert f"{lot.parked}: 5 parked message(s) in 2 group(s)" in text.stdout
    assert ".parked.parked" not in text.stdout + text.stderr
    assert await parked_ids(admin, lot) == ["m-0", "m-1", "m-2", "m-3", "m-4"]  # all still there, in order


async def test_show_prints_one_message_with_its_headers_body_and_traceback(lot: Lot) -> None:
    shown = lot.cli("show", "--id", "m-2")
    assert shown.returncode == 0, shown.stderr
    assert "message id:    m-2" in shown.stdout
    assert "exception:     builtins.ValueError" in shown.stdout
    assert '  tenant: "acme"' in shown.stdout
    assert '  {"n": 2}' in shown.stdout
    assert "builtins.ValueError: bad order 2" in shown.stdout  # the traceback's last line

    head = lot.json("show")
    assert (head["message_id"], head["body"], head["headers"]["tenant"]) == ("m-0", '{"n": 0}', "acme")

    missing = lot.cli("show", "--id", "nope")
    assert missing.returncode == 1
    assert missing.stderr.strip().splitlines() == [
        f"rabbitflow: no message parked for {lot.queue!r} matching --id nope"
    ]


async def test_replay_with_a_filter_sends_only_those_back_and_keeps_the_rest_in_order(
    lot: Lot, admin: Admin
) -> None:
    dry = lot.json("replay", "--exception", "ValueError", "--dry-run")
    assert (dry["found"], dry["done"], dry["skipped"], dry["dry_run"]) == (5, 3, 2, True)
    assert await admin.count(lot.queue) == 0  # a dry run sends nothing

    replayed = lot.cli("replay", "--exception", "ValueError")
    assert replayed.returncode == 0, replayed.stderr
    assert f"replayed 3 of 5 parked message(s) to {lot.queue}" in replayed.stdout
    assert "skipped 2: not matching --exception ValueError; still parked, in their order" in replayed.stdout

    back = await admin.drain(lot.queue)
    assert [m.header.properties.message_id for m in back] == ["m-0", "m-2", "m-4"]
    headers = back[0].header.properties.headers
    assert headers["tenant"] == "acme"
    assert not any(key.startswith("x-rf-") for key in headers)  # a fresh start
    assert await parked_ids(admin, lot) == ["m-1", "m-3"]


async def test_purge_with_a_filter_removes_only_those(lot: Lot, admin: Admin) -> None:
    dry = lot.cli("purge", "--reason", "rejected", "--dry-run")
    assert "would remove 2 of 5 parked message(s)" in dry.stdout
    assert await admin.count(lot.parked) == 5

    purged = lot.json("purge", "--reason", "rejected")
    assert (purged["done"], purged["skipped"], purged["left"]) == (2, 3, 3)
    kept = await admin.drain(lot.parked)
    assert [m.header.properties.message_id for m in kept] == ["m-0", "m-2", "m-4"]
    assert kept[1].body == b'{"n": 2}'
    assert kept[1].header.properties.headers["x-rf-error"] == "bad order 2"  # unchanged


async def test_the_old_form_is_gone_with_a_clear_error(lot: Lot) -> None:
    old = run_cli("parked", lot.target, lot.queue, "--replay")
    assert old.returncode == 2
    assert "invalid choice" in old.stderr
    assert "list" in old.stderr


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


async def test_errors_exit_nonzero_with_one_line_saying_what_is_wrong(
    tmp_path: Path, broker_url: str, admin: Admin
) -> None:
    queue = unique("undeclared")
    lot = Lot(service_file(tmp_path, broker_url, queue, "quorum"), queue)

    missing = lot.cli("list")
    assert missing.returncode == 2
    assert f"queue '{queue}.parked' does not exist" in one_line(missing)

    unknown = lot.cli("list", queue="not-mine")
    assert unknown.returncode == 2
    assert "has no consumer in service" in one_line(unknown)

    bad = lot.cli("purge", "--reason", "exausted")
    assert bad.returncode == 2
    assert "use one of exhausted, rejected" in one_line(bad)

    negative = lot.cli("list", "--limit", "-1")
    assert negative.returncode == 2
    assert "-1 is negative" in negative.stderr

    down = lot.cli("list", "--url", "amqp://guest:s3cret@127.0.0.1:1/", "--timeout", "1")
    assert down.returncode == 2
    line = one_line(down)
    assert "no RabbitMQ node accepted a connection" in line
    assert "s3cret" not in down.stdout + down.stderr


def on_a_terminal(*args: str) -> tuple[subprocess.CompletedProcess[str], str]:
    """Runs the CLI with stderr on a pseudo-terminal; returns what it wrote there too."""
    controller, terminal = pty.openpty()
    try:
        result = subprocess.run(
            [sys.executable, "-m", "rabbitflow", *args],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=terminal,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        os.close(terminal)
    written = b""
    with contextlib.suppress(OSError):  # EIO once everything written was read
        while chunk := os.read(controller, 65536):
            written += chunk
    os.close(controller)
    return result, written.decode(errors="replace")


async def test_progress_is_drawn_on_stderr_only_when_it_is_a_terminal(lot: Lot) -> None:
    piped = lot.cli("replay", "--dry-run")
    assert piped.returncode == 0
    assert piped.stderr == ""  # piped or redirected: no bar
    result, terminal = on_a_terminal("parked", "replay", lot.target, lot.queue, "--dry-run")
    assert result.returncode == 0
    assert "would replay 5 of 5 parked message(s)" in result.stdout  # the report stays on stdout
    assert "replaying" in terminal
    assert "100%" in terminal


async def test_byte_array_headers_print_as_text_and_match_filters_and_show_says_where_it_came_from(
    lot: Lot, admin: Admin
) -> None:
    await admin.publish(
        b'{"n": 9}',
        routing_key=lot.parked,
        message_id="m-9",
        correlation_id="req-9",
        headers={
            "x-rf-reason": bytearray(b"rejected"),  # an AMQP byte array ('x'), as some clients write
            "x-rf-origin-service": "billing",
            "x-rf-original-exchange": "shop",
            "tenant": bytearray(b"acme"),
            "blob": bytearray(b"\xff\x00"),
        },
        delivery_mode=2,
    )
    listed = lot.json("list", "--reason", "rejected")
    assert listed["total"] == 3  # m-1, m-3 and m-9
    assert [m["message_id"] for m in listed["messages"]][-1] == "m-9"

    shown = lot.cli("show", "--id", "m-9")
    assert shown.returncode == 0, shown.stderr
    assert "bytearray" not in shown.stdout
    assert "reason:        rejected" in shown.stdout
    assert '  tenant: "acme"' in shown.stdout
    assert '  blob: "\\\\xff\\u0000"' in shown.stdout  # hex-escaped where it is not UTF-8
    assert "came from:\n  correlation id: req-9\n" in shown.stdout
    assert "  origin-service: billing" in shown.stdout
    assert "  original-exchange: shop" in shown.stdout
    assert lot.json("show", "--id", "m-9")["origin"]["x-rf-origin-service"] == "billing"
    assert len(await admin.drain(lot.parked)) == 6
