"""Containment under `rabbitflow run`: a message that kills its worker is parked alone, workers
never outlive their supervisor, a taken HTTP port is said once, and every way of running stops on
SIGINT and SIGTERM whatever the shell did with signals. Real processes, real broker."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from ..helpers import Admin, unique
from .conftest import Processes
from .test_cli import RELOADED_SERVICE, ROOT, RUN, SERVICE, children_of, forget_service, wait_consumers

GOOD = 2000


def _lines(path: Path, word: str) -> list[list[str]]:
    if not path.exists():
        return []
    return [line.split() for line in path.read_text().splitlines() if line.startswith(word + " ")]


async def test_a_message_that_kills_its_worker_is_parked_alone_and_the_rest_flows(
    tmp_path: Path, broker_url: str, admin: Admin, processes: Processes
) -> None:
    service, queue = unique("svc"), unique("kill")
    admin.queues.update({queue, f"{queue}.parked", f"{queue}.retry.1s"})
    admin.exchanges.add(f"{service}.dlx")
    log, out = tmp_path / "handled.log", tmp_path / "run.out"
    env = {
        **os.environ,
        "RF_SERVICE": service,
        "RF_QUEUE": queue,
        "RF_LOG": str(log),
        "RABBITFLOW_URL": broker_url,
    }
    with out.open("w") as output:
        processes.start(
            [*RUN, "tests.services.killer:app", "--workers", "2"],
            cwd=ROOT,
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    await wait_consumers(admin, queue, count=2)
    for n in range(GOOD):
        if n == 300:
            await admin.publish(b'{"poison": true}', routing_key=queue, content_type="application/json",
                                message_id="poison", delivery_mode=2)  # fmt: skip
        await admin.publish(json.dumps({"n": n}).encode(), routing_key=queue, content_type="application/json",
                            message_id=f"m{n}", delivery_mode=2)  # fmt: skip
    async with asyncio.timeout(90):
        while (  # noqa: ASYNC110
            len({line[1] for line in _lines(log, "done")}) < GOOD or await admin.count(f"{queue}.parked") < 1
        ):
            await asyncio.sleep(0.2)
    await wait_consumers(admin, queue, count=2)  # both workers consume again
    await asyncio.sleep(1)

    parked = await admin.drain(f"{queue}.parked")
    text = out.read_text()
    assert [m.header.properties.message_id for m in parked] == ["poison"], text  # the culprit, alone
    headers = parked[0].header.properties.headers or {}
    assert headers["x-rf-reason"] == "worker-crash"
    assert "killed the worker process" in str(headers["x-rf-error"])
    kills = _lines(log, "kill")
    assert 1 <= len(kills) <= 3, text  # at most 3 worker deaths
    done = _lines(log, "done")
    assert {line[1] for line in done} == {str(n) for n in range(GOOD)}  # no neighbour lost or parked
    assert await admin.count(queue) == 0

    # Consumption goes on while the crash is isolated: a survivor handles messages unless the
    # suspect reached it too, and a killed worker is back within seconds (no growing backoff).
    first, last = float(kills[0][2]), float(kills[-1][2])
    times = sorted(float(line[3]) for line in done)
    longest = max(b - a for a, b in itertools.pairwise(times))
    assert longest < 5, text
    before = {line[2] for line in done if float(line[3]) < first}
    steady = min(float(line[3]) for line in done if float(line[3]) > last and line[2] not in before)
    print(f"\n{len(kills)} worker death(s); longest pause in consumption {longest:.1f} s; "
          f"first crash to both workers consuming again: {steady - first:.1f} s")  # fmt: skip
    assert "(killed by SIGKILL)" in text
    assert "starting it again in 1 s" in text
    assert "in 2 s" not in text  # no growing backoff while the crash is isolated


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


async def test_workers_stop_when_their_supervisor_is_killed(
    tmp_path: Path, broker_url: str, admin: Admin, processes: Processes
) -> None:
    service, queue = unique("svc"), unique("orphan")
    env = {**os.environ, "RF_SERVICE": service, "RF_QUEUE": queue, "RF_LOG": str(tmp_path / "h.log"),
           "RABBITFLOW_URL": broker_url}  # fmt: skip
    port = _free_port()
    command = [*RUN, SERVICE, "--workers", "2", "--http-port", str(port)]
    out = tmp_path / "run.out"
    with out.open("w") as output:
        parent = processes.start(command, cwd=ROOT, env=env, stdout=output, stderr=subprocess.STDOUT)
    try:
        await wait_consumers(admin, queue, count=2)
        workers = children_of(parent.pid)
        assert len(workers) == 2
        parent.kill()  # SIGKILL: the supervisor gets no chance to stop them
        parent.wait(5)
        started = time.monotonic()
        async with asyncio.timeout(10):
            while any(_alive(pid) for pid in workers):  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        print(f"\nworkers gone {time.monotonic() - started:.2f} s after their supervisor")
        await wait_consumers(admin, queue, count=0)

        # A new supervisor on the same ports runs: nothing holds them any more.
        with (tmp_path / "again.out").open("w") as output:
            again = processes.start(command, cwd=ROOT, env=env, stdout=output, stderr=subprocess.STDOUT)
        await wait_consumers(admin, queue, count=2)
        again.send_signal(signal.SIGTERM)
        assert again.wait(20) == 0
    finally:
        forget_service(admin, {"RF_SERVICE": service, "RF_QUEUE": queue})


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_taken_http_port_is_said_once_and_ends_the_run(
    tmp_path: Path, broker_url: str, admin: Admin, processes: Processes, workers: str
) -> None:
    service, queue = unique("svc"), unique("port")
    env = {**os.environ, "RF_SERVICE": service, "RF_QUEUE": queue, "RF_LOG": str(tmp_path / "h.log"),
           "RABBITFLOW_URL": broker_url}  # fmt: skip
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = tmp_path / "run.out"
        with out.open("w") as output:
            run = processes.start(
                [*RUN, SERVICE, "--workers", workers, "--http-port", str(port)],
                cwd=ROOT,
                env=env,
                stdout=output,
                stderr=subprocess.STDOUT,
            )
        code = run.wait(30)
    text = out.read_text()
    assert code != 0, text
    assert text.count("the port is taken") == 1, text
    assert "Traceback" not in text
    forget_service(admin, {"RF_SERVICE": service, "RF_QUEUE": queue})


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # as a shell's background job starts


def _group_alive(pgid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


@pytest.mark.parametrize("how", ["plain", "workers", "reload"])
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
async def test_every_run_stops_on_sigint_and_sigterm_even_when_started_with_sigint_ignored(
    tmp_path: Path, broker_url: str, admin: Admin, processes: Processes, how: str, sig: signal.Signals
) -> None:
    service, queue = unique("svc"), unique("sig")
    admin.queues.update({queue, f"{queue}.parked"})
    admin.exchanges.add(f"{service}.dlx")
    code = tmp_path / "app" / "svc.py"
    code.parent.mkdir()
    code.write_text(RELOADED_SERVICE.format(log=str(tmp_path / "starts.log"), service=service, queue=queue))
    extra = {"plain": [], "workers": ["--workers", "2"], "reload": ["--reload"]}[how]
    out = tmp_path / "run.out"
    with out.open("w") as output:
        run = processes.start(
            [*RUN, f"{code}:app", *extra],
            cwd=ROOT,
            env={**os.environ, "RABBITFLOW_URL": broker_url},
            stdout=output,
            stderr=subprocess.STDOUT,
            preexec_fn=_ignore_sigint,
        )
    await wait_consumers(admin, queue, count=2 if how == "workers" else 1)
    run.send_signal(sig)
    try:
        status = await asyncio.to_thread(run.wait, 20)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{how} ignored {sig.name}:\n{out.read_text()}")
    assert status == 0, out.read_text()
    async with asyncio.timeout(5):
        while _group_alive(run.pid):  # noqa: ASYNC110
            await asyncio.sleep(0.05)
