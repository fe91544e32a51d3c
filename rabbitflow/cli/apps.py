"""Finding the App of `MODULE:APP`: a dotted module or a file path, imported from the current
directory, with any failure said in one line."""

from __future__ import annotations

import importlib
import os
import sys
import traceback
from pathlib import Path

from rabbitflow.app import App
from rabbitflow.errors import RabbitflowError
from rabbitflow.logs import set_service
from rabbitflow.urls import mask

__all__ = ["load_app", "module_directory"]


def load_app(target: str) -> App:
    """`package.module:app` or `path/to/file.py:app` (`:app` may be omitted). A file inside a
    package (a directory with `__init__.py`) is imported as that package's module, so its relative
    imports work; the package's parent directory goes on sys.path. Any failure is one line."""
    module_name, _, attr = target.partition(":")
    attr = attr or "app"
    if module_name.endswith(".py") or os.sep in module_name or "/" in module_name:
        path = Path(module_name).resolve()
        if not path.is_file():
            raise SystemExit(f"rabbitflow: no such file {module_name!r} (from {os.getcwd()})")
        root, dotted = _package_root(path)
        sys.path.insert(0, str(root))
    else:
        sys.path.insert(0, os.getcwd())
        dotted = module_name
    try:
        module = importlib.import_module(dotted)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (dotted == exc.name or dotted.startswith(exc.name + ".")):
            raise SystemExit(
                f"rabbitflow: cannot import {module_name!r}: no module named {exc.name!r}"
            ) from None
        raise SystemExit(f"rabbitflow: cannot import {module_name!r}: {_where_failed(exc)}") from None
    except RabbitflowError:
        raise  # a ConfigError says itself what to change (main prints it, exit code 2)
    except Exception as exc:
        raise SystemExit(f"rabbitflow: cannot import {module_name!r}: {_where_failed(exc)}") from None
    app = getattr(module, attr, None)
    if not isinstance(app, App):
        apps = sorted(name for name, value in vars(module).items() if isinstance(value, App))
        found = f"; App objects in it: {', '.join(apps)}" if apps else ""
        raise SystemExit(f"rabbitflow: {module_name}:{attr} is not a rabbitflow.App{found}")
    set_service(app.name)
    return app


def _package_root(path: Path) -> tuple[Path, str]:
    """The directory to put on sys.path for `path`, and the dotted module name it imports as."""
    parts = [path.stem]
    directory = path.parent
    while (directory / "__init__.py").is_file() and directory.parent != directory:
        parts.insert(0, directory.name)
        directory = directory.parent
    if parts[-1] == "__init__":
        parts.pop()
    return directory, ".".join(parts)


def _where_failed(exc: BaseException) -> str:
    """`Type: text (file, line N)`: the exception and the last line of the user's code it passed."""
    if isinstance(exc, SyntaxError):
        return f"SyntaxError: {exc.msg} ({exc.filename}, line {exc.lineno})"
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if "importlib" not in f.filename]
    where = f" ({frames[-1].filename}, line {frames[-1].lineno})" if frames else ""
    return mask(f"{type(exc).__name__}: {exc}{where}")


def module_directory(target: str) -> Path:
    """The directory holding MODULE of `MODULE:APP`: what `--reload` watches."""
    module_name = target.partition(":")[0]
    if module_name.endswith(".py") or os.sep in module_name:
        return Path(module_name).resolve().parent
    module = sys.modules.get(module_name)
    where = getattr(module, "__file__", None)
    return Path(where).resolve().parent if where else Path.cwd()
