"""The event loop a service runs on: uvloop when it is installed (it takes 7-12 % off the CPU per
message, docs/benchmarks.md), asyncio's own otherwise, or the one asked for with `--loop`.

Embedded services (`async with app:`) run on whatever loop their host runs; this is for the
processes rabbitflow starts itself: `app.run()` and `rabbitflow run` (every worker of
`--workers`, with or without `--http-port`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

from rabbitflow.errors import ConfigError

__all__ = ["CHOICES", "chosen", "name", "run"]

T = TypeVar("T")

CHOICES = ("auto", "uvloop", "asyncio")


def chosen(loop: str = "auto") -> str:
    """The loop `run(..., loop)` uses: "uvloop" or "asyncio"."""
    if loop not in CHOICES:
        raise ConfigError(f"loop={loop!r}: choose one of {', '.join(CHOICES)}")
    if loop == "asyncio":
        return "asyncio"
    try:
        import uvloop  # noqa: F401
    except ImportError:
        if loop == "uvloop":
            raise ConfigError(
                "loop 'uvloop' asked for, but uvloop is not installed: pip install 'rabbitflow[uvloop]', "
                "or use --loop asyncio"
            ) from None
        return "asyncio"
    return "uvloop"


def name(loop: asyncio.AbstractEventLoop) -> str:
    """ "uvloop" or "asyncio": the kind of a running loop, for the start-up log line."""
    return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"


def run(main: Coroutine[Any, Any, T], loop: str = "auto") -> T:
    """`asyncio.run(main)` on the chosen loop."""
    try:
        name = chosen(loop)
    except ConfigError:
        main.close()  # never awaited: no "coroutine was never awaited" warning on top
        raise
    if name == "uvloop":
        import uvloop

        return uvloop.run(main)
    return asyncio.run(main)
