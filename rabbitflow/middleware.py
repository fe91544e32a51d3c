"""Middleware: hooks that see what a consumer does, for tests, metrics and tracing."""

from __future__ import annotations

__all__ = ["Middleware"]


class Middleware:
    """Subclass and override the hooks you need; `App(middleware=[...])` calls them in order.

    Hooks run on the event loop, inside the delivery's path: keep them quick and never block.
    """

    def attempt_failed(self, queue: str, attempt: int, exception: BaseException) -> None:
        """A handler call on `queue` ended with `exception` (before it is retried or parked)."""
