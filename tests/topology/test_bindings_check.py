"""`topology --check --management-url`: bindings and the consumers of the plan's queues compared
with the management API's view (a pure comparison), and a plain sentence when it cannot be
reached; `topology` text and mermaid show publish_to destinations."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from rabbitflow import App
from rabbitflow.admin import compare_bindings
from rabbitflow.topology.render import render

from ..helpers import Admin, unique

ROOT = Path(__file__).resolve().parents[2]


def shop() -> App:
    app = App("shop", url="memory://")

    @app.consumer("shop.orders", exchange="shop", routing_key="order.created", retries=1, delay=5)
    async def on_order(body: dict[str, Any]) -> dict[str, Any]:
        return body

    return app


def live(app: App) -> list[dict[str, Any]]:
    """The bindings the management API lists once the plan is declared (plus the default
    exchange's implicit ones, which it lists too)."""
    found: list[dict[str, Any]] = [
        {
            "source": b.exchange,
            "destination": b.queue,
            "destination_type": "queue",
            "routing_key": b.routing_key,
        }
        for b in app.plan.bindings
    ]
    found += [
        {"source": "", "destination": q.name, "destination_type": "queue", "routing_key": q.name}
        for q in app.plan.queues
    ]
    return found


@pytest.mark.unit
def test_matching_bindings_and_own_consumers_are_no_difference() -> None:
    app = shop()
    consumers = [{"queue": {"name": "shop.orders"}, "channel_details": {"connection_name": "shop:consume"}}]
    assert compare_bindings(app.plan, live(app), consumers) == []


@pytest.mark.unit
def test_a_missing_binding_and_a_second_app_on_the_queue_are_reported() -> None:
    app = shop()
    bindings = [b for b in live(app) if b["source"] != "shop"]  # the consume binding is gone
    bindings.append(  # someone else's binding on our queue, and one on their own queue
        {"source": "billing", "destination": "shop.orders", "destination_type": "queue", "routing_key": "#"}
    )
    bindings.append(
        {"source": "billing", "destination": "billing.q", "destination_type": "queue", "routing_key": "#"}
    )
    bindings.append(  # an exchange-to-exchange binding is not a queue's
        {"source": "shop", "destination": "audit", "destination_type": "exchange", "routing_key": "x"}
    )
    consumers = [
        {"queue": {"name": "shop.orders"}, "channel_details": {"connection_name": "shop:consume"}},
        {"queue": {"name": "shop.orders"}, "channel_details": {"connection_name": "billing:consume"}},
        {"queue": {"name": "billing.q"}, "channel_details": {"connection_name": "billing:consume"}},
    ]
    assert compare_bindings(app.plan, bindings, consumers) == [
        "binding shop --[order.created]--> shop.orders: missing",
        "binding billing --[#]--> shop.orders: on the broker but not in the plan: does another app share "
        "queue shop.orders?",
        "queue shop.orders: consumed by billing:consume, not by service 'shop': does another app share "
        "this queue?",
    ]


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


async def test_check_says_plainly_when_the_management_api_is_not_reachable(
    broker_url: str, admin: Admin, tmp_path: Path
) -> None:
    service, queue = unique("mgmt"), unique("mgmt-q")
    (tmp_path / "svc.py").write_text(
        "from rabbitflow import App\n"
        f"app = App({service!r})\n"
        f"@app.consumer({queue!r}, queue_type='classic', retries=1, delay=5)\n"
        "async def handle(body: dict) -> None: ...\n"
    )
    app = App(service, url=broker_url)

    @app.consumer(queue, queue_type="classic", retries=1, delay=5)
    async def handle(body: dict[str, Any]) -> None: ...

    admin.forget_app(app)
    await app.declare()
    port = closed_port()
    ran = await asyncio.to_thread(
        subprocess.run,
        [
            sys.executable, "-m", "rabbitflow", "topology", "svc.py", "--check",
            "--management-url", f"http://guest:hush-hush@127.0.0.1:{port}",
        ],
        cwd=tmp_path,
        env={**os.environ, "RABBITFLOW_URL": broker_url, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )  # fmt: skip
    assert ran.returncode == 0, ran.stderr  # exchanges and queues match; bindings unknown
    lines = ran.stdout.splitlines()
    assert lines[1].startswith(
        f"could not compare bindings: management API not reachable at http://127.0.0.1:{port}"
    )
    assert lines[-1].endswith("matches the plan (exchanges and queues only; bindings not compared)")
    assert "hush-hush" not in ran.stdout + ran.stderr


MANAGEMENT_URL = os.environ.get("RABBITFLOW_TEST_MANAGEMENT_URL")


@pytest.mark.management
async def test_check_compares_bindings_through_a_real_management_api(
    broker_url: str, admin: Admin, tmp_path: Path
) -> None:
    """On a broker with the management API (the 4.0.5 node of `make test`'s second phase): the
    plan's bindings are read back, and a second app on one of the queues is reported."""
    assert MANAGEMENT_URL is not None
    service, queue, exchange = unique("mgmt"), unique("mgmt-q"), unique("mgmt-x")
    source = (
        "from rabbitflow import App\n"
        f"app = App({service!r})\n"
        f"@app.consumer({queue!r}, exchange={exchange!r}, routing_key='k',\n"
        "              queue_type='classic', retries=1, delay=5)\n"
        "async def handle(body: dict) -> None: ...\n"
    )
    (tmp_path / "svc.py").write_text(source)
    app = App(service, url=broker_url)

    @app.consumer(queue, exchange=exchange, routing_key="k", queue_type="classic", retries=1, delay=5)
    async def handle(body: dict[str, Any]) -> None: ...

    admin.forget_app(app)
    admin.exchanges.add(exchange)
    await app.declare()

    def check() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "rabbitflow",
                "topology",
                "svc.py",
                "--check",
                "--management-url",
                MANAGEMENT_URL,
            ],
            cwd=tmp_path,
            env={**os.environ, "RABBITFLOW_URL": broker_url, "PYTHONPATH": str(ROOT)},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    matching = await asyncio.to_thread(check)
    assert matching.returncode == 0, matching.stdout + matching.stderr
    assert "could not compare bindings" not in matching.stdout
    assert "bindings not compared" not in matching.stdout
    password = MANAGEMENT_URL.split("//", 1)[1].split("@", 1)[0].split(":", 1)[-1]
    assert f":{password}@" not in matching.stdout + matching.stderr

    # Another app binds the same queue elsewhere: the check says so (the management API has
    # the binding waited for; it updates its view asynchronously).
    await admin.channel.queue_bind(queue, "amq.topic", routing_key="someone.else")
    for _ in range(50):
        shared = await asyncio.to_thread(check)
        if "another app" in shared.stdout:
            break
        await asyncio.sleep(0.2)
    assert "amq.topic" in shared.stdout, shared.stdout
    assert "another app" in shared.stdout, shared.stdout
    assert shared.returncode != 0


@pytest.mark.unit
def test_text_and_mermaid_show_publish_to_destinations() -> None:
    app = App("pt", url="memory://")

    @app.consumer("pt.in", exchange="pt", routing_key="in", publish_to=("pt", "out"))
    async def h(body: dict[str, Any]) -> dict[str, Any]:
        return body

    @app.consumer("pt.two", publish_to="pt.answers")
    async def g(body: dict[str, Any]) -> dict[str, Any]:
        return body

    destinations = {c.queue: c.publish_to for c in app.consumers if c.publish_to is not None}
    text = render(app.plan, "text", destinations)
    assert "  pt.in -> exchange pt with routing key 'out'" in text
    assert "  pt.two -> exchange (default) with routing key 'pt.answers'" in text
    mermaid = render(app.plan, "mermaid", destinations).splitlines()
    handler = next(
        line.split()[2] for line in mermaid if "(test_bindings_check.test_text" in line or "h([" in line
    )
    assert any('== "publish_to: out" ==> x_pt' in line for line in mermaid), handler
    assert '  x_default{{"(default exchange)"}}' in mermaid
    assert any('== "publish_to: pt.answers" ==> x_default' in line for line in mermaid)
    assert render(app.plan, "text") == render(app.plan, "text", {}).split("\n\npublishes")[0]
