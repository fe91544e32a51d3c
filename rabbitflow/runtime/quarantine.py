"""Quarantine: finding the message that kills its worker process, and parking it alone.

A handler that kills its process (`os._exit`, a segfault, the OOM killer) leaves no exception to
catch, and every message in flight beside it comes back with the same delivery count: the count
cannot tell the culprit from its neighbours. The crash journal can. It is a directory (named by
the environment variable `RABBITFLOW_CRASH_JOURNAL`; `rabbitflow run --workers N` makes one and
passes it to its workers) where each process appends, with `os.write` on an `O_APPEND` file
descriptor (so a line is on disk even when the process ends by `os._exit` or a signal), one line
when a handler starts and one when it ends. A journal whose writer died holds the handlers that
were running when it died.

- A redelivered message whose key (its `message_id`, else a digest of its body and routing key,
  with the queue) was running in a dead writer's journal is a *suspect*: this process runs it
  ALONE, with no other handler of the process running, and journals it so.
- A death while a message ran alone is a *conviction*. After `CONVICTIONS` of them the consumer
  parks the message with reason `worker-crash` without calling its handler. The first death is
  shared with the neighbours (none convicted), so a killer is parked after at most
  `CONVICTIONS + 1` worker deaths: 3.
- An innocent suspect runs alone once, succeeds, and goes on as any message.

Journals of dead writers end in `.dead`: the supervisor renames one when it reaps its worker, and
a process renames a journal left under its own pid by a previous process (a restarted container).
A writer whose journal still ends in `.journal` counts as dead when its pid is gone or a zombie.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from rabbitflow.transport.base import Delivery

__all__ = [
    "CONVICTIONS",
    "JOURNAL_ENV",
    "Quarantine",
    "Record",
    "bury",
    "delivery_key",
    "quarantine_from_env",
    "read_journal",
]

log = logging.getLogger("rabbitflow.runtime.quarantine")

JOURNAL_ENV = "RABBITFLOW_CRASH_JOURNAL"
CONVICTIONS = 2  # deaths while running alone; with the first, shared death: 3 deaths at most
_ROTATE_AT = 1 << 20  # bytes: a journal this long is written again with only what is in flight


def delivery_key(queue: str, delivery: Delivery) -> str:
    """The journal's name for a delivery: the same on every redelivery of the same message."""
    digest = hashlib.blake2b(queue.encode(), digest_size=12)
    message_id = delivery.properties.message_id
    if message_id:
        digest.update(b"\x00id\x00" + message_id.encode("utf-8", "surrogateescape"))
    else:
        digest.update(b"\x00rk\x00" + delivery.routing_key.encode("utf-8", "surrogateescape") + b"\x00")
        digest.update(delivery.body)
    return digest.hexdigest()


@dataclass
class Record:
    """What one journal says: the keys running when it ended (or now), and which ran alone."""

    running: Counter[str] = field(default_factory=Counter)
    alone: set[str] = field(default_factory=set)


def read_journal(path: Path) -> Record:
    """Lines `s KEY` (started), `a KEY` (started alone), `e KEY` (ended)."""
    record = Record()
    with contextlib.suppress(OSError):
        _parse(record, path.read_bytes())
    return record


def _parse(record: Record, data: bytes) -> None:
    for line in data.decode("ascii", "replace").splitlines():
        kind, _, key = line.partition(" ")
        if kind in ("s", "a"):
            record.running[key] += 1
            if kind == "a":
                record.alone.add(key)
        elif kind == "e" and record.running[key] > 0:
            record.running[key] -= 1
            if not record.running[key]:
                del record.running[key]
                record.alone.discard(key)


class _Reader:
    """A journal read as it grows: only the bytes added since the last look are parsed (after a
    failover every redelivered message asks for a verdict)."""

    __slots__ = ("inode", "offset", "record")

    def __init__(self) -> None:
        self.inode, self.offset, self.record = -1, 0, Record()

    def read(self, path: Path) -> Record:
        try:
            with path.open("rb") as file:
                inode = os.fstat(file.fileno()).st_ino
                if inode != self.inode:  # new, or written afresh (`_rotate`)
                    self.inode, self.offset, self.record = inode, 0, Record()
                file.seek(self.offset)
                data = file.read()
        except OSError:
            return self.record
        whole = data.rfind(b"\n") + 1  # a line still being written waits for the next look
        _parse(self.record, data[:whole])
        self.offset += whole
        return self.record


def bury(directory: Path, pid: int) -> Record | None:
    """The writer `pid` is dead: keep its journal as `.dead` with only what was running; returns
    what was running (None without a journal)."""
    path = directory / f"{pid}.journal"
    if not path.exists():
        return None
    record = read_journal(path)
    lines = [f"{'a' if key in record.alone else 's'} {key}\n" for key in record.running]
    if lines:
        dead = directory / f"{pid}-{os.urandom(4).hex()}.dead"
        dead.write_text("".join(lines))
    path.unlink(missing_ok=True)
    return record


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


class Quarantine:
    """One process's side of the crash journal, shared by all its consumers."""

    def __init__(self, directory: Path, *, convictions: int = CONVICTIONS) -> None:
        self.directory = directory
        self.convictions = convictions
        self._pid = os.getpid()
        self._path = directory / f"{self._pid}.journal"
        if self._path.exists():  # a previous process with our pid (a restarted container) died
            bury(directory, self._pid)
        self._fd = os.open(self._path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._running: Counter[str] = Counter()
        self._handlers = 0  # handlers running in this process, alone or not
        self._idle = asyncio.Event()
        self._idle.set()
        self._lone: asyncio.Lock | None = None  # held while a suspect runs alone
        self._open_gate = asyncio.Event()
        self._open_gate.set()
        self._readers: dict[Path, _Reader] = {}

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
            self._path.unlink(missing_ok=True)

    # -- verdicts --------------------------------------------------------------------------------

    def verdict(self, key: str) -> tuple[int, bool]:
        """(convictions, suspect) of `key` from the journals of dead writers (and of writers that
        lost the message to us: it came back redelivered while they still had it running)."""
        convictions, suspect = 0, False
        paths = list(self.directory.iterdir())
        for gone in self._readers.keys() - set(paths):
            del self._readers[gone]
        for path in paths:
            if path == self._path:
                continue
            if path.suffix == ".dead":
                dead = True
            elif path.suffix == ".journal":
                try:
                    dead = not _alive(int(path.stem))
                except ValueError:
                    continue
            else:
                continue
            reader = self._readers.get(path)
            if reader is None:
                reader = self._readers[path] = _Reader()
            record = reader.read(path)
            if key in record.running:
                suspect = True
                if dead and key in record.alone:
                    convictions += 1
        return convictions, suspect

    # -- running ---------------------------------------------------------------------------------

    def begin(self, key: str) -> bool:
        """A handler of a key that is no suspect starts now, if no suspect runs alone (True);
        else the caller awaits `wait()` and calls again."""
        if not self._open_gate.is_set():
            return False
        self._enter(key, b"s ")
        return True

    async def wait(self) -> None:
        await self._open_gate.wait()

    async def begin_alone(self, key: str) -> None:
        """Run a suspect alone: wait for the running handlers to end and keep new ones out."""
        if self._lone is None:
            self._lone = asyncio.Lock()
        await self._lone.acquire()
        try:
            self._open_gate.clear()
            await self._idle.wait()
        except BaseException:  # cancelled while waiting its turn: it never ran
            self._open_gate.set()
            self._lone.release()
            raise
        self._enter(key, b"a ")

    @contextlib.asynccontextmanager
    async def running(self, key: str, *, alone: bool) -> AsyncIterator[None]:
        """The handler of `key` runs inside: alone (a suspect) or beside others, journaled."""
        if alone:
            await self.begin_alone(key)
        else:
            while not self.begin(key):
                await self.wait()
        try:
            yield
        finally:
            self.end(key, alone=alone)

    def end(self, key: str, *, alone: bool = False) -> None:
        """The handler of `key` ended (successfully or with an exception: not a crash)."""
        self._write(b"e " + key.encode() + b"\n")
        self._running[key] -= 1
        if self._running[key] <= 0:
            del self._running[key]
        self._handlers -= 1
        if not self._handlers:
            self._idle.set()
            if self.directory.exists() and os.fstat(self._fd).st_size > _ROTATE_AT:
                self._rotate()
        if alone:
            self._open_gate.set()
            assert self._lone is not None
            self._lone.release()

    def _enter(self, key: str, kind: bytes) -> None:
        self._write(kind + key.encode() + b"\n")
        self._running[key] += 1
        self._handlers += 1
        self._idle.clear()

    def _write(self, line: bytes) -> None:
        if self._fd >= 0:
            os.write(self._fd, line)

    def _rotate(self) -> None:
        """Nothing runs: start the journal afresh (a long-lived worker's journal stays small)."""
        fresh = self._path.with_suffix(".new")
        fd = os.open(fresh, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_TRUNC, 0o600)
        os.replace(fresh, self._path)
        os.close(self._fd)
        self._fd = fd


_shared: Quarantine | None = None


def quarantine_from_env() -> Quarantine | None:
    """The process's quarantine when `RABBITFLOW_CRASH_JOURNAL` names a directory, else None."""
    global _shared
    directory = os.environ.get(JOURNAL_ENV)
    if not directory:
        return None
    if _shared is None or _shared._pid != os.getpid():
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        _shared = Quarantine(path)
    return _shared
