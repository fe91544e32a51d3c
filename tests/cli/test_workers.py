"""`rabbitflow run --workers N`'s supervisor, on real (tiny) processes."""

from __future__ import annotations

import logging
import os
import re
import sys

from rabbitflow.cli.workers import EXIT_PORT_TAKEN, Supervisor


class StopAfter(logging.Handler):
    """Stops the supervisor once it has restarted crashed workers `count` times."""

    def __init__(self, supervisor: Supervisor, count: int) -> None:
        super().__init__()
        self.supervisor, self.count = supervisor, count
        self.backoffs: list[float] = []

    def emit(self, record: logging.LogRecord) -> None:
        found = re.search(r"starting it again in (\S+) s", record.getMessage())
        if found:
            self.backoffs.append(float(found[1]))
            if len(self.backoffs) == self.count:
                self.supervisor.stop()


def supervise(code: str, **backoff: float) -> tuple[int, list[float]]:
    command = [sys.executable, "-c", code]
    supervisor = Supervisor(command, 1, os.environ, **backoff)
    handler = StopAfter(supervisor, 5)
    log = logging.getLogger("rabbitflow.cli.workers")
    log.addHandler(handler)
    try:
        exit_code = supervisor.run()
    finally:
        log.removeHandler(handler)
    return exit_code, handler.backoffs


def test_a_worker_that_keeps_crashing_is_started_again_ever_later() -> None:
    code, backoffs = supervise("raise SystemExit(3)", first_backoff=0.05, max_backoff=0.2, reset_after=10)
    assert backoffs == [0.05, 0.1, 0.2, 0.2, 0.2]  # doubling, up to the maximum
    assert code == 0  # stopped by the supervisor while waiting: nothing left running


def test_a_worker_that_ran_a_while_before_crashing_starts_again_soon() -> None:
    _, backoffs = supervise(
        "import time; time.sleep(0.3); raise SystemExit(3)",
        first_backoff=0.05,
        max_backoff=1,
        reset_after=0.2,
    )
    assert backoffs == [0.05] * 5


def test_a_worker_that_exits_cleanly_by_itself_is_not_started_again() -> None:
    supervisor = Supervisor([sys.executable, "-c", "pass"], 2, os.environ)
    assert supervisor.run() == 0  # both exited 0 on their own: nothing to supervise any more


DIES_IN_A_HANDLER = (
    "import os; d = os.environ['RABBITFLOW_CRASH_JOURNAL']; "
    "fd = os.open(f'{d}/{os.getpid()}.journal', os.O_WRONLY | os.O_APPEND | os.O_CREAT); "
    "os.write(fd, b's somekey\\n'); os._exit(3)"
)


def test_a_worker_that_dies_in_a_handler_is_started_again_without_growing_backoff() -> None:
    """The crash journal isolates the message that kills it: the service should be back at full
    strength meanwhile, not wait ever longer."""
    _, backoffs = supervise(DIES_IN_A_HANDLER, first_backoff=0.05, max_backoff=1, reset_after=10)
    assert backoffs == [0.05] * 5


def test_a_worker_that_cannot_serve_its_port_stops_the_supervisor() -> None:
    supervisor = Supervisor([sys.executable, "-c", f"raise SystemExit({EXIT_PORT_TAKEN})"], 2, os.environ)
    assert supervisor.run() == 1  # no restart loop: it says so and ends, non-zero


def test_workers_get_a_crash_journal_and_the_supervisors_pipe() -> None:
    code = (
        "import os, sys; fd = int(os.environ['RABBITFLOW_PARENT_FD']); os.fstat(fd); "
        "sys.exit(0 if os.path.isdir(os.environ['RABBITFLOW_CRASH_JOURNAL']) else 5)"
    )
    assert Supervisor([sys.executable, "-c", code], 1, os.environ).run() == 0
