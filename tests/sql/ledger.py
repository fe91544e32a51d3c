"""The crash-proof ledger: workers SIGKILLed at random, every effect exactly once.

Each input `in-N` on the input queue is handled by an `exactly_once` consumer that writes one
`effects` row and stages one output message through the outbox; a second `exactly_once` consumer
handles each output, writing one `downstream` row (and, outside any transaction, one `arrivals`
row per delivery it sees, duplicates included). Workers (separate processes, each with its relay)
kill themselves with SIGKILL at random:

- after the handler's transaction committed and before the ack (both consumers);
- mid-relay: after a message of a batch was confirmed by the broker, before the batch is marked
  sent (so it is sent again);

and the runner SIGKILLs a random worker every `--kill-every` seconds and starts another. When the
chaos ends the runner waits until everything settled and checks: one effect per input, one outbox
message per input and all of them sent, one downstream row per outbox message (though some
reached the broker twice), nothing parked.

    python -m tests.sql.ledger [--minutes 10] [--inputs 20000] [--workers 3] [--seed N]
    python -m tests.sql.ledger worker CONFIG_JSON      (what the runner starts)

Needs the broker (RABBITFLOW_TEST_URL) and PostgreSQL (RABBITFLOW_TEST_PG_URL, scripts/postgres.sh).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiormq
import asyncpg
from sqlalchemy import Column, Integer, MetaData, String, Table, insert, text
from sqlalchemy.ext.asyncio import create_async_engine

from rabbitflow import App, Message, Middleware
from rabbitflow.middleware import Outgoing
from rabbitflow.sql import Outbox, Transaction

from ..brokers import cluster_ports

ROOT = Path(__file__).resolve().parents[2]
BROKER_URL = os.environ.get("RABBITFLOW_TEST_URL", "amqp://guest:guest@127.0.0.1:5672/")
PG_URL = os.environ.get("RABBITFLOW_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5433/postgres")

ledger = MetaData()
effects = Table("effects", ledger, Column("id", Integer, primary_key=True), Column("input", String(64)))
downstream = Table(
    "downstream",
    ledger,
    Column("id", Integer, primary_key=True),
    Column("output", String(64)),
    Column("of", String(64)),
)
arrivals = Table("arrivals", ledger, Column("id", Integer, primary_key=True), Column("output", String(64)))


@dataclass(frozen=True)
class Config:
    database: str  # SQLAlchemy URL (postgresql+asyncpg://...)
    broker: str
    service: str
    inputs: str  # queue names
    outputs: str
    kill_chance: float  # per kill point and message
    calm_file: str  # once it exists, workers stop killing themselves
    queue_type: str = "classic"  # quorum when broker nodes are killed too


def build(config: Config, outbox: Outbox | None = None, kill: Callable[[str], None] = lambda _: None) -> App:
    """The worker's app (also what the runner declares, with no outbox)."""
    app = App(config.service, url=config.broker, graceful_timeout=2, middleware=[KillMidRelay(kill)])

    @app.consumer(config.inputs, queue_type=config.queue_type, retries=5, delay=1, prefetch=16)
    async def on_input(body: dict[str, str], message: Message) -> None:
        assert outbox is not None

        async def work(tx: Transaction) -> None:
            await tx.session.execute(insert(effects).values(input=body["id"]))
            tx.publish({"of": body["id"]}, routing_key=config.outputs)

        await outbox.inbox.attempt(config.inputs, message, work)
        kill("input committed, not acked")

    @app.consumer(config.outputs, queue_type=config.queue_type, retries=5, delay=1, prefetch=16)
    async def on_output(body: dict[str, str], message: Message) -> None:
        assert outbox is not None
        async with outbox.engine.begin() as connection:  # its own transaction: every delivery counts
            await connection.execute(insert(arrivals).values(output=message.message_id))

        async def work(tx: Transaction) -> None:
            await tx.session.execute(insert(downstream).values(output=message.message_id, of=body["of"]))

        await outbox.inbox.attempt(config.outputs, message, work)
        kill("output committed, not acked")

    return app


class KillMidRelay(Middleware):
    """Kills the worker right after the broker confirmed a relayed message (before its batch is
    marked sent)."""

    def __init__(self, kill: Callable[[str], None]) -> None:
        self._kill = kill

    async def publish(self, outgoing: Outgoing, call_next: Callable[[], Awaitable[None]]) -> None:
        await call_next()
        self._kill("mid-relay")


async def worker(config: Config) -> None:
    rng = random.Random()
    calm = Path(config.calm_file)

    def kill(where: str) -> None:
        if rng.random() < config.kill_chance and not calm.exists():
            print(f"worker {os.getpid()}: SIGKILL {where}", file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)

    engine = create_async_engine(config.database, pool_size=20)
    outbox = Outbox(engine, poll=0.5, batch=20)
    app = build(config, outbox, kill)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    async with app, outbox.relaying(app):
        print("ready", flush=True)
        await stop.wait()
    await engine.dispose()


# -- the runner --------------------------------------------------------------------------------


@dataclass
class Result:
    inputs: int
    effects: int
    distinct_effects: int
    outbox_rows: int
    unsent: int
    downstream: int
    distinct_downstream: int
    unmatched_downstream: int
    arrivals: int  # deliveries of outputs seen downstream, duplicates included
    parked: int
    external_kills: int
    worker_deaths: int  # every SIGKILL: the runner's and the workers' own
    seconds: float
    node_kills: int = 0  # broker nodes SIGKILLed (cluster runs)

    def problems(self) -> list[str]:
        out = []
        if not (self.effects == self.distinct_effects == self.inputs):
            out.append(
                f"effects: {self.effects} rows, {self.distinct_effects} inputs, want {self.inputs} once"
            )
        if self.outbox_rows != self.inputs:
            out.append(f"outbox: {self.outbox_rows} messages for {self.inputs} inputs")
        if self.unsent:
            out.append(f"outbox: {self.unsent} messages never sent")
        if not (self.downstream == self.distinct_downstream == self.inputs) or self.unmatched_downstream:
            out.append(
                f"downstream: {self.downstream} rows, {self.distinct_downstream} outputs, "
                f"{self.unmatched_downstream} not from the outbox; want {self.inputs} once"
            )
        if self.parked:
            out.append(f"{self.parked} messages parked")
        return out


class Workers:
    def __init__(self, config: Config, count: int) -> None:
        self._config = config
        self._count = count
        self.procs: list[subprocess.Popen[bytes]] = []
        self.deaths = 0

    def spawn(self) -> None:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.sql.ledger", "worker", json.dumps(asdict(self._config))],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
        )
        self.procs.append(proc)

    def replace_dead(self) -> None:
        for proc in list(self.procs):
            if proc.poll() is not None:
                self.procs.remove(proc)
                self.deaths += proc.returncode == -signal.SIGKILL
        while len(self.procs) < self._count:
            self.spawn()

    def stop(self, timeout: float = 15) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


async def run(
    database: str,
    *,
    inputs: int,
    seconds: float,
    workers: int,
    kill_every: float,
    kill_chance: float,
    seed: int,
    cluster: bool = False,
) -> Result:
    """One ledger run on `database` (which must exist and be empty). With `cluster`, on the local
    3-node cluster (scripts/cluster.sh) with quorum queues, and nodes 2 and 3 SIGKILLed in turn
    (each started again before the next) while the workers die too."""
    rng = random.Random(seed)
    tag = uuid.uuid4().hex[:8]
    calm = Path(f"/tmp/rabbitflow-ledger-{tag}.calm")
    runner_url = BROKER_URL
    workers_url = BROKER_URL
    if cluster:
        ports = cluster_ports()
        runner_url = f"amqp://guest:guest@127.0.0.1:{ports[1]}/"  # node 1 is never killed
        workers_url = ";".join(f"amqp://guest:guest@127.0.0.1:{ports[n]}/" for n in (2, 3, 1))
    config = Config(
        database,
        workers_url,
        f"ledger-{tag}",
        f"ledger-{tag}-in",
        f"ledger-{tag}-out",
        kill_chance,
        str(calm),
        "quorum" if cluster else "classic",
    )
    engine = create_async_engine(database)
    await Outbox(engine).create_tables()
    async with engine.begin() as connection:
        await connection.run_sync(ledger.create_all)
    plan_app = build(config)
    plan_app.use_url(runner_url)
    await plan_app.declare()
    connection = await aiormq.connect(runner_url)
    channel = await connection.channel()
    await channel.confirm_delivery()
    pool = Workers(config, workers)
    started = time.monotonic()
    kills = 0
    node_kills = 0
    faults: asyncio.Task[int] | None = None
    try:
        for n in range(inputs):
            await channel.basic_publish(
                json.dumps({"id": f"in-{n}"}).encode(),
                routing_key=config.inputs,
                properties=aiormq.spec.Basic.Properties(
                    message_id=f"in-{n}", content_type="application/json", delivery_mode=2
                ),
            )
        pool.replace_dead()
        end = time.monotonic() + seconds
        if cluster:
            faults = asyncio.get_running_loop().create_task(_kill_nodes(end))
        while time.monotonic() < end:
            await asyncio.sleep(rng.uniform(0.5, 1.5) * kill_every)
            pool.replace_dead()
            victim = rng.choice(pool.procs)
            if victim.poll() is None:
                victim.send_signal(signal.SIGKILL)
                kills += 1
            pool.replace_dead()
        if faults is not None:
            node_kills = await faults
        calm.touch()  # noqa: ASYNC240 - a marker file, once
        settle = time.monotonic() + max(60.0, seconds)
        while time.monotonic() < settle:
            pool.replace_dead()
            result = await _tally(engine, channel, config, inputs)
            if not result.problems():
                await asyncio.sleep(1.0)  # a late duplicate would show now
                break
            await asyncio.sleep(0.5)
    finally:
        if faults is not None and not faults.done():
            faults.cancel()
            for node in (2, 3):  # whatever a cancelled fault left down
                await _cluster("start-node", str(node))
        pool.stop()
        calm.unlink(missing_ok=True)  # noqa: ASYNC240
        result = await _tally(engine, channel, config, inputs)
        for queue in plan_app.plan.queues:
            await channel.queue_delete(queue.name)
        for exchange in plan_app.plan.exchanges:
            if exchange.name:
                await channel.exchange_delete(exchange.name)
        await connection.close()
        await engine.dispose()
    result.external_kills = kills
    result.node_kills = node_kills
    result.worker_deaths = pool.deaths
    result.seconds = round(time.monotonic() - started, 1)
    return result


async def _cluster(*args: str) -> None:
    process = await asyncio.create_subprocess_exec(
        str(ROOT / "scripts" / "cluster.sh"),
        *args,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"cluster.sh {' '.join(args)}: {err.decode().strip()}")


async def _kill_nodes(end: float) -> int:
    """SIGKILL node 2, then node 3, ... until `end`, and each of them at least once however slowly
    a node boots: each down for 3 s, then started again and given time to rejoin (a quorum queue
    keeps its majority: one node down at a time)."""
    kills = 0
    node = 2
    while kills < 2 or time.monotonic() + 10 < end:
        await asyncio.sleep(2)
        await _cluster("kill-node", str(node))
        kills += 1
        await asyncio.sleep(3)
        await _cluster("start-node", str(node))
        await asyncio.sleep(3)  # the queues' members catch up before the next node goes
        node = 5 - node
    return kills


async def _tally(engine: Any, channel: aiormq.abc.AbstractChannel, config: Config, inputs: int) -> Result:
    async with engine.connect() as c:

        async def one(sql: str) -> int:
            return int((await c.execute(text(sql))).scalar() or 0)

        parked = 0
        for queue in (config.inputs, config.outputs):
            ok = await channel.queue_declare(f"{queue}.parked", passive=True)
            parked += int(ok.message_count or 0)
        return Result(
            inputs=inputs,
            effects=await one("SELECT count(*) FROM effects"),
            distinct_effects=await one("SELECT count(DISTINCT input) FROM effects"),
            outbox_rows=await one("SELECT count(*) FROM rabbitflow_outbox"),
            unsent=await one("SELECT count(*) FROM rabbitflow_outbox WHERE sent_at IS NULL"),
            downstream=await one("SELECT count(*) FROM downstream"),
            distinct_downstream=await one("SELECT count(DISTINCT output) FROM downstream"),
            unmatched_downstream=await one(
                "SELECT count(*) FROM downstream d LEFT JOIN rabbitflow_outbox o "
                "ON o.message_id = d.output WHERE o.id IS NULL"
            ),
            arrivals=await one("SELECT count(*) FROM arrivals"),
            parked=parked,
            external_kills=0,
            worker_deaths=0,
            node_kills=0,
            seconds=0.0,
        )


async def _main(args: argparse.Namespace) -> int:
    name = f"rf_ledger_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(PG_URL)
    await admin.execute(f'CREATE DATABASE "{name}"')
    base = PG_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://", 1)
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    print(
        f"ledger: seed {seed}, {args.inputs} inputs, {args.minutes} min, {args.workers} workers", flush=True
    )
    try:
        result = await run(
            f"{base}/{name}",
            inputs=args.inputs,
            seconds=args.minutes * 60,
            workers=args.workers,
            kill_every=args.kill_every,
            kill_chance=args.kill_chance,
            seed=seed,
            cluster=args.cluster,
        )
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
    print(json.dumps(asdict(result), indent=2))
    for problem in result.problems():
        print(f"FAIL: {problem}")
    return 1 if result.problems() else 0


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "worker":
        asyncio.run(worker(Config(**json.loads(sys.argv[2]))))
        return 0
    parser = argparse.ArgumentParser(prog="python -m tests.sql.ledger", description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--inputs", type=int, default=20000)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--kill-every", type=float, default=2.0, help="seconds between the runner's kills")
    parser.add_argument("--kill-chance", type=float, default=0.002, help="per kill point and message")
    parser.add_argument("--seed", type=int)
    parser.add_argument(
        "--cluster",
        action="store_true",
        help="on the 3-node cluster (scripts/cluster.sh), killing nodes 2 and 3 too",
    )
    return asyncio.run(_main(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
