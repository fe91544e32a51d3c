"""The documentation site: it builds strictly, its generated pages are current, its examples
run, and the topology page draws its diagram offline in a real browser (headless Chromium).

In CI (CI=true) a missing mkdocs or Chromium fails the test; elsewhere it skips, saying what to
install (`make test` installs both)."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PYTEST = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]


def require(what: str, found: object, install: str) -> None:
    if found:
        return
    message = f"{what} is missing: {install} (`make test` sets it up)"
    if os.environ.get("CI") == "true":
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def cli_reference() -> str:
    spec = importlib.util.spec_from_file_location("cli_reference", DOCS / "hooks" / "cli_reference.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    text: str = module.render()
    return text


def fenced(page: Path, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```$", page.read_text(), flags=re.S | re.M)


def rabbitflow(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rabbitflow", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "PYTHONPATH": str(ROOT), "RABBITFLOW_URL": "amqp://guest:guest@127.0.0.1:1/"},
    )


def test_the_cli_reference_page_is_current() -> None:
    page = (DOCS / "cli.md").read_text()
    assert page == cli_reference(), "docs/cli.md is stale: run `make docs` and commit it"
    for option in ("--version", "--reload", "--delete", "--force", "--format", "parked replay"):
        assert option in page


def test_the_topology_page_shows_what_the_cli_prints() -> None:
    printed = rabbitflow("topology", "examples/orders.py:app", "--format", "mermaid")
    assert printed.returncode == 0, printed.stderr
    [diagram] = fenced(DOCS / "topology.md", "mermaid")
    assert diagram == printed.stdout.rstrip("\n") + "\n"
    assert "<locals>" not in diagram


def test_the_getting_started_service_and_its_test_work(tmp_path: Path) -> None:
    blocks = fenced(DOCS / "getting-started.md", "python")
    [service] = [b for b in blocks if b.startswith("from dataclasses")]
    [test] = [b for b in blocks if b.startswith("# test_service.py")]
    (tmp_path / "service.py").write_text(service)
    (tmp_path / "test_service.py").write_text(test)

    shown = rabbitflow("topology", "service.py:app", cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    for name in ("shop.orders.retry.1s", "shop.orders.retry.5s", "shop.orders.parked", "shop.dlx"):
        assert name in shown.stdout  # what the page says it declares

    ran = subprocess.run(  # as the page says: RABBITFLOW_URL=memory:// pytest, asyncio_mode = "auto"
        [*PYTEST, "-o", "asyncio_mode=auto", "-o", "asyncio_default_fixture_loop_scope=function"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT), "RABBITFLOW_URL": "memory://"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert "1 passed" in ran.stdout


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def test_the_site_builds_and_draws_the_topology_offline(tmp_path: Path) -> None:
    mkdocs = shutil.which("mkdocs", path=str(Path(sys.executable).parent)) or shutil.which("mkdocs")
    require("mkdocs", mkdocs, "pip install -e '.[docs]'")
    browser = chromium()
    require("Chromium", browser, "apt-get install chromium")
    assert mkdocs is not None
    assert browser is not None
    site = tmp_path / "site"
    built = subprocess.run(
        [mkdocs, "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert built.returncode == 0, built.stderr
    page = site / "topology" / "index.html"
    assert "https://" not in "".join(re.findall(r'<script[^>]*src="[^"]*"', page.read_text()))

    dom = subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",  # root, as in CI
            "--disable-gpu",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--host-resolver-rules=MAP * ~NOTFOUND",  # no network: every host fails to resolve
            "--virtual-time-budget=10000",  # let the scripts run before the DOM is dumped
            "--dump-dom",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert dom.returncode == 0, dom.stderr[-2000:]
    svgs = re.findall(r"<svg[^>]*aria-roledescription=\"flowchart[^\"]*\".*?</svg>", dom.stdout, flags=re.S)
    assert len(svgs) == 1, "the topology page shows no Mermaid diagram"
    labels = re.sub(r"<[^>]+>", " ", svgs[0])
    for name in ("orders.created.retry.30s", "orders.dlx (direct)", "orders.create_app.on_created"):
        assert name in labels
