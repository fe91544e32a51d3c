"""The console in a real browser (headless Chromium) on a running service and the real broker:
what it shows matches the parking queue, hostile bodies and headers read as text, and a group's
replay sends its messages back to the queue that failed them and nowhere else."""

from __future__ import annotations

import asyncio
import logging
import re

import pytest
from playwright.async_api import Dialog, Page, expect

from rabbitflow.parking.message import Filter

from .browser import chromium, require_chromium
from .scenario import HOSTILE_HEADER, TOKEN, Shop, shop


@pytest.fixture(autouse=True)
def _chromium() -> None:
    require_chromium()


async def log_in(page: Page, shop: Shop) -> None:
    await page.goto(f"{shop.url}/")
    await expect(page).to_have_url(re.compile(r"/console/login$"))  # a token is set: no session, no page
    await page.fill("input[name=token]", TOKEN)
    await page.click("button[type=submit]")
    await expect(page.locator("h1")).to_have_text("Overview")


async def test_the_console_shows_the_parking_lot_and_replays_a_group_to_its_queue_only(
    broker_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="rabbitflow.console")
    async with shop() as the_shop, chromium() as browser:
        admin = the_shop.app.admin()
        listing = await admin.list_parked(the_shop.orders)
        assert listing.total == 5
        page = await browser.new_page()
        dialogs: list[str] = []

        async def on_dialog(dialog: Dialog) -> None:
            dialogs.append(dialog.message)
            await dialog.dismiss()

        page.on("dialog", on_dialog)

        await log_in(page, the_shop)
        row = page.locator("table.consumers tr", has_text=the_shop.orders)
        await expect(row.locator("td").nth(1)).to_have_text("yes")  # subscribed
        await expect(row.locator("td").nth(4)).to_have_text("no")  # not stalled
        await expect(row.locator("td").nth(9)).to_have_text(str(listing.total))  # parked

        await row.locator("td").nth(9).locator("a").click()
        groups = page.locator("table.groups tbody tr")
        await expect(groups).to_have_count(len(listing.groups))
        for i, group in enumerate(listing.groups):
            cells = groups.nth(i).locator("td")
            await expect(cells.nth(0)).to_have_text(str(group.count))
            await expect(cells.nth(1)).to_have_text(group.reason or "-")
            await expect(cells.nth(2)).to_have_text(group.exception or "-")
        value_errors = next(g for g in listing.groups if g.exception.endswith("ValueError"))
        assert value_errors.count == 3

        await groups.filter(has_text="ValueError").locator("td").nth(0).locator("a").click()
        ids = page.locator("table.messages tbody tr td:nth-child(2)")
        await expect(ids).to_have_text(the_shop.bad_ids)

        await page.click("text=order-666")
        await expect(page.locator("pre.body")).to_contain_text("<script>alert('body')</script>")
        await expect(page.locator("table.headers")).to_contain_text(HOSTILE_HEADER[0])
        await expect(page.locator("table.headers")).to_contain_text(HOSTILE_HEADER[1])
        await expect(page.locator("pre.traceback")).to_contain_text("ValueError: price must be positive")
        assert await page.locator("img, script, b").count() == 0  # text, never markup

        await page.go_back()
        before = await the_shop.sibling_count()
        the_shop.failing = False  # the downstream is fixed: a replayed order now goes through
        await page.click("text=replay this group")
        await expect(page.locator(".confirm .count")).to_have_text("3")
        assert await admin.list_parked(the_shop.orders) == listing  # confirming changed nothing
        await page.click("button[type=submit]")
        await expect(page.locator(".result .count")).to_have_text("3")

        async with asyncio.timeout(10):
            while sorted(the_shop.handled) != sorted(the_shop.bad_ids):  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        after = await admin.list_parked(the_shop.orders)
        assert after.total == 2
        assert {g.reason for g in after.groups} == {"rejected", "decode-error"}
        assert await admin.show_parked(the_shop.orders, filter=Filter(message_id="order-666")) is None
        assert await the_shop.sibling_count() == before  # the sibling queue got none of them
        assert dialogs == []  # no script from a body or header ever ran
    logged = [r.getMessage() for r in caplog.records if "replayed" in r.getMessage()]
    assert len(logged) == 1
    assert "replayed 3 of 5 parked message(s)" in logged[0]
    assert TOKEN not in caplog.text


async def test_a_read_only_console_shows_no_buttons_and_refuses_actions(broker_url: str) -> None:
    async with shop() as the_shop, chromium() as browser:
        from rabbitflow.console import console_app
        from rabbitflow.http import serve

        read_only = await serve(the_shop.app, 0, console=console_app(the_shop.app, token=""))
        try:
            page = await browser.new_page()
            base = f"http://127.0.0.1:{read_only.port}/console"
            await page.goto(f"{base}/parked?queue={the_shop.orders}")
            await expect(page.locator(".mode")).to_have_text("read-only")
            await expect(page.locator("table.groups tbody tr")).to_have_count(3)
            assert await page.locator("a.button").count() == 0
            response = await page.goto(f"{base}/confirm?queue={the_shop.orders}&action=purge")
            assert response is not None
            assert response.status == 403
        finally:
            await read_only.close()
        assert (await the_shop.app.admin().list_parked(the_shop.orders)).total == 5
