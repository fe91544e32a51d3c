"""The crash journal's rules, on files and an event loop (the whole story against RabbitMQ is in
tests/cli/test_containment.py)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

from rabbitflow.runtime.quarantine import CONVICTIONS, Quarantine, bury, read_journal


def test_a_journal_tells_what_was_running_and_what_ran_alone(tmp_path: Path) -> None:
    path = tmp_path / "1.journal"
    path.write_text("s k1\ns k2\ne k1\na k3\ns k4\ne k4\n")
    record = read_journal(path)
    assert set(record.running) == {"k2", "k3"}
    assert record.alone == {"k3"}


def test_bury_keeps_only_what_was_running(tmp_path: Path) -> None:
    (tmp_path / "7.journal").write_text("s k1\ns k2\ne k1\n")
    record = bury(tmp_path, 7)
    assert record is not None
    assert set(record.running) == {"k2"}
    [dead] = tmp_path.glob("*.dead")
    assert dead.read_text() == "s k2\n"
    assert not (tmp_path / "7.journal").exists()
    assert bury(tmp_path, 8) is None  # no journal: it never handled a message


def _dead_pid() -> int:
    child = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, check=True
    )
    return int(child.stdout)


async def test_neighbours_are_suspects_and_only_a_death_alone_convicts(tmp_path: Path) -> None:
    quarantine = Quarantine(tmp_path)
    try:
        (tmp_path / f"{_dead_pid()}.journal").write_text("s poison\ns neighbour\n")  # died, not buried yet
        assert quarantine.verdict("poison") == (0, True)
        assert quarantine.verdict("neighbour") == (0, True)
        assert quarantine.verdict("stranger") == (0, False)
        for _ in range(CONVICTIONS):
            (tmp_path / f"{os.urandom(3).hex()}.dead").write_text("a poison\n")
        assert quarantine.verdict("poison") == (CONVICTIONS, True)
        assert quarantine.verdict("neighbour") == (0, True)  # never convicted: it ran alone and lived
        # A live writer that lost the message (its connection went) makes a suspect, no conviction.
        (tmp_path / f"{os.getppid()}.journal").write_text("a other\n")
        assert quarantine.verdict("other") == (0, True)
    finally:
        quarantine.close()


async def test_a_suspect_runs_alone(tmp_path: Path) -> None:
    quarantine = Quarantine(tmp_path)
    order: list[str] = []
    try:
        assert quarantine.begin("a")  # a handler is running
        alone = asyncio.create_task(quarantine.begin_alone("suspect"))
        await asyncio.sleep(0.01)
        assert not alone.done()  # waits for the running handler
        assert not quarantine.begin("b")  # and keeps new ones out
        late = asyncio.create_task(quarantine.wait())
        quarantine.end("a")
        await alone
        order.append("suspect runs")
        await asyncio.sleep(0.01)
        assert not late.done()  # still out while the suspect runs
        journal = (tmp_path / f"{os.getpid()}.journal").read_text()
        assert "a suspect\n" in journal
        quarantine.end("suspect", alone=True)
        await late
        assert quarantine.begin("b")
        quarantine.end("b")
        assert read_journal(tmp_path / f"{os.getpid()}.journal").running == {}
    finally:
        quarantine.close()
    assert not (tmp_path / f"{os.getpid()}.journal").exists()  # a clean exit leaves no journal
