"""Headless Chromium (Debian's /usr/bin/chromium) driven by Playwright, with a fresh profile."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import AsyncIterator

import pytest
from playwright.async_api import BrowserContext, async_playwright

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def require_chromium() -> None:
    """In CI (CI=true) a missing Chromium fails the test; elsewhere it skips, saying what to do."""
    if not os.path.exists(CHROMIUM):
        message = f"no Chromium at {CHROMIUM}: apt-get install chromium"
        if os.environ.get("CI") == "true":
            pytest.fail(message, pytrace=False)
        pytest.skip(message)


@contextlib.asynccontextmanager
async def chromium(width: int = 1280, height: int = 800) -> AsyncIterator[BrowserContext]:
    """A browser context on a profile of its own (`--user-data-dir`), removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="rf-console-chromium-") as profile:
        async with async_playwright() as playwright:
            context = await playwright.chromium.launch_persistent_context(
                profile,
                executable_path=CHROMIUM,
                headless=True,
                args=FLAGS,
                viewport={"width": width, "height": height},
            )
            try:
                yield context
            finally:
                await context.close()
