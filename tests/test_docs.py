"""The documentation site: it builds strictly, its generated pages are current, its examples
run, and the topology page draws its diagram offline in a real browser (headless Chromium).

In CI (CI=true) a missing mkdocs or Chromium fails the test; elsewhere it skips, saying what to
install (`make test` installs both)."""

from __future__ import annotations

import argparse
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
    [settings] = fenced(DOCS / "getting-started.md", "toml")
    (tmp_path / "service.py").write_text(service)
    (tmp_path / "test_service.py").write_text(test)
    (tmp_path / "pyproject.toml").write_text(settings)  # the page's pytest settings

    shown = rabbitflow("topology", "service.py:app", cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    for name in ("shop.orders.retry.1s", "shop.orders.retry.5s", "shop.orders.parked", "shop.dlx"):
        assert name in shown.stdout  # what the page says it declares

    ran = subprocess.run(  # as the page says: RABBITFLOW_URL=memory:// pytest, with its pyproject.toml
        PYTEST,
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


# -- every code block is run, or marked as a fragment --------------------------------------------

PAGES = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]
FRAGMENT = re.compile(r"^\s*<!-- fragment: .+ -->$")
# The blocks the tests above and below run, by page and the start of their first line.
RUN = {
    ("getting-started.md", "from dataclasses"),  # test_the_getting_started_service_and_its_test_work
    ("getting-started.md", "# test_service.py"),
    ("getting-started.md", "[tool.pytest.ini_options]"),
    ("getting-started.md", "rabbitflow topology service.py:app"),
    ("topology.md", "flowchart LR"),  # test_the_topology_page_shows_what_the_cli_prints
    ("asyncapi.md", "{"),  # test_the_asyncapi_page_shows_what_the_cli_prints
    ("testing.md", "from rabbitflow import App, Message"),  # test_the_testing_page_example_passes
    # tests/testing/test_faststream_page.py: the page's blocks are one service and its test
    ("faststream.md", "from collections.abc import Iterator"),
    ("faststream.md", "router = Router()"),
    ("faststream.md", "async def price_of(order: Order) -> int:"),
    ("faststream.md", '@app.consumer("audit")'),
    ("faststream.md", "# test_service.py"),
}


def blocks(page: Path) -> list[tuple[int, str, str, str]]:
    """(line, language, first line, the line above) of each fenced block of `page`."""
    lines = page.read_text().splitlines()
    found = []
    n = 0
    while n < len(lines):
        opening = re.match(r"^\s*```(\S*)", lines[n])
        if opening is None:
            n += 1
            continue
        end = next(k for k in range(n + 1, len(lines)) if re.match(r"^\s*```\s*$", lines[k]))
        above = next((lines[k] for k in range(n - 1, -1, -1) if lines[k].strip()), "")
        found.append((n + 1, opening.group(1), lines[n + 1].strip() if n + 1 < end else "", above))
        n = end + 1
    return found


def test_every_code_block_is_run_by_the_tests_or_marked_as_a_fragment() -> None:
    unaccounted = []
    for page in PAGES:
        if page.name == "cli.md":  # generated from the parser: test_the_cli_reference_page_is_current
            continue
        for line, language, first, above in blocks(page):
            ran = any(page.name == name and first.startswith(start) for name, start in RUN)
            if not ran and not FRAGMENT.match(above):
                unaccounted.append(f"{page.relative_to(ROOT)}:{line} ```{language} {first[:50]!r}")
    assert not unaccounted, (
        "blocks neither run by a test nor marked `<!-- fragment: why -->` on the line above:\n"
        + "\n".join(unaccounted)
    )
    for name, start in RUN:  # every block the tests claim to run is still on its page
        assert any(first.startswith(start) for _, _, first, _ in blocks(DOCS / name)), (name, start)


def test_the_asyncapi_page_shows_what_the_cli_prints() -> None:
    environ = {k: v for k, v in os.environ.items() if k != "RABBITFLOW_URL"}  # the App's default URL
    printed = subprocess.run(
        [sys.executable, "-m", "rabbitflow", "asyncapi", "examples/orders.py:app"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**environ, "PYTHONPATH": str(ROOT)},
    )
    assert printed.returncode == 0, printed.stderr
    [document] = fenced(DOCS / "asyncapi.md", "json")
    assert document == printed.stdout


def test_the_rendered_asyncapi_page_of_the_example_is_current() -> None:
    environ = {k: v for k, v in os.environ.items() if k != "RABBITFLOW_URL"}  # the App's default URL
    printed = subprocess.run(
        [sys.executable, "-m", "rabbitflow", "asyncapi", "examples/orders.py:app", "--format", "markdown"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**environ, "PYTHONPATH": str(ROOT)},
    )
    assert printed.returncode == 0, printed.stderr
    assert (DOCS / "asyncapi-orders.md").read_text() == printed.stdout, (
        "docs/asyncapi-orders.md is stale: rabbitflow asyncapi examples/orders.py:app --format markdown "
        "--out docs/asyncapi-orders.md"
    )
    page = printed.stdout
    assert "### `orders.created`" in page
    assert "- retries: 3, after 1 s, 5 s, 30 s" in page
    assert "- parked in `orders.created.parked`" in page
    assert "| `quantity` | integer | yes |" in page  # the dataclass's fields


def test_the_testing_page_example_passes(tmp_path: Path) -> None:
    [example] = [
        b for b in fenced(DOCS / "testing.md", "python") if b.startswith("from rabbitflow import App")
    ]
    (tmp_path / "test_example.py").write_text(example)
    ran = subprocess.run(
        [*PYTEST, "-o", "asyncio_mode=auto", "-o", "asyncio_default_fixture_loop_scope=function"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert "1 passed" in ran.stdout


# -- every documented flag exists ----------------------------------------------------------------


def documented_commands() -> list[tuple[str, list[str]]]:
    """(where, words) of every `rabbitflow ...` command in the README and the docs: an inline code
    span that starts with it, or a line of a shell or output block that does (`$ ` allowed)."""
    found = []
    for page in PAGES:
        language: str | None = None  # inside a fenced block: its language
        for number, line in enumerate(page.read_text().splitlines(), 1):
            fence = re.match(r"^\s*```(\S*)", line)
            if fence is not None:
                language = fence.group(1) if language is None else None
                continue
            where = f"{page.relative_to(ROOT)}:{number}"
            if language is None:
                spans = re.findall(r"`(rabbitflow [^`]+)`", line)
            elif language in ("", "sh", "text", "console"):
                spans = re.findall(r"^\s*(?:\$ )?(rabbitflow .*)", line)
            else:
                spans = []
            for span in spans:
                command = re.split(r"\s[#|;]|\s&&|\\\|", span)[0]
                found.append((where, command.split()[1:]))
    return found


def _subcommands(command: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in command._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def test_every_documented_command_and_flag_exists() -> None:
    from rabbitflow.cli.main import parser

    top = parser()
    problems = []
    checked = 0
    for where, words in documented_commands():
        command = top
        path = ["rabbitflow"]
        for word in words:
            subs = _subcommands(command)
            if not subs or word.startswith("-"):
                break
            if word.isupper() or word.startswith("["):
                break  # a placeholder (COMMAND, ACTION) or an optional part of a synopsis
            unknown = [w for w in word.split("|") if w not in subs]
            if unknown:
                problems.append(f"{where}: {' '.join(path)} has no command {unknown[0]!r}")
                break
            command = subs[word.split("|")[0]]
            path.append(word)
        options = {o for action in command._actions for o in action.option_strings}
        for word in words:
            flag = word.split("=", 1)[0]
            if re.fullmatch(r"--[a-z][a-z0-9-]*", flag):
                checked += 1
                if flag not in options:
                    problems.append(f"{where}: {' '.join(path)} has no option {flag}")
    assert checked > 30  # the docs do document flags: the scan finds them
    assert not problems, "\n".join(problems)
