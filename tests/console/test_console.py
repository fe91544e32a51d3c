"""The console as an ASGI app mounted in FastAPI, on the in-memory broker: what it shows, who may
act, what a cross-site request gets, and that an action never touches more than was confirmed."""

from __future__ import annotations

import asyncio
import logging
import re
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from rabbitflow import App, ConfigError
from rabbitflow.console import Rates, console_app
from rabbitflow.http import serve

TOKEN = "s3cret-operator-token"
HOSTILE = "<script>alert(1)</script>"


def make_service() -> tuple[App, list[int]]:
    app = App("shop", url="memory://")
    handled: list[int] = []

    @app.consumer("orders", retries=0)
    async def on_order(order: dict[str, Any]) -> None:
        if order.get("bad"):
            raise ValueError(f"bad order {order['id']} {HOSTILE}")
        handled.append(order["id"])

    return app, handled


async def park(app: App, *ids: int) -> None:
    before = (await app.admin().list_parked("orders", limit=0)).total if ids else 0
    for n in ids:
        await app.publish(
            {"id": n, "bad": True, "note": HOSTILE},
            routing_key="orders",
            message_id=f"m{n}",
            headers={"<img src=x onerror=alert(2)>": HOSTILE},
        )
    async with asyncio.timeout(5):
        while (await app.admin().list_parked("orders", limit=0)).total < before + len(ids):  # noqa: ASYNC110
            await asyncio.sleep(0.01)


@asynccontextmanager
async def mounted(app: App, **options: Any) -> AsyncIterator[httpx.AsyncClient]:
    web = FastAPI()
    web.mount("/ops/console", console_app(app, **options))
    transport = httpx.ASGITransport(app=web)
    async with app, httpx.AsyncClient(transport=transport, base_url="http://ops.local") as client:
        yield client


SAME_SITE = {"origin": "http://ops.local", "sec-fetch-site": "same-origin"}


async def log_in(client: httpx.AsyncClient) -> str:
    """Logs in; returns the form token of the overview page."""
    answer = await client.post("/ops/console/login", data={"token": TOKEN}, headers=SAME_SITE)
    assert answer.status_code == 303
    assert "HttpOnly" in answer.headers["set-cookie"]
    assert "SameSite=Strict" in answer.headers["set-cookie"]
    page = await client.get("/ops/console/")
    found = re.search(r'name="csrf" value="([0-9a-f]+)"', page.text)
    assert found is not None
    return found.group(1)


async def test_mounted_in_fastapi_it_shows_the_parking_lot_with_every_value_as_text() -> None:
    app, _ = make_service()
    async with mounted(app) as client:
        await park(app, 1, 2)
        overview = await client.get("/ops/console/")
        assert overview.status_code == 200
        assert 'href="/ops/console/parked?queue=orders">2</a>' in overview.text  # the parked count
        pages = [
            overview,
            await client.get("/ops/console/parked", params={"queue": "orders"}),
            await client.get(
                "/ops/console/group",
                params={"queue": "orders", "reason": "exhausted", "exception": "builtins.ValueError"},
            ),
            await client.get("/ops/console/message", params={"queue": "orders", "id": "m1"}),
            await client.get("/ops/console/message", params={"queue": "orders", "position": "1"}),
        ]
        for page in pages:
            assert page.status_code == 200, page.text
            assert "<script" not in page.text
            assert "<img" not in page.text
            assert page.headers["content-security-policy"].startswith("default-src 'none'")
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in pages[3].text  # body, header, error
        assert "&lt;img src=x onerror=alert(2)&gt;" in pages[3].text
        assert "Message m2" in pages[4].text
        assert "read-only" in pages[1].text
        assert "/confirm" not in pages[1].text
        missing = await client.get("/ops/console/parked", params={"queue": "not-ours"})
        assert missing.status_code == 404


async def test_actions_need_a_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RABBITFLOW_CONSOLE_TOKEN", raising=False)
    app, _ = make_service()
    with pytest.raises(ConfigError, match="RABBITFLOW_CONSOLE_TOKEN"):
        console_app(app, enable_actions=True)
    monkeypatch.setenv("RABBITFLOW_CONSOLE_TOKEN", TOKEN)
    assert "actions=on" in repr(console_app(app, enable_actions=True))
    assert TOKEN not in repr(console_app(app, enable_actions=True))


async def test_with_a_token_every_page_needs_a_session(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="rabbitflow.console")
    app, _ = make_service()
    async with mounted(app, token=TOKEN, enable_actions=True) as client:
        first = await client.get("/ops/console/parked", params={"queue": "orders"})
        assert first.status_code == 303
        assert first.headers["location"] == "/ops/console/login"
        wrong = await client.post("/ops/console/login", data={"token": "guess"}, headers=SAME_SITE)
        assert wrong.status_code == 403
        await log_in(client)
        page = await client.get("/ops/console/")
        assert page.status_code == 200
        assert "actions enabled" in page.text
        assert TOKEN not in page.text
        logout = await client.post(
            "/ops/console/logout",
            data={"csrf": re.findall(r'value="([0-9a-f]{64})"', page.text)[0]},
            headers=SAME_SITE,
        )
        assert logout.status_code == 303
        assert (await client.get("/ops/console/")).status_code == 303  # the session is gone
    assert "refused a login" in caplog.text
    assert TOKEN not in caplog.text


@pytest.mark.parametrize(
    ("headers", "with_csrf"),
    [
        ({"origin": "http://evil.example", "sec-fetch-site": "cross-site"}, True),
        ({"sec-fetch-site": "same-site"}, True),
        ({"origin": "null"}, True),
        (SAME_SITE, False),
    ],
    ids=["other-origin", "sibling-subdomain", "opaque-origin", "no-form-token"],
)
async def test_a_cross_site_or_tokenless_post_changes_nothing(
    headers: dict[str, str], with_csrf: bool
) -> None:
    app, _ = make_service()
    async with mounted(app, token=TOKEN, enable_actions=True) as client:
        await park(app, 1)
        csrf = await log_in(client)
        form = {
            "queue": "orders",
            "action": "purge",
            "expected": "1",
            **({"csrf": csrf} if with_csrf else {}),
        }
        answer = await client.post("/ops/console/act", data=form, headers=headers)
        assert answer.status_code == 403
        assert (await app.admin().list_parked("orders")).total == 1


async def test_an_action_touches_no_more_messages_than_were_confirmed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="rabbitflow.console")
    app, _ = make_service()
    async with mounted(app, token=TOKEN, enable_actions=True) as client:
        await park(app, 1, 2, 3)
        csrf = await log_in(client)
        confirm = await client.get("/ops/console/confirm", params={"queue": "orders", "action": "purge"})
        assert '<strong class="count">3</strong>' in confirm.text
        expected = re.search(r'name="expected" value="(\d+)"', confirm.text)
        assert expected is not None
        assert expected.group(1) == "3"
        await park(app, 4, 5)  # parked while the operator reads the confirmation
        form = {"csrf": csrf, "queue": "orders", "action": "purge", "expected": expected.group(1)}
        done = await client.post("/ops/console/act", data=form, headers=SAME_SITE)
        assert done.status_code == 200
        assert '<strong class="count">3</strong>' in done.text
        left = await app.admin().list_parked("orders")
        assert [m.message_id for m in left.messages] == ["m4", "m5"]
    assert "purged 3 of 5 parked message(s) of 'orders'" in caplog.text


async def test_the_server_serves_health_metrics_and_the_console_on_one_port() -> None:
    app, _ = make_service()
    async with app:
        server = await serve(app, 0, console=console_app(app))
        try:
            assert server.host == "127.0.0.1"  # the console shows bodies: local unless told otherwise

            def get(path: str) -> tuple[int, str]:
                with urllib.request.urlopen(f"http://127.0.0.1:{server.port}{path}", timeout=5) as response:
                    return response.status, response.read().decode()

            status, health = await asyncio.to_thread(get, "/health")
            assert status == 200
            assert '"healthy":true' in health
            status, page = await asyncio.to_thread(get, "/console/")
            assert status == 200
            assert 'href="/console/console.css"' in page
            status, css = await asyncio.to_thread(get, "/console/console.css")
            assert status == 200
            assert "font-family" in css
        finally:
            await server.close()


def test_rates_count_per_second_and_average_over_buckets() -> None:
    rates = Rates(seconds=120)
    now = 1_000_000
    for second in range(now - 20, now):
        rates.count("orders", "handled", 5, now=second)
    rates.count("orders", "parked", 10, now=now - 5)
    series = rates.series("orders", minutes=1, step=10, now=now)
    assert series["handled"] == [0.0, 0.0, 0.0, 0.0, 5.0, 5.0]
    assert series["parked"] == [0.0, 0.0, 0.0, 0.0, 0.0, 1.0]
    later = rates.series("orders", minutes=1, step=10, now=now + 200)  # the ring wrapped: all gone
    assert later == {}


def test_rates_from_health_snapshots_spread_the_count_over_the_seconds_between() -> None:
    rates = Rates()
    rates.snapshot({"consumers": [{"queue": "orders", "settled": 100}]}, now=1000.0)
    rates.snapshot({"consumers": [{"queue": "orders", "settled": 150}]}, now=1010.0)
    assert rates.series("orders", minutes=1, step=10, now=1011)["settled"][-1] == 5.0
    rates.snapshot({"consumers": [{"queue": "orders", "settled": 20}]}, now=1020.0)  # a new session
    assert rates.series("orders", minutes=1, step=10, now=1021)["settled"][-1] == 2.0


async def test_a_query_or_form_with_too_many_fields_is_a_400_and_the_next_request_is_served(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app, _ = make_service()
    async with app:
        server = await serve(app, 0, console=console_app(app, token="t0ken"))
        try:

            def call(path: str, data: bytes | None = None) -> int:
                try:
                    with urllib.request.urlopen(
                        f"http://127.0.0.1:{server.port}{path}", data=data, timeout=5
                    ) as response:
                        return int(response.status)
                except urllib.error.HTTPError as error:
                    return int(error.code)

            many = "&".join(f"a{i}=1" for i in range(40))
            assert await asyncio.to_thread(call, f"/console/?{many}") == 400
            assert await asyncio.to_thread(call, "/console/login", many.encode()) in (400, 403)
            assert await asyncio.to_thread(call, "/health") == 200  # the neighbour
        finally:
            await server.close()
    assert "answering a request failed" not in caplog.text
