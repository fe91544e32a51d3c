"""`rabbitflow run --workers N`: N worker processes, each a whole app, kept running.

A worker that dies on its own (a nonzero exit or a signal that was not the supervisor's stop) is
started again after a backoff. A worker that died otherwise than in a handler (at start-up:
a bad URL, a crash on import) waits 1 s, doubling up to 30 s while it keeps dying, back to 1 s
once a worker has run for a minute. A worker that died while handling messages (a handler that
kills its process) starts again after 1 s every time: the crash journal (runtime/quarantine.py,
a directory passed in `RABBITFLOW_CRASH_JOURNAL`) isolates the message that kills it within
three deaths, and the service should be back at full strength meanwhile. A worker that exits 0
by itself (someone sent it SIGTERM) is not restarted; one that cannot serve its HTTP port
(`EXIT_PORT_TAKEN`) stops the supervisor, which exits non-zero, instead of a restart loop.

SIGTERM or SIGINT to the supervisor are passed to every worker, which stop gracefully; the
supervisor exits 0 once all of them exited 0. Workers never outlive the supervisor: each holds
the read end of a pipe whose only writer is the supervisor and stops when it reads EOF, and on
Linux the kernel also sends it SIGTERM when the supervisor dies (PR_SET_PDEATHSIG). Shutdown and
restarts are driven by the workers' exits, the signals and the pipe, never by polling.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import logging
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from rabbitflow.runtime.quarantine import JOURNAL_ENV, bury

__all__ = [
    "EXIT_PORT_TAKEN",
    "FIRST_BACKOFF",
    "MAX_BACKOFF",
    "PARENT_FD_ENV",
    "RESET_AFTER",
    "WORKER_ENV",
    "Supervisor",
    "follow_parent",
]

log = logging.getLogger("rabbitflow.cli.workers")

FIRST_BACKOFF = 1.0
MAX_BACKOFF = 30.0
RESET_AFTER = 60.0  # a worker that ran this long before dying starts again after FIRST_BACKOFF
WORKER_ENV = "RABBITFLOW_WORKER"  # the worker's number, 1..N, for its log lines
WORKERS_ENV = "RABBITFLOW_WORKER_COUNT"  # how many: the console links each worker's page to the others'
PARENT_FD_ENV = "RABBITFLOW_PARENT_FD"  # the worker's end of the supervisor's pipe
PARENT_PID_ENV = "RABBITFLOW_PARENT_PID"
EXIT_PORT_TAKEN = 78  # EX_CONFIG: a worker could not listen on its HTTP port; restarting won't help
_PR_SET_PDEATHSIG = 1


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
        self._journal: Path | None = None
        self._pipe: tuple[int, int] | None = None

    def run(self) -> int:
        """Until SIGTERM/SIGINT and every worker stopped; 0 when each stopped cleanly."""
        return asyncio.run(self.serve())

    async def serve(self) -> int:
        loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop, sig)
        own_journal = not self.env.get(JOURNAL_ENV)
        self._journal = Path(self.env.get(JOURNAL_ENV) or tempfile.mkdtemp(prefix="rabbitflow-journal-"))
        self._journal.mkdir(parents=True, exist_ok=True)
        self._pipe = os.pipe()  # the supervisor holds the only write end: its death is EOF
        try:
            async with asyncio.TaskGroup() as workers:
                for number in range(1, self.count + 1):
                    workers.create_task(self._keep(number))
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            for fd in self._pipe:
                os.close(fd)
            if own_journal:
                shutil.rmtree(self._journal, ignore_errors=True)
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
        assert self._journal is not None
        assert self._pipe is not None
        loop = asyncio.get_running_loop()
        backoff = self.first_backoff
        reading = self._pipe[0]
        env = {
            **self.env,
            WORKER_ENV: str(number),
            WORKERS_ENV: str(self.count),
            JOURNAL_ENV: str(self._journal),
            PARENT_FD_ENV: str(reading),
            PARENT_PID_ENV: str(os.getpid()),
        }
        while not self._stopping.is_set():
            started = loop.time()
            process = await asyncio.create_subprocess_exec(*self.command, env=env, pass_fds=(reading,))
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
            record = bury(self._journal, process.pid)
            if code == 0:
                log.warning("worker %d (pid %d) exited by itself; not restarted", number, process.pid)
                return
            if code == EXIT_PORT_TAKEN:
                self._clean = False
                log.error("worker %d (pid %d) cannot serve its HTTP port; stopping", number, process.pid)
                self.stop()
                return
            ran = loop.time() - started
            if ran >= self.reset_after:
                backoff = self.first_backoff
            consuming = bool(record and record.running)  # died in a handler: not a start-up crash
            wait = self.first_backoff if consuming else backoff
            running = (
                ""
                if not record or not record.running
                else (
                    f" while handling {sum(record.running.values())} message(s)"
                    + (" (one of them alone: a conviction)" if record.alone else "; they become suspects")
                )
            )
            log.error(
                "worker %d (pid %d) died (%s) after %.1f s%s; starting it again in %g s",
                number,
                process.pid,
                _how(code),
                ran,
                running,
                wait,
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), wait)
            if not consuming:
                backoff = min(backoff * 2, self.max_backoff)


def follow_parent(stop: Callable[[], None]) -> None:
    """In a worker: call `stop` when the supervisor dies (EOF on its pipe, watched by the running
    loop; on Linux also SIGTERM from the kernel, PR_SET_PDEATHSIG). A no-op outside `--workers`."""
    fd_text, parent = os.environ.get(PARENT_FD_ENV), os.environ.get(PARENT_PID_ENV)
    if not fd_text:
        return
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    fd = int(fd_text)
    loop = asyncio.get_running_loop()

    def readable() -> None:
        try:
            data = os.read(fd, 1)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:  # EOF: no supervisor any more
            loop.remove_reader(fd)
            log.warning("the supervisor is gone; stopping")
            stop()

    os.set_blocking(fd, False)
    loop.add_reader(fd, readable)
    if parent and os.getppid() != int(parent):  # it died before we watched
        readable()
