"""`rabbitflow run --workers N`: N worker processes, each a whole app, kept running.

A worker that dies on its own (a nonzero exit or a signal that was not the supervisor's stop) is
started again after a backoff: 1 s, doubling up to 30 s for a worker that keeps dying, back to
1 s once a worker has run for a minute. A worker that exits 0 by itself (someone sent it SIGTERM)
is not restarted. SIGTERM or SIGINT to the supervisor are passed to every worker, which stop
gracefully; the supervisor exits 0 once all of them exited 0. Shutdown and restarts are driven by
the workers' exits and the signals, never by polling.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Mapping, Sequence

__all__ = ["FIRST_BACKOFF", "MAX_BACKOFF", "RESET_AFTER", "WORKER_ENV", "Supervisor"]

log = logging.getLogger("rabbitflow.cli.workers")

FIRST_BACKOFF = 1.0
MAX_BACKOFF = 30.0
RESET_AFTER = 60.0  # a worker that ran this long before dying starts again after FIRST_BACKOFF
WORKER_ENV = "RABBITFLOW_WORKER"  # the worker's number, 1..N, for its log lines


def _how(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
        return f"killed by signal {-code}"
    return f"exit code {code}"


class Supervisor:
    """Runs `command` as `count` worker processes with `env` (plus the worker's number)."""

    def __init__(
        self,
        command: Sequence[str],
        count: int,
        env: Mapping[str, str],
        *,
        first_backoff: float = FIRST_BACKOFF,
        max_backoff: float = MAX_BACKOFF,
        reset_after: float = RESET_AFTER,
    ) -> None:
        self.command = list(command)
        self.count = count
        self.env = dict(env)
        self.first_backoff, self.max_backoff, self.reset_after = first_backoff, max_backoff, reset_after
        self.processes: dict[int, asyncio.subprocess.Process] = {}
        self._stopping: asyncio.Event | None = None
        self._clean = True

    def run(self) -> int:
        """Until SIGTERM/SIGINT and every worker stopped; 0 when each stopped cleanly."""
        return asyncio.run(self.serve())

    async def serve(self) -> int:
        loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop, sig)
        try:
            async with asyncio.TaskGroup() as workers:
                for number in range(1, self.count + 1):
                    workers.create_task(self._keep(number))
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
        log.info("all %d workers stopped", self.count)
        return 0 if self._clean else 1

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Pass `sig` to every worker; none is restarted any more."""
        assert self._stopping is not None
        if not self._stopping.is_set():
            log.info("%s: stopping %d workers", signal.Signals(sig).name, len(self.processes))
        self._stopping.set()
        for process in self.processes.values():
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(sig)

    async def _keep(self, number: int) -> None:
        """Worker `number`, started again after each crash until the supervisor stops."""
        assert self._stopping is not None
        loop = asyncio.get_running_loop()
        backoff = self.first_backoff
        while not self._stopping.is_set():
            started = loop.time()
            process = await asyncio.create_subprocess_exec(
                *self.command, env={**self.env, WORKER_ENV: str(number)}
            )
            self.processes[number] = process
            log.info("worker %d started: pid %d", number, process.pid)
            log.debug("worker %d runs %s", number, " ".join(self.command))  # no URL: it is in env
            if self._stopping.is_set():  # the stop came while it was starting
                process.send_signal(signal.SIGTERM)
            code = await process.wait()
            if self._stopping.is_set():
                if code != 0:
                    self._clean = False
                    log.error("worker %d (pid %d) did not stop cleanly: %s", number, process.pid, _how(code))
                return
            if code == 0:
                log.warning("worker %d (pid %d) exited by itself; not restarted", number, process.pid)
                return
            ran = loop.time() - started
            if ran >= self.reset_after:
                backoff = self.first_backoff
            log.error(
                "worker %d (pid %d) died (%s) after %.1f s; starting it again in %g s",
                number,
                process.pid,
                _how(code),
                ran,
                backoff,
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), backoff)
            backoff = min(backoff * 2, self.max_backoff)
