"""Every process a CLI test starts is killed, with its whole process group, when the test ends:
a test that fails or times out leaves nothing running behind it (a process left over would hold
its queue, its port, and fail a later test)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest


class Processes:
    """`start(...)` is `subprocess.Popen` in a session (process group) of its own."""

    def __init__(self) -> None:
        self.started: list[subprocess.Popen[Any]] = []

    def start(self, command: list[str], **options: Any) -> subprocess.Popen[Any]:
        process = subprocess.Popen(command, start_new_session=True, **options)
        self.started.append(process)
        return process

    def kill_all(self) -> None:
        for process in self.started:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)  # the group: its workers and children too
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(10)


@pytest.fixture
def processes() -> Iterator[Processes]:
    started = Processes()
    try:
        yield started
    finally:
        started.kill_all()
