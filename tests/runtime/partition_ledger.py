"""The per-key order ledger of partitioned consumers, shared by tests/runtime/test_partitions.py
and test_partitions_cluster.py: worker processes (partition_worker.py) append lines to one file,
and `check_ledger` reads them back.

    S key seq pid time   a handler call started (time: the Unix time)
    E key seq pid time   it returned (the message is acked next)
    X key seq pid time   it ended without returning (cancelled: its connection was lost)
    N pid node held      the worker's node and the partitions it holds, whenever they change
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

WORKER = Path(__file__).with_name("partition_worker.py")


@dataclasses.dataclass
class Tally:
    handled: int  # distinct events handled (their handler returned)
    redeliveries: int  # calls of an event already started: killed, cancelled, or its ack lost
    cancelled: int  # calls ended by a lost connection (X)


def spawn(url: str, service: str, queue: str, ledger: Path, pause: float = 0.001) -> subprocess.Popen[str]:
    """A worker process, one replica of `queue` (8 partitions); it prints "ready" once it runs."""
    args = [sys.executable, str(WORKER), url, service, queue, "8", str(ledger), str(pause)]
    return subprocess.Popen(args, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": "."})


def check_ledger(lines: list[str], killed: set[int]) -> Tally:
    """Every key's events started in order, without a gap, one call at a time. An event may be
    started again (a redelivery) only after its call ended without an ack: the worker was
    SIGKILLed (`killed` pids: its call may still look open), the call was cancelled (X), or it
    returned and its ack was lost with the connection — never while another call of the key runs."""
    open_by_key: dict[str, tuple[int, int]] = {}
    started: dict[str, int] = {}  # key -> the last seq started
    done: dict[str, int] = {}  # key -> the last seq handled
    redeliveries = cancelled = 0
    for line in lines:
        if line.startswith("N "):
            continue
        kind, key, seq_text, pid_text = line.split()[:4]
        seq, pid = int(seq_text), int(pid_text)
        if kind == "S":
            if key in open_by_key:
                other_seq, other_pid = open_by_key[key]
                # Only a killed worker's message in hand may be started again elsewhere.
                assert other_pid in killed, f"two calls of {key} at once: {line!r} while {open_by_key[key]}"
                assert other_seq == seq, (line, open_by_key[key])
            if seq == started.get(key, -1):
                redeliveries += 1  # the same message again
            else:
                expected = done.get(key, -1) + 1
                assert seq == expected == started.get(key, -1) + 1, (
                    f"{key}: gap or disorder, {seq} started after {started.get(key)} "
                    f"(last handled {done.get(key)})"
                )
            started[key] = seq
            open_by_key[key] = (seq, pid)
        else:
            assert open_by_key.get(key) == (seq, pid), (line, open_by_key.get(key))
            del open_by_key[key]
            if kind == "E":
                done[key] = seq
            else:
                cancelled += 1
    stray = {k: v for k, v in open_by_key.items() if v[1] not in killed}
    assert not stray, f"calls that never ended: {stray}"
    return Tally(sum(v + 1 for v in done.values()), redeliveries, cancelled)
