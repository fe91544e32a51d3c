"""MODULE:APP as the docs offer it: file paths from the current directory, files inside packages,
and one line (no traceback) for each way it can go wrong."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.unit


def topology(cwd: Path, target: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rabbitflow", "topology", target],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def test_a_file_inside_a_package_imports_as_the_packages_module(tmp_path: Path) -> None:
    shop = tmp_path / "shop"
    shop.mkdir()
    (shop / "__init__.py").write_text("")
    (shop / "names.py").write_text('SERVICE = "pricing"\n')
    (shop / "pricing.py").write_text(
        "from rabbitflow import App\n"
        "from .names import SERVICE  # a relative import: only works inside the package\n"
        "app = App(SERVICE)\n"
        "@app.consumer('pricing.requests')\n"
        "async def price(body: dict) -> dict:\n"
        "    return body\n"
    )
    for target in ("shop/pricing.py:app", "shop/pricing.py", "shop.pricing:app", "./shop/pricing.py"):
        shown = topology(tmp_path, target)
        assert shown.returncode == 0, (target, shown.stderr)
        assert shown.stdout.startswith("service pricing\n")
        assert "pricing.requests -> shop.pricing.price" in shown.stdout  # its real module name
    (tmp_path / "loose.py").write_text("from rabbitflow import App\napp = App('loose')\n")
    assert topology(tmp_path, "loose.py").stdout.startswith("service loose\n")


@pytest.mark.parametrize(
    ("source", "target", "said"),
    [
        ("import nothere\n", "broken.py", "rabbitflow: cannot import 'broken.py': ModuleNotFoundError: "),
        ("x = 1 / 0\n", "broken.py:app", "rabbitflow: cannot import 'broken.py': ZeroDivisionError: "),
        ("def (:\n", "broken.py", "rabbitflow: cannot import 'broken.py': SyntaxError: "),
        ("from rabbitflow import App\nother = App('x')\n", "broken.py", "rabbitflow: broken.py:app is not a"),
        ("", "missing.py", "rabbitflow: no such file 'missing.py'"),
        ("", "no_such_module:app", "rabbitflow: cannot import 'no_such_module': no module named"),
    ],
)
def test_a_module_that_cannot_load_is_one_line(tmp_path: Path, source: str, target: str, said: str) -> None:
    if source:
        (tmp_path / "broken.py").write_text(source)
    failed = topology(tmp_path, target)
    assert failed.returncode == 1
    assert failed.stderr.startswith(said), failed.stderr
    assert len(failed.stderr.strip().splitlines()) == 1, failed.stderr
    assert "Traceback" not in failed.stderr
    if "ZeroDivision" in failed.stderr:
        assert "broken.py, line 1)" in failed.stderr  # where it went wrong
    if "other = App" in source:
        assert failed.stderr.strip().endswith("App objects in it: other")
