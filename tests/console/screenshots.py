"""Draw docs/console/*.png: each console page of a running service, in headless Chromium.

    python -m tests.console.screenshots [SECONDS]   # needs the broker; SECONDS of traffic first (45)

Runs the scenario of the browser test (tests/console/scenario.py): a service with orders parked
for three reasons, one of them with a hostile body and header.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from .browser import chromium
from .scenario import TOKEN, shop

OUT = Path(__file__).resolve().parents[2] / "docs" / "console"


async def main(traffic: float) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    async with shop(traffic=traffic) as the_shop, chromium(1280, 760) as browser:
        page = await browser.new_page()

        async def shot(name: str) -> None:
            await page.screenshot(path=str(OUT / f"{name}.png"), full_page=True)
            print(f"wrote {OUT / name}.png")

        await page.goto(f"{the_shop.url}/login")
        await shot("login")
        await page.fill("input[name=token]", TOKEN)
        await page.click("button[type=submit]")
        await page.wait_for_selector("table.consumers")
        await shot("overview")
        await page.goto(f"{the_shop.url}/parked?queue={the_shop.orders}")
        await shot("parked")
        await page.locator("table.groups tbody tr", has_text="ValueError").locator("td a").first.click()
        await shot("group")
        await page.click("text=order-666")
        await shot("message")
        await page.go_back()
        the_shop.failing = False
        await page.click("text=replay this group")
        await shot("confirm")
        await page.click("button[type=submit]")
        await page.wait_for_selector(".result")
        await shot("done")


if __name__ == "__main__":
    asyncio.run(main(float(sys.argv[1]) if len(sys.argv) > 1 else 45.0))
