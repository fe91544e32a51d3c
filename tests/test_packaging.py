"""Packaging, the way a user's project sees rabbitflow: after `pip install -e /path/to/rabbitflow`
(what `make` does, and getting-started.md offers), `mypy --strict` in another project finds the
package and its types (py.typed), and a built wheel holds every subpackage and py.typed.

The editable check was the bug behind the switch to hatchling: setuptools' editable install of this
flat layout is an import hook, which mypy cannot follow ("Cannot find implementation or library
stub for module named 'rabbitflow'"); hatchling's is a .pth path entry.

Each test makes a fresh venv in a temporary directory and installs into it with this interpreter's
pip (`pip --python`), using pip's usual cache, so a warm run takes well under a minute; the
installs need the package index (or that cache) for hatchling and rabbitflow's dependencies. In CI
(CI=true) missing tools fail the tests; elsewhere they skip, saying what to install."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import textwrap
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PIP = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]

pytestmark = pytest.mark.timeout(600)  # a cold pip cache downloads the dependencies


def require(what: str, found: object, install: str) -> None:
    if found:
        return
    message = f"{what} is missing: {install} (`make test` sets it up)"
    if os.environ.get("CI") == "true":
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def run(*args: str | Path, cwd: Path, timeout: float = 540) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "MYPYPATH")}
    return subprocess.run(
        [str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False, env=env
    )


def pip_version() -> tuple[int, ...]:
    if importlib.util.find_spec("pip") is None:
        return ()
    from pip import __version__

    return tuple(int(part) for part in re.findall(r"\d+", __version__)[:2])


def fresh_venv(where: Path) -> Path:
    """A venv with no pip of its own (this interpreter's pip installs into it) and none of this
    environment's packages; returns its python."""
    require("pip >= 22.3 (for `pip --python`)", pip_version() >= (22, 3), "pip install --upgrade pip")
    venv.create(where, with_pip=False, symlinks=os.name != "nt")
    python = where / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    assert python.exists(), f"venv.create made no interpreter at {python}"
    return python


def pip_install(python: Path, *args: str, cwd: Path) -> None:
    done = run(*PIP, "--python", python, "install", "-q", *args, cwd=cwd)
    assert done.returncode == 0, f"pip install {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"


USER_MODULE = """
from __future__ import annotations

from dataclasses import dataclass

from rabbitflow import App, Message, Router

app = App("typed-user", url="memory://")
router = Router()


@dataclass
class Order:
    id: int
    quantity: int


@router.consumer("typed-user.orders", publish_to="typed-user.reserved")
async def reserve(order: Order, message: Message) -> dict[str, int]:
    return {"id": order.id, "attempt": message.attempt}


@app.consumer("typed-user.prices")
async def price(order: Order) -> int:
    return order.quantity * 3


app.include_router(router)


async def ask(quantity: int) -> bytes:
    reply: Message = await app.request({"id": 1, "quantity": quantity}, routing_key="typed-user.prices")
    return reply.body
"""

# Two deliberate mistakes that mypy can only report if it sees rabbitflow's annotations.
BROKEN_MODULE = """
from rabbitflow import App, Message

app = App("typed-user", url="memory://")


async def ask() -> int:
    reply: Message = await app.request({"id": 1}, routing_key=42)
    return reply.attempt + "x"
"""


def mypy(python: Path, project: Path, module: str) -> subprocess.CompletedProcess[str]:
    # This environment's mypy, pointed at the venv's interpreter: it searches that interpreter's
    # site-packages and the paths its .pth files add, exactly as a mypy installed in the venv does.
    config = project / "mypy.ini"  # ours, so no ~/.config/mypy/config changes the verdict
    config.write_text("[mypy]\nstrict = True\n")
    return run(
        sys.executable, "-m", "mypy", "--config-file", config, "--python-executable", python,
        "--cache-dir", project / ".mypy_cache", "--no-error-summary", "--strict", module,
        cwd=project,
    )  # fmt: skip


def test_an_editable_install_is_seen_by_mypy_strict_in_another_project(tmp_path: Path) -> None:
    require("mypy", importlib.util.find_spec("mypy"), "pip install mypy")
    python = fresh_venv(tmp_path / "venv")
    pip_install(python, "-e", str(ROOT), cwd=tmp_path)

    project = tmp_path / "user-project"  # outside the checkout: nothing finds rabbitflow by cwd
    project.mkdir()
    located = run(python, "-c", "import rabbitflow; print(rabbitflow.__file__)", cwd=project)
    assert located.returncode == 0, located.stderr
    assert Path(located.stdout.strip()) == ROOT / "rabbitflow" / "__init__.py", "not the editable checkout"
    version = run(python.parent / "rabbitflow", "--version", cwd=project)  # the console script
    assert version.returncode == 0, version.stderr
    assert version.stdout.strip() == "rabbitflow 0.1.0"

    (project / "service.py").write_text(textwrap.dedent(USER_MODULE))
    typed = mypy(python, project, "service.py")
    assert typed.returncode == 0, f"mypy --strict failed on a correct module:\n{typed.stdout}{typed.stderr}"

    (project / "broken.py").write_text(textwrap.dedent(BROKEN_MODULE))
    broken = mypy(python, project, "broken.py")
    assert "import-not-found" not in broken.stdout, broken.stdout
    assert broken.returncode == 1, broken.stdout + broken.stderr
    # `request` is overloaded (its return type follows `response_type`): mypy names no argument then
    wrong_key = (
        r'"routing_key" .*"int"; expected "str"|No overload variant of "request" .* "dict\[str, int\]", "int"'
    )
    assert re.search(rf"broken\.py:\d+: error: (?:{wrong_key})", broken.stdout), broken.stdout
    assert 'Unsupported operand types for + ("int" and "str")' in broken.stdout, broken.stdout


def test_the_wheel_holds_every_subpackage_py_typed_and_the_console_script(tmp_path: Path) -> None:
    done = run(*PIP, "wheel", "-q", "--no-deps", "-w", tmp_path, ROOT, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    [wheel] = tmp_path.glob("rabbitflow-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        [entry_points] = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        scripts = archive.read(entry_points).decode()
    expected = {
        str(path.relative_to(ROOT)).replace(os.sep, "/")
        for path in (ROOT / "rabbitflow").rglob("*")
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc"
    }
    assert "rabbitflow/py.typed" in expected
    for package in ("testing", "transport", "topology"):
        assert f"rabbitflow/{package}/__init__.py" in names
    assert expected <= names, f"missing from the wheel: {sorted(expected - names)}"
    assert not [n for n in names if not n.startswith(("rabbitflow/", "rabbitflow-"))], sorted(names)
    assert "rabbitflow = rabbitflow.cli.main:main" in scripts
