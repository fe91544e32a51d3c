"""Sync handlers: a plain `def` handler runs in a worker thread (anyio's), with every semantic of
an `async def` one; the event loop goes on with the other deliveries meanwhile.

A thread cannot be cancelled: when the attempt ends first (its handler_timeout, a stop), the
attempt fails at once and the thread runs on; whatever it returns or raises later is discarded,
with a log line saying so.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

__all__ = ["Threads"]

log = logging.getLogger("rabbitflow.runtime.threads")


class _Call:
    __slots__ = ("abandoned", "args", "handler", "kwargs", "queue")

    def __init__(
        self, queue: str, handler: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        self.queue = queue
        self.handler = handler
        self.args = args
        self.kwargs = kwargs
        self.abandoned = False

    def __call__(self) -> Any:
        try:
            result = self.handler(*self.args, **self.kwargs)
        except BaseException as exc:
            if self.abandoned:
                log.warning(
                    "queue %s: a sync handler raised %s after its attempt had ended (handler_timeout "
                    "or stop); discarded",
                    self.queue,
                    type(exc).__name__,
                )
            raise
        if self.abandoned:
            log.warning(
                "queue %s: a sync handler returned after its attempt had ended (handler_timeout or "
                "stop); its result is discarded",
                self.queue,
            )
        return result


class Threads:
    """The worker threads of one consumer's sync handler: at most `concurrency` at once."""

    def __init__(self, queue: str, concurrency: int) -> None:
        import anyio  # only for apps with a sync handler

        self._queue = queue
        self._limiter = anyio.CapacityLimiter(concurrency)
        self._run_sync = anyio.to_thread.run_sync

    async def run(self, handler: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        call = _Call(self._queue, handler, args, kwargs)
        try:
            # The context (the origin of what the handler publishes) goes along into the thread.
            return await self._run_sync(call, abandon_on_cancel=True, limiter=self._limiter)
        except BaseException:
            call.abandoned = True
            raise
