"""Scale out: `rabbitflow run --workers N` on one queue, for N = 1, 2, 4, beside the CPU the
broker and the workers spend (docs/benchmarks.md, "Scale out").

    python benchmarks/scaleout.py [--workers 1,2,4] [--messages 40000] [--rounds 2]
                                  [--queue-type classic|quorum] [--cluster] [--out FILE]

The queue is declared by the service's own plan, filled with `--messages` persistent 256-byte
JSON messages, and then `rabbitflow run benchmarks.scaleout_service:app --workers N` drains it
(prefetch 256 per worker, a no-op handler, one ack per message). The rate is measured while the
queue's ready count falls from 90 % to 10 % of the messages (without the start and the tail);
over the same window the CPU time of the broker's Erlang VM(s) (/proc/PID/stat) and of the
worker processes is read, so each rate comes with the broker's and the workers' CPU per message.

With `--cluster`, on a 3-node cluster of scripts/cluster.sh (its environment variables pick
which one) with a quorum queue, each worker connecting to a node of its own (RABBITFLOW_FAILOVER
shuffle). The medians of `--rounds` rounds, the rounds interleaved over N. Nothing asserts on a
timing.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import benchlib  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU of process `pid` so far (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICK


def children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(p) for p in (task / "children").read_text().split()]
        except FileNotFoundError:
            continue
    return found


def broker_pids(cluster: bool) -> list[int]:
    if cluster:
        script = str(ROOT / "scripts" / "cluster.sh")
        return [int(subprocess.check_output([script, "pid", str(n)], text=True).strip()) for n in (1, 2, 3)]
    out = subprocess.check_output(["rabbitmqctl", "-q", "eval", "os:getpid()."], text=True)
    return [int(out.strip().strip('"'))]


def cluster_urls() -> str:
    return subprocess.check_output([str(ROOT / "scripts" / "cluster.sh"), "urls"], text=True).strip()


def plan(url: str, service: str, queue: str, queue_type: str) -> Any:
    """The service's App (as benchmarks/scaleout_service.py builds it), for its plan."""
    from rabbitflow import App

    app = App(service, url=url.split(";")[0], prefetch=256)
    app.consumer(queue, queue_type=queue_type)(_noop)
    return app


async def _noop(body: Any) -> None: ...


async def forget(url: str, app: Any) -> None:
    admin = benchlib.Admin(url.split(";")[0])
    await admin.open()
    try:
        await admin.delete_queues([q.name for q in app.plan.queues])
        await admin.delete_exchanges([e.name for e in app.plan.exchanges if e.name])
    finally:
        await admin.close()


async def one_run(url: str, workers: int, messages: int, queue_type: str, cluster: bool) -> dict[str, float]:
    service, queue = f"scale-{uuid.uuid4().hex[:6]}", f"bench.scale.{uuid.uuid4().hex[:8]}"
    first = url.split(";")[0]
    app = plan(url, service, queue, queue_type)
    await app.declare()
    admin = benchlib.Admin(first)
    await admin.open()
    await admin.fill(queue, messages, queue_type)
    env = {
        **os.environ,
        "RABBITFLOW_URL": url,
        "RABBITFLOW_FAILOVER": "shuffle" if cluster else "round-robin",
        "BENCH_SERVICE": service,
        "BENCH_QUEUE": queue,
        "BENCH_QUEUE_TYPE": queue_type,
        "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }
    command = [sys.executable, "-m", "rabbitflow", "run", "benchmarks.scaleout_service:app"]
    command += ["--workers", str(workers), "--log-level", "warning"]
    parent = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL)  # noqa: ASYNC220 - once
    brokers = broker_pids(cluster)
    start = end = None
    try:
        high, low = messages * 0.9, messages * 0.1
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if parent.poll() is not None:
                raise RuntimeError(f"rabbitflow run --workers {workers} exited with {parent.returncode}")
            got = await admin.depth(queue)
            ready = got[0] if got else messages
            now = time.monotonic()
            pids = [parent.pid, *children(parent.pid)]  # the supervisor too (one process at N = 1)
            sample = (now, ready, sum(cpu_seconds(p) for p in brokers), sum(cpu_seconds(p) for p in pids))
            if start is None and ready <= high:
                start = sample
            if start is not None and ready <= low:
                end = sample
                break
            await asyncio.sleep(0.05)
    finally:
        parent.send_signal(signal.SIGTERM)
        await asyncio.to_thread(parent.wait, 60)
        await admin.close()
        await forget(url, app)
    if start is None or end is None:
        raise RuntimeError(f"{workers} worker(s): the queue was not drained in time")
    handled = start[1] - end[1]
    seconds = end[0] - start[0]
    return {
        "rate": handled / seconds,
        "broker_cores": (end[2] - start[2]) / seconds,
        "worker_cores": (end[3] - start[3]) / seconds,
        "broker_us": (end[2] - start[2]) / handled * 1e6,
        "worker_us": (end[3] - start[3]) / handled * 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", default="1,2,4", help="worker counts (default: %(default)s)")
    parser.add_argument("--messages", type=int, default=40_000, help="per run (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds, interleaved (default: %(default)s)")
    parser.add_argument("--queue-type", default=None, choices=("classic", "quorum"))
    parser.add_argument("--cluster", action="store_true", help="on scripts/cluster.sh's 3-node cluster")
    parser.add_argument("--out", help="also append the markdown table to this file")
    args = parser.parse_args()
    queue_type = args.queue_type or ("quorum" if args.cluster else "classic")
    url = cluster_urls() if args.cluster else benchlib.AMQP_URL
    counts = [int(n) for n in args.workers.split(",")]
    runs: dict[int, list[dict[str, float]]] = {n: [] for n in counts}
    for round_ in range(args.rounds):
        for n in counts:
            result = asyncio.run(one_run(url, n, args.messages, queue_type, args.cluster))
            runs[n].append(result)
            print(
                f"round {round_ + 1}, {n} worker(s): {result['rate']:,.0f} msg/s, broker "
                f"{result['broker_cores']:.2f} cores ({result['broker_us']:.0f} us/msg), workers "
                f"{result['worker_cores']:.2f} cores ({result['worker_us']:.0f} us/msg)",
                flush=True,
            )
    where = "3-node cluster" if args.cluster else "single node"
    lines = [
        f"`rabbitflow run --workers N`, {queue_type} queue, {where}, {os.cpu_count()} cores, "
        f"{args.messages:,} messages, medians of {args.rounds} rounds:",
        "",
        "| workers | msg/s | × one | broker CPU | broker µs/msg | workers CPU | workers µs/msg |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    base = statistics.median(r["rate"] for r in runs[counts[0]])
    for n in counts:

        def med(key: str, n: int = n) -> float:
            return statistics.median(r[key] for r in runs[n])

        lines.append(
            f"| {n} | {med('rate'):,.0f} | {med('rate') / base:.2f}× | {med('broker_cores'):.2f} cores | "
            f"{med('broker_us'):.0f} | {med('worker_cores'):.2f} cores | {med('worker_us'):.0f} |"
        )
    table = "\n".join(lines)
    print("\n" + table)
    if args.out:
        with open(args.out, "a") as out:
            out.write(table + "\n\n")


if __name__ == "__main__":
    main()
