#!/usr/bin/env python
"""The benchmark runner: rabbitflow vs. aiormq / aio-pika / FastStream.

    python benchmarks/run.py [--quick] [--rounds R] [--n N] [--rss-n N]
                             [--only import,publish,consume,mixed,retry,rss]
                             [--contenders aiormq_raw,aio_pika,...]
                             [--out docs/benchmarks.md]

How a result is made (see also the "Method" section written into the report):

* Every measurement runs in its own fresh subprocess:
  ``python benchmarks/contenders/<name>.py <scenario> --n N --queue Q
  --queue-type classic|quorum``, which prints one JSON line.
* Contenders are interleaved round by round, and the order inside a round is
  rotated every round, so slow drift of the machine or the broker is spread
  over all contenders.  Round 0 is a warm-up and is discarded.
* Each measurement gets its own queue (random suffix), prepared by this
  runner with plain aiormq (declared, pre-filled before the contender starts),
  checked afterwards (consume: 0 messages left and no consumer, i.e. all N were
  acked; publish: exactly N messages arrived) and deleted.  A measurement that
  fails the check is reported as failed, not counted.
* Reported: median, min and max of the measured rounds, and the cost ratio to
  the raw aiormq baseline (time per message, seconds, or KiB; 1.00 = same as
  aiormq_raw, 2.00 = twice the cost).  Nothing is asserted about timings.

Adding a scenario (e.g. the planned ``failover``): write a ``Scenario`` and
``register()`` it next to the others below, and add the scenario name to the
``scenarios`` dict of the contenders that implement it.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import datetime as _dt
import json
import os
import platform
import secrets
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
sys.path.insert(0, str(BENCH_DIR))

import benchlib  # noqa: E402

BASELINE = "aiormq_raw"
CONTENDER_ORDER = ["c_librabbitmq", "aiormq_raw", "aiormq_batched", "aio_pika", "faststream", "rabbitflow"]
# Not in a default run: rabbitflow with middleware (`--contenders aiormq_raw,rabbitflow,rabbitflow_seam,...`),
# on uvloop (rabbitflow_uvloop: `pip install uvloop`), another checkout (rabbitflow_baseline:
# RF_BASELINE), and the least a Python asyncio consumer does (python_floor: consume only).
VARIANTS = [
    "rabbitflow_seam",
    "rabbitflow_prometheus",
    "rabbitflow_otel",
    "rabbitflow_uvloop",
    "rabbitflow_baseline",
    "python_floor",
    "rabbitflow_depends",  # a handler with Depends (issue 24)
    "rabbitflow_sync",  # a sync `def` handler in worker threads (issue 24)
]
# Contenders in C, built here from benchmarks/contenders/c/<name>.c (Debian: librabbitmq-dev). The C
# client is the ceiling: what one single-threaded client on this machine gets out of the broker.
NATIVE = {"c_librabbitmq": ["-lrabbitmq"]}
CEILING = "c_librabbitmq"
BUILD_DIR = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "rabbitflow-bench"
PEERS_PYTHON = ROOT / ".venv-bench-peers" / "bin" / "python"


def _python_for(name: str) -> str:
    """FastStream runs from a separate venv if one was made for it (only needed
    when installing faststream would change the aio-pika/aiormq versions)."""
    if name == "faststream" and PEERS_PYTHON.exists():
        return str(PEERS_PYTHON)
    return sys.executable


# ---------------------------------------------------------------------------
# configuration


@dataclass
class Config:
    quick: bool
    rounds: int  # measured rounds (the warm-up round comes on top)
    warmup: int
    n: int  # messages per consume measurement
    mixed_n: int
    publish_n: int
    retry_n: int
    rss_n: int
    rss_rounds: int
    import_rounds: int
    only: list[str] | None
    contenders: list[str] | None
    out: Path | None
    prefetch: int = benchlib.PREFETCH
    window: int = benchlib.WINDOW
    queue_types: tuple[str, ...] = ("classic", "quorum")  # consume, mixed
    publish_queue_types: tuple[str, ...] = ("classic", "quorum")
    retry_queue_types: tuple[str, ...] = ("classic", "quorum")
    latency_loads: tuple[float, ...] = (0.25, 0.5, 0.8)  # of the C client's consume rate
    latency_rates: tuple[float, ...] = ()  # fixed offered rates (msg/s) instead of loads
    latency_seconds: float = 3.0  # producing time per measurement
    latency_rounds: int = 3


# Sized for a 2-core machine: --quick ~2 minutes, full ~10 minutes (when nothing else runs; mixed
# takes about a minute of --quick and 4-5 minutes of the full run).
QUICK: dict[str, Any] = {
    "rounds": 2,
    "n": 2_000,
    "mixed_n": 5_000,
    "publish_n": 2_000,
    "retry_n": 2_000,
    "rss_n": 20_000,
    "rss_rounds": 1,
    "import_rounds": 3,
    "publish_queue_types": ("classic",),
    "retry_queue_types": ("classic",),
    "latency_seconds": 1.5,
    "latency_rounds": 2,
}
FULL: dict[str, Any] = {
    "rounds": 5,
    "n": 10_000,
    "mixed_n": 20_000,  # 40 slow handlers; one measurement takes a few seconds
    "publish_n": 5_000,
    "retry_n": 5_000,
    "rss_n": 200_000,  # the "RSS flat over 200,000 messages"
    "rss_rounds": 1,
    "import_rounds": 15,
    "publish_queue_types": ("classic", "quorum"),
    "retry_queue_types": ("classic", "quorum"),
    "latency_seconds": 3.0,
    "latency_rounds": 3,
}


# ---------------------------------------------------------------------------
# contenders


@dataclass
class Contender:
    name: str
    script: Path
    python: str
    info: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    argv: list[str] | None = None  # a native contender's command (else: python script)

    @property
    def command(self) -> list[str]:
        return self.argv or [self.python, str(self.script)]

    @property
    def scenarios(self) -> list[str]:
        return list(self.info.get("scenarios", []))

    @property
    def declares_own_queue(self) -> bool:
        return bool(self.info.get("declares_own_queue"))

    def supports(self, scenario: str) -> bool:
        return scenario in self.scenarios

    def cleanup_names(self, queue: str, app: str) -> tuple[list[str], list[str]]:
        c = self.info.get("cleanup") or {}
        qs = [s.format(queue=queue, app=app) for s in c.get("queues", [])]
        xs = [s.format(queue=queue, app=app) for s in c.get("exchanges", [])]
        if queue not in qs:
            qs.insert(0, queue)
        return qs, xs


def build_native(name: str) -> Path:
    """The C contender's binary, compiled with the system compiler (`$CC`, else cc) into BUILD_DIR
    when it is missing or older than its source. Raises RuntimeError with the compiler's output."""
    src = BENCH_DIR / "contenders" / "c" / f"{name}.c"
    binary = BUILD_DIR / name
    if binary.exists() and binary.stat().st_mtime >= src.stat().st_mtime:
        return binary
    BUILD_DIR.mkdir(parents=True, exist_ok=True)
    tmp = binary.with_name(f".{name}.{os.getpid()}")
    cmd = [os.environ.get("CC", "cc"), "-O2", "-Wall", "-o", str(tmp), str(src), *NATIVE[name]]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    except OSError as exc:
        raise RuntimeError(f"cannot run the C compiler: {exc!r}") from None
    if p.returncode != 0:
        hint = " (Debian: apt-get install librabbitmq-dev)" if "amqp" in p.stderr else ""
        raise RuntimeError(f"build failed{hint}: {tail(p.stderr)}")
    tmp.replace(binary)
    return binary


def load_contenders(names: list[str]) -> list[Contender]:
    out = []
    for name in names:
        c = Contender(name, BENCH_DIR / "contenders" / f"{name}.py", _python_for(name))
        try:
            if name in NATIVE:
                c.script = build_native(name)
                c.argv = [str(c.script)]
            p = subprocess.run(
                [*c.command, "--describe"],
                capture_output=True,
                text=True,
                cwd=ROOT,
                timeout=60,
            )
            if p.returncode != 0:
                c.error = tail(p.stderr)
            else:
                c.info = json.loads(p.stdout.strip().splitlines()[-1])
        except Exception as exc:
            c.error = repr(exc)
        out.append(c)
    return out


def tail(text: str, lines: int = 6) -> str:
    ls = [x for x in text.strip().splitlines() if x.strip()]
    return " | ".join(x.strip() for x in ls[-lines:]) if ls else "(no stderr)"


# ---------------------------------------------------------------------------
# scenarios (the registry)


@dataclass
class Case:
    scenario: str
    label: str
    n: int
    queue_type: str = "classic"
    variants: tuple[str, ...] = ("",)  # e.g. retry: ("all_ok", "fail_once"), interleaved like contenders
    rounds: int = 5
    warmup: int = 1
    load: float | None = None  # latency: offered load as a share of the C client's consume rate
    offered: float | None = None  # latency: offered msg/s (fixed by --latency-rates, or from `load`)


@dataclass
class Measurement:
    ok: bool
    data: dict[str, Any] = field(default_factory=dict)
    error: str = ""
    runner_error: bool = False  # the runner's own set-up failed: skip this sample, keep the contender


# unit (contender, variant) -> list of measured (non-warm-up) results
Results = dict[tuple[str, str], list[Measurement]]


@dataclass
class Scenario:
    name: str
    title: str
    description: str
    metric: str  # key of the contender's JSON result that is compared
    unit: str
    higher_is_better: bool
    cases: Callable[[Config], list[Case]]
    prefill: bool = False  # runner pre-fills the queue with N messages before the contender starts
    phases: bool = False  # trace the broker's CPU to split it at the first handled message
    consumes: bool = False  # contender consumes the queue: run the declare phase for own-topology contenders
    expected_depth: Callable[[Case], int] = lambda case: 0  # ready messages expected after the run
    run: Callable[[Runner, Case], Awaitable[Results]] | None = None  # custom runner (default: broker)
    render: Callable[[Runner, Case, Results], list[str]] | None = None  # custom markdown (default: table)
    baseline: str | None = BASELINE


SCENARIOS: dict[str, Scenario] = {}


def register(s: Scenario) -> Scenario:
    SCENARIOS[s.name] = s
    return s


def _rounds(cfg: Config) -> dict[str, Any]:
    return {"rounds": cfg.rounds, "warmup": cfg.warmup}


register(
    Scenario(
        name="import",
        title="Import time",
        description='Wall time of a whole `python -c "import X"` process (interpreter start included; '
        "`python -c pass` shown for reference).",
        metric="seconds",
        unit="s",
        higher_is_better=False,
        cases=lambda cfg: [Case("import", "import", 0, rounds=cfg.import_rounds, warmup=cfg.warmup)],
        run=lambda runner, case: runner.run_import(case),
    )
)

register(
    Scenario(
        name="publish",
        title="Publish with confirms",
        description="N persistent JSON messages (~256 B) to the default exchange with publisher confirms, "
        "windows of 256 publishes in flight awaited together; connection opened before timing; "
        "timing until the last confirm. The runner checks that exactly N messages arrived, persistent and "
        "with content type application/json.",
        metric="rate",
        unit="msg/s",
        higher_is_better=True,
        cases=lambda cfg: [
            Case("publish", f"publish/{qt}", cfg.publish_n, queue_type=qt, **_rounds(cfg))
            for qt in cfg.publish_queue_types
        ],
        expected_depth=lambda case: case.n,
    )
)

register(
    Scenario(
        name="consume",
        title="Consume, ack each message",
        description="Queue pre-filled with N persistent JSON messages (~256 B) before the contender starts; "
        "timing from starting the consumer (connection included) until the N-th message was handled; "
        "orjson decode, no-op handler, ack after the handler (one basic.ack per message for aiormq_raw, "
        "aio_pika and faststream; see Contenders for aiormq_batched and rabbitflow), prefetch 256. The "
        "runner checks that the queue is empty afterwards.",
        metric="rate",
        unit="msg/s",
        higher_is_better=True,
        cases=lambda cfg: [
            Case("consume", f"consume/{qt}", cfg.n, queue_type=qt, **_rounds(cfg)) for qt in cfg.queue_types
        ],
        prefill=True,
        consumes=True,
    )
)

register(
    Scenario(
        name="mixed",
        title="Mixed latency: 1 slow handler in 500",
        description="As consume (queue pre-filled with N persistent JSON messages, prefetch 256, timing from "
        "starting the consumer until the N-th message was handled, ack after the handler), but 1 handler in "
        f"{benchlib.SLOW_EVERY} (message id % {benchlib.SLOW_EVERY} == 0, the id is in the body) awaits "
        f"`asyncio.sleep({benchlib.SLOW_SECONDS})`; the others only orjson-decode. Up to 256 handlers run at "
        "once; `aiormq_raw` acks each message on its own from aiormq's per-delivery task after its handler, "
        "so a sleeping handler holds back only its own ack. The runner checks that the queue is empty "
        "afterwards (all N acked). The ratio depends on the machine: a client that holds back the acks "
        "behind a sleeping handler idles once the window is full, and the faster it handles the other "
        "messages, the larger that idle share of its time (client CPU/msg × msg/s = its busy cores).",
        metric="rate",
        unit="msg/s",
        higher_is_better=True,
        cases=lambda cfg: [
            Case("mixed", f"mixed/{qt}", cfg.mixed_n, queue_type=qt, **_rounds(cfg)) for qt in cfg.queue_types
        ],
        prefill=True,
        consumes=True,
    )
)

register(
    Scenario(
        name="retry",
        title="Delayed retry",
        description="As consume, but every message fails once and succeeds on its delayed retry "
        "(`fail_once`, retry delay 50 ms, included in the time), interleaved with the same N messages all "
        "succeeding (`all_ok`, same handler signature); timing until N messages completed successfully. "
        "aio-pika and FastStream have no delayed retries; `aiormq_raw` does the same pattern by hand "
        "(persistent mandatory copy to a TTL queue, ack after the copy's confirm), the floor of what any "
        "client keeping those guarantees pays. Broker CPU is the RabbitMQ process's CPU time during the "
        "contender's whole process (its connect and declarations included) divided by N: the broker "
        "shares this machine's 2 cores with the client.",
        metric="rate",
        unit="msg/s",
        higher_is_better=True,
        cases=lambda cfg: [
            Case(
                "retry",
                f"retry/{qt}",
                cfg.retry_n,
                queue_type=qt,
                variants=("all_ok", "fail_once"),
                **_rounds(cfg),
            )
            for qt in cfg.retry_queue_types
        ],
        prefill=True,
        consumes=True,
        phases=True,
        render=lambda runner, case, res: runner.render_retry(case, res),
        baseline=None,
    )
)

register(
    Scenario(
        name="rss",
        title="Memory over a long consume run",
        description="Consume as above over a long run; VmRSS sampled every 50 ms from /proc/self/status "
        "in the contender, VmHWM (peak) at the end. Growth = RSS at the end minus RSS after the first 10% "
        "of the messages.",
        metric="hwm_kb",
        unit="KiB",
        higher_is_better=False,
        cases=lambda cfg: [Case("rss", "rss/classic", cfg.rss_n, rounds=cfg.rss_rounds, warmup=0)],
        prefill=True,
        consumes=True,
        render=lambda runner, case, res: runner.render_rss(case, res),
    )
)


async def _run_failover(runner: Runner, case: Case) -> Results:
    """benchmarks/failover.py once per round, each in a fresh process, on the local 3-node cluster
    (started here when it is not running, and stopped again afterwards)."""
    script = ROOT / "scripts" / "cluster.sh"

    def run(*cmd: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)

    started = (await asyncio.to_thread(run, str(script), "status")).returncode != 0
    results: Results = {("rabbitflow", ""): []}
    if started:
        runner.log("failover: starting the local 3-node cluster")
        up = await asyncio.to_thread(run, str(script), "start")
        if up.returncode != 0:
            runner.failures[(case.label, "rabbitflow")] = tail(up.stderr)
            return results
    try:
        for rnd in range(case.warmup + case.rounds):
            proc = await asyncio.to_thread(run, sys.executable, str(ROOT / "benchmarks" / "failover.py"))
            lines = [x for x in proc.stdout.splitlines() if x.strip()]
            if proc.returncode != 0 or not lines:
                runner.failures[(case.label, "rabbitflow")] = tail(proc.stderr)
                continue
            data = json.loads(lines[-1])
            runner.log(
                f"failover round {rnd}: resumed {data['seconds'] * 1000:.0f} ms after SIGKILL; "
                f"{data['messages']:.0f} sent, {data['lost']:.0f} lost, {data['duplicates']:.0f} duplicates"
            )
            if rnd >= case.warmup:
                results[("rabbitflow", "")].append(Measurement(True, data))
    finally:
        if started:
            await asyncio.to_thread(run, str(script), "stop")
    return results


register(
    Scenario(
        name="failover",
        title="Failover on a 3-node cluster (rabbitflow only)",
        description="A consumer and a producer on a quorum queue with the three nodes' URLs; the node the "
        "consumer is connected to is killed with SIGKILL; time from the kill to the first message handled "
        "after the reconnect. aio-pika's connect_robust and FastStream take one URL and never fail over to "
        "another node (aio-pika #141), so peers are n/a. Messages lost and duplicated are in the log above "
        "the table; every run so far lost none.",
        metric="seconds",
        unit="s",
        higher_is_better=False,
        cases=lambda cfg: [Case("failover", "failover/quorum", 0, queue_type="quorum", rounds=3, warmup=0)],
        run=_run_failover,
        baseline=None,
    )
)


def _latency_cases(cfg: Config) -> list[Case]:
    def case(label: str, load: float | None, offered: float | None) -> Case:
        return Case(
            "latency",
            label,
            0,
            "classic",
            rounds=cfg.latency_rounds,
            warmup=cfg.warmup,
            load=load,
            offered=offered,
        )

    if cfg.latency_rates:
        return [case(f"latency/classic/{r:,.0f} msg/s", None, r) for r in cfg.latency_rates]
    return [case(f"latency/classic/{load:.0%}", load, None) for load in cfg.latency_loads]


async def _run_latency(runner: Runner, case: Case) -> Results:
    """Each contender consumes while the C producer offers a fixed rate; one fresh pair of
    processes per measurement, contenders interleaved and rotated as in the other scenarios."""
    units = [c for c in runner.contenders if c.error is None and c.supports("latency")]
    # A contender that fell behind at a lower load falls further behind at a higher one: its latency
    # there is the length of the run, not worth the minutes it takes to measure.
    units = [c for c in units if c.name not in runner.behind or case.offered is not None]
    results: Results = {(c.name, ""): [] for c in units}
    producer = runner.by_name.get(CEILING)
    if producer is None or producer.argv is None:
        try:
            producer_bin = build_native(CEILING)
        except RuntimeError as exc:
            for c in units:
                runner.failures[(case.label, c.name)] = f"no paced producer: {exc}"
            return {}
    else:
        producer_bin = Path(producer.argv[0])
    if case.offered is None:
        capacity = await runner.c_consume_rate()
        if capacity is None:
            for c in units:
                runner.failures[(case.label, c.name)] = "the C client's consume rate could not be measured"
            return {}
        case.offered = (case.load or 1.0) * capacity
    case.n = max(1_000, int(case.offered * runner.cfg.latency_seconds))
    runner.log(f"{case.label}: offering {case.offered:,.0f} msg/s, N = {case.n:,}")
    dead: set[str] = set()
    for rnd in range(case.warmup + case.rounds):
        k = rnd % len(units) if units else 0
        tag = "warm-up" if rnd < case.warmup else f"round {rnd - case.warmup + 1}/{case.rounds}"
        for c in units[k:] + units[:k]:
            if c.name in dead:
                continue
            m = await runner.measure_latency(case, c, producer_bin, rnd)
            if m.runner_error:
                runner.runner_errors.append(f"{case.label} {tag} {c.name}: {m.error}")
                runner.log(f"{case.label} {tag} {c.name}: SKIPPED, {m.error}")
                continue
            if not m.ok:
                dead.add(c.name)
                runner.failures[(case.label, c.name)] = m.error
                runner.log(f"{case.label} {tag} {c.name}: FAILED: {m.error}")
                continue
            d = m.data
            bg = d.get("bg_cores", 0.0)
            note = f"   (background CPU {bg:.2f} cores)" if bg > Probe.QUIET else ""
            runner.log(
                f"{case.label} {tag} {c.name}: p50 {fmt_us(d['p50_us'])}, p99 {fmt_us(d['p99_us'])}, "
                f"p99.9 {fmt_us(d['p999_us'])}; handled {d.get('steady_rate', 0):,.0f} msg/s{note}"
            )
            if rnd >= case.warmup:
                results[(c.name, "")].append(m)
    for name in dead:
        results[(name, "")] = []
    for (name, _), ms in results.items():
        handled = [m.data.get("steady_rate") or 0.0 for m in ms]
        if handled and statistics.median(handled) < KEPT_UP * case.offered:
            runner.behind.setdefault(name, case.label)
    return results


KEPT_UP = 0.97  # latency: handled at least this share of the offered rate


register(
    Scenario(
        name="latency",
        title="End-to-end latency at a fixed offered load",
        description="A paced producer in C (`contenders/c`, librabbitmq; it sleeps until the next message is "
        "due and sends what is due, persistent ~256 B JSON without confirms, so it is never what limits "
        "the rate) publishes to a classic queue at a fixed rate (a share of the C client's consume rate, the "
        "steady msg/s of its consume/classic runs, measured first when this run has none) while the "
        "contender consumes it (prefetch 256, ack after the handler). Each body carries `sent_ns`, "
        "CLOCK_REALTIME in ns taken just before its publish; the handler's first act takes the time again "
        "(`time.time_ns()`; in C "
        "`clock_gettime(CLOCK_REALTIME)`): latency = publish → handler start, through the broker. The first "
        "10% of the messages (connection, first prefetch window) are left out. Percentiles per run (nearest "
        'rank), then the median over the rounds. "kept up" = the contender handled the messages at '
        "≥ 97% of the offered rate; one that did not fell behind, its queue grew, and its latency grew with "
        "the run's length, not with its per-message cost.",
        metric="p99_us",
        unit="µs",
        higher_is_better=False,
        cases=_latency_cases,
        consumes=True,
        run=_run_latency,
        render=lambda runner, case, res: runner.render_latency(case, res),
        baseline=None,
    )
)


def fmt_us(v: float | None) -> str:
    if v is None:
        return "–"
    return f"{v / 1000:,.1f} ms" if v >= 10_000 else f"{v:,.0f} µs"


# ---------------------------------------------------------------------------
# machine probes: wait for a quiet machine, and measure interference


_HZ = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _cpu_stat() -> tuple[float, float]:
    """(busy, steal) CPU-seconds of the whole machine so far, from /proc/stat."""
    try:
        with open("/proc/stat") as fh:
            f = [int(x) for x in fh.readline().split()[1:9]]
    except OSError:
        return 0.0, 0.0
    user, nice, system, _idle, _iowait, _irq, _softirq, steal = f
    # irq/softirq left out: mostly our own loopback traffic, not attributed to any process
    return (user + nice + system) / _HZ, steal / _HZ


def _pid_cpu(pid: int | None) -> float:
    if pid is None:
        return 0.0
    try:
        with open(f"/proc/{pid}/stat") as fh:
            f = fh.read().rsplit(")", 1)[1].split()
        return (int(f[11]) + int(f[12])) / _HZ
    except (OSError, IndexError, ValueError):
        return 0.0


def _find_broker_pid() -> int | None:
    """The process listening on the broker's AMQP port, if it runs on this
    machine (other RabbitMQ nodes may run here too, e.g. for failover tests)."""
    from urllib.parse import urlsplit

    port = urlsplit(benchlib.AMQP_URL).port or 5672
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as fh:
                next(fh)
                for line in fh:
                    f = line.split()
                    if f[3] == "0A" and int(f[1].rsplit(":", 1)[1], 16) == port:
                        inodes.add(f[9])
        except (OSError, StopIteration, IndexError, ValueError):
            continue
    if not inodes:
        return None
    wanted = {f"socket:[{i}]" for i in inodes}
    try:
        pids = [d for d in os.listdir("/proc") if d.isdigit()]
    except OSError:
        return None
    for d in pids:
        try:
            for fd in os.listdir(f"/proc/{d}/fd"):
                try:
                    if os.readlink(f"/proc/{d}/fd/{fd}") in wanted:
                        return int(d)
                except OSError:
                    continue
        except OSError:
            continue
    return None


def _threads_cpu(pid: int, tids: list[str]) -> float:
    """CPU-seconds of the given threads of `pid`, in nanoseconds' resolution (schedstat), where
    /proc/<pid>/stat counts in 10 ms ticks."""
    total = 0
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as fh:
                total += int(fh.read().split()[0])
        except (OSError, IndexError, ValueError):
            continue
    return total / 1e9


class BrokerTrace:
    """The broker's CPU time sampled every `interval` seconds on the perf_counter time line, so a
    contender's own timestamps can split it into phases."""

    def __init__(self, pid: int | None, interval: float = 0.01) -> None:
        self.pid = pid
        self.interval = interval
        self.samples: list[tuple[float, float]] = []
        self._tids: list[str] = []
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self.pid is None:
            return
        try:
            # The threads at the start, for every sample: a thread born later would otherwise
            # bring its whole CPU time into one interval.
            self._tids = os.listdir(f"/proc/{self.pid}/task")
        except OSError:
            return
        self._task = asyncio.get_running_loop().create_task(self._run(self.pid))

    async def _run(self, pid: int) -> None:
        while True:
            self.samples.append((time.perf_counter(), _threads_cpu(pid, self._tids)))
            await asyncio.sleep(self.interval)

    async def stop(self) -> None:
        if self._task is not None and self.pid is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self.samples.append((time.perf_counter(), _threads_cpu(self.pid, self._tids)))

    def at(self, t: float) -> float | None:
        """The broker's CPU time at `t`, interpolated between the samples around it."""
        s = self.samples
        if len(s) < 2 or not s[0][0] <= t <= s[-1][0]:
            return None
        i = bisect.bisect_left(s, (t, -1.0))
        if s[i][0] == t or i == 0:
            return s[i][1]
        (t0, c0), (t1, c1) = s[i - 1], s[i]
        return c0 + (c1 - c0) * (t - t0) / (t1 - t0)

    def between(self, a: float, b: float) -> float | None:
        ca, cb = self.at(a), self.at(b)
        return None if ca is None or cb is None else cb - ca


class Probe:
    """CPU accounting around one contender run: whatever the machine did that
    was not the broker, the contender or this runner is background noise (the
    other engineer's test suite, say) and is reported per run."""

    QUIET = 0.2  # cores busy; below this over 100 ms the machine counts as quiet
    MAX_WAIT = 1.0
    NOISY = 0.3  # cores of background CPU during a run that make it worth flagging

    def __init__(self) -> None:
        self.broker_pid = _find_broker_pid()
        self.unsettled = 0
        self._misses = 0
        self.runs: list[tuple[float, float]] = []  # (background cores, steal cores) per run

    async def settle(self) -> None:
        """Wait (bounded) for a quiet machine before a timed run.  After three
        misses in a row the machine is busy for good: only sample, don't wait."""
        wait = self.MAX_WAIT if self._misses < 3 else 0.0
        deadline = time.monotonic() + wait
        while True:
            b0, _ = _cpu_stat()
            await asyncio.sleep(0.1)
            b1, _ = _cpu_stat()
            if (b1 - b0) / 0.1 < self.QUIET:
                self._misses = 0
                return
            if time.monotonic() >= deadline:
                self.unsettled += 1
                self._misses += 1
                return

    def snapshot(self) -> tuple[float, float, float, float, float]:
        busy, steal = _cpu_stat()
        return time.perf_counter(), busy, steal, _pid_cpu(self.broker_pid), time.process_time()

    def account(self, s0: tuple[float, ...], contender_cpu: float) -> dict[str, float]:
        w1, busy1, steal1, broker1, me1 = self.snapshot()
        w0, busy0, steal0, broker0, me0 = s0
        wall = max(w1 - w0, 1e-9)
        other = (busy1 - busy0) - (broker1 - broker0) - (me1 - me0) - contender_cpu
        bg, st = max(0.0, other) / wall, (steal1 - steal0) / wall
        self.runs.append((bg, st))
        return {
            "bg_cores": bg,
            "steal_cores": st,
            "broker_cores": (broker1 - broker0) / wall,
            "broker_cpu_s": broker1 - broker0,  # over the contender's whole process, set-up included
        }

    def summary(self) -> str:
        if not self.runs:
            return "–"
        bg = sorted(r[0] for r in self.runs)
        st = sorted(r[1] for r in self.runs)
        noisy = sum(1 for b in bg if b > self.NOISY)
        return (
            f"CPU used by other processes during the {len(bg)} contender runs: median "
            f"{statistics.median(bg):.2f} cores, max {bg[-1]:.2f}; {noisy} run(s) above {self.NOISY} cores; "
            f"steal median {statistics.median(st):.2f}; {self.unsettled} run(s) started on a busy machine "
            f"(up to {self.MAX_WAIT} s wait for < {self.QUIET} cores busy)"
        )


CORES = os.cpu_count() or 1


@dataclass(frozen=True)
class Phase:
    """Per message, medians over the rounds: wall time, client CPU and broker CPU (µs)."""

    wall: float
    client: float
    broker: float

    @property
    def floor(self) -> float:
        # The client is one Python thread: one core at most. The broker's Erlang schedulers can
        # use every core, so it bounds the time only through the two sides' sum.
        return max(self.client, (self.client + self.broker) / CORES)


def _phase(ms: list[Measurement], n: int, part: int | None) -> Phase | None:
    """The whole run (`part=None`) or one side of its split at the first handled message (0, 1)."""
    walls, clients, brokers = [], [], []
    for m in ms:
        d = m.data
        split, first = d.get("broker_phase_s"), d.get("first_s")
        if not split or None in split or first is None or "first_cpu_us_per_msg" not in d:
            continue
        seconds = (d["seconds"], first, d["seconds"] - first)[0 if part is None else part + 1]
        walls.append(seconds / n * 1e6)
        first_cpu, cpu = d["first_cpu_us_per_msg"], d["cpu_us_per_msg"]
        clients.append((cpu, first_cpu, cpu - first_cpu)[0 if part is None else part + 1])
        brokers.append((sum(split) if part is None else split[part]) / n * 1e6)
    if not walls:
        return None
    return Phase(statistics.median(walls), statistics.median(clients), statistics.median(brokers))


# ---------------------------------------------------------------------------
# the runner


class Runner:
    def __init__(self, cfg: Config, contenders: list[Contender]) -> None:
        self.cfg = cfg
        self.contenders = contenders
        self.by_name = {c.name: c for c in contenders}
        self.run_id = secrets.token_hex(3)
        self.prefix = f"bench.{self.run_id}"
        self.app_name = f"bench-{self.run_id}"
        self.admin = benchlib.Admin()
        self.results: dict[str, tuple[Case, Results]] = {}
        self.failures: dict[tuple[str, str], str] = {}  # (case label, unit) -> error
        self.t_start = time.monotonic()
        self.probe = Probe()
        self.runner_errors: list[str] = []
        self._c_rate: float | None = None  # latency: the C client's steady consume rate
        self.behind: dict[str, str] = {}  # latency: contender -> the case where it fell behind

    # -- logging -----------------------------------------------------------
    def log(self, msg: str) -> None:
        el = time.monotonic() - self.t_start
        print(f"[{el:6.1f}s] {msg}", file=sys.stderr, flush=True)

    # -- subprocesses --------------------------------------------------------
    async def run_contender(
        self, c: Contender, case: Case, variant: str, queue: str, phase: str = "run"
    ) -> Measurement:
        cmd = [
            *c.command,
            case.scenario,
            "--phase",
            phase,
            "--n",
            str(case.n),
            "--queue",
            queue,
            "--queue-type",
            case.queue_type,
            "--prefetch",
            str(self.cfg.prefetch),
            "--window",
            str(self.cfg.window),
            "--app-name",
            self.app_name,
        ]
        if variant:
            cmd += ["--mode", variant]
        # hang guard only (never a judgement on speed): generous for a slow contender
        return await self.run_argv(cmd, 60.0 + case.n / 200.0)

    async def run_argv(self, cmd: list[str], watchdog: float) -> Measurement:
        """One process that prints its result as a JSON line; killed when it hangs (or when the
        caller is cancelled: never left running)."""
        with tempfile.TemporaryFile() as errf:
            # the broker's URL (and its password) by environment, never on a command line
            proc = await asyncio.create_subprocess_exec(
                *cmd,
                cwd=ROOT,
                stdout=asyncio.subprocess.PIPE,
                stderr=errf,
                env={**os.environ, "BENCH_AMQP_URL": benchlib.AMQP_URL},
            )
            try:
                out, _ = await asyncio.wait_for(proc.communicate(), watchdog)
            except TimeoutError:
                errf.seek(0)
                return Measurement(
                    False,
                    error=f"no result after {watchdog:.0f}s (killed); "
                    + tail(errf.read().decode(errors="replace")),
                )
            finally:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
            errf.seek(0)
            err = errf.read().decode(errors="replace")
        if proc.returncode != 0:
            return Measurement(False, error=tail(err))
        lines = [x for x in out.decode().splitlines() if x.strip()]
        try:
            data = json.loads(lines[-1])
        except (IndexError, json.JSONDecodeError):
            return Measurement(False, error="no JSON result on stdout; " + tail(err))
        return Measurement(True, data)

    # -- broker scenarios ------------------------------------------------------
    async def measure(self, sc: Scenario, case: Case, c: Contender, variant: str, rnd: int) -> Measurement:
        kind = variant or case.queue_type
        queue = f"{self.prefix}.{case.scenario}.{c.name}.{kind}.{rnd}.{secrets.token_hex(2)}"
        queues, exchanges = c.cleanup_names(queue, self.app_name)
        try:
            return await self._measure(sc, case, c, variant, queue, queues)
        except Exception as exc:  # the broker let the runner down (fill, check), not the contender
            return Measurement(False, error=f"runner: {exc!r}", runner_error=True)
        finally:
            try:
                await self.admin.delete_queues(queues)
                await self.admin.delete_exchanges(exchanges)
            except Exception as exc:  # left for the sweep at the end
                self.log(f"cleanup of {queue} failed: {exc!r}")

    async def _measure(
        self, sc: Scenario, case: Case, c: Contender, variant: str, queue: str, queues: list[str]
    ) -> Measurement:
        if sc.consumes and c.declares_own_queue:
            m = await self.run_contender(c, case, variant, queue, phase="declare")
            if not m.ok:
                return Measurement(False, error="declare phase: " + m.error)
            if await self.admin.depth(queue) is None:
                return Measurement(False, error=f"declare phase did not declare queue {queue}")
        else:
            await self.admin.declare(queue, case.queue_type)
        if sc.prefill:
            await self.admin.fill(queue, case.n, case.queue_type)
        await self.probe.settle()
        trace = BrokerTrace(self.probe.broker_pid) if sc.phases else None
        if trace:
            trace.start()
        try:
            s0 = self.probe.snapshot()
            m = await self.run_contender(c, case, variant, queue)
        finally:
            if trace:
                await trace.stop()  # never left sampling into the next measurement
        if m.ok:
            m.data.update(self.probe.account(s0, float(m.data.get("cpu_total_s", 0.0))))
            clock = m.data.get("clock") or {}
            if trace and clock.get("first") is not None:
                m.data["broker_phase_s"] = [
                    trace.between(clock["start"], clock["first"]),
                    trace.between(clock["first"], clock["end"]),
                ]
            problem = await self.verify(sc, case, queue, queues)
            if problem:
                return Measurement(False, m.data, error="check failed: " + problem)
        return m

    async def verify(self, sc: Scenario, case: Case, queue: str, aux_queues: list[str]) -> str:
        want = sc.expected_depth(case)
        # the contender has exited; wait (bounded) until the broker has dropped its consumers
        ready = consumers = 0
        for _ in range(500):
            got = await self.admin.depth(queue)
            if got is None:
                return f"queue {queue} is gone"
            ready, consumers = got
            if consumers == 0:
                break
            await asyncio.sleep(0.02)
        if consumers:
            return f"{consumers} consumer(s) still attached after the contender exited"
        if ready != want:
            return f"{ready} messages in the queue after the run, expected {want}"
        if want:  # published messages: persistent JSON, as the scenario demands
            props = await self.admin.peek(queue)
            if props is None or props[0] != 2 or not (props[1] or "").startswith(benchlib.CONTENT_TYPE):
                return f"published message has (delivery_mode, content_type) = {props}, expected (2, JSON)"
        if want == 0:
            for aux in aux_queues:
                if aux == queue:
                    continue
                d = await self.admin.depth(aux)
                if d is not None and d[0]:
                    return f"{d[0]} messages left in {aux}"
        return ""

    async def run_broker_case(self, sc: Scenario, case: Case) -> Results:
        units = [
            (c, v)
            for c in self.contenders
            if c.error is None and c.supports(case.scenario)
            for v in case.variants
        ]
        results: Results = {(c.name, v): [] for c, v in units}
        dead: set[tuple[str, str]] = set()
        for rnd in range(case.warmup + case.rounds):
            k = rnd % len(units) if units else 0
            order = units[k:] + units[:k]
            tag = "warm-up" if rnd < case.warmup else f"round {rnd - case.warmup + 1}/{case.rounds}"
            for c, v in order:
                key = (c.name, v)
                if key in dead:
                    continue
                m = await self.measure(sc, case, c, v, rnd)
                name = c.name + (f"[{v}]" if v else "")
                if m.runner_error:
                    self.runner_errors.append(f"{case.label} {tag} {name}: {m.error}")
                    self.log(f"{case.label} {tag} {name}: SKIPPED, {m.error}")
                    continue
                if not m.ok:
                    dead.add(key)
                    self.failures[(case.label, name)] = m.error
                    self.log(f"{case.label} {tag} {name}: FAILED: {m.error}")
                    continue
                val = m.data.get(sc.metric)
                bg = m.data.get("bg_cores", 0.0)
                note = f"   (background CPU {bg:.2f} cores)" if bg > Probe.QUIET else ""
                self.log(f"{case.label} {tag} {name}: {fmt_value(val, sc.unit)}{note}")
                if rnd >= case.warmup:
                    results[key].append(m)
        for key in dead:
            results[key] = []
        return results

    # -- import scenario -------------------------------------------------------
    async def run_import(self, case: Case) -> Results:
        units: list[tuple[str, str, str]] = [("(python -c pass)", sys.executable, "pass")]
        for c in self.contenders:
            mod = c.info.get("import_module")
            if c.error is None and mod:
                units.append((c.name, c.python, f"import {mod}"))
        results: Results = {(name, ""): [] for name, _, _ in units}
        dead: set[str] = set()
        for rnd in range(case.warmup + case.rounds):
            k = rnd % len(units)
            for name, py, code in units[k:] + units[:k]:
                if name in dead:
                    continue
                p, dt = _timed_run([py, "-c", code])
                if p.returncode != 0:
                    dead.add(name)
                    self.failures[(case.label, name)] = tail(p.stderr)
                    self.log(f"import {name}: FAILED: {tail(p.stderr)}")
                    results[(name, "")] = []
                    continue
                if rnd >= case.warmup:
                    results[(name, "")].append(Measurement(True, {"seconds": dt}))
        for name, _, code in units:
            vals = [m.data["seconds"] for m in results[(name, "")]]
            if vals:
                self.log(f"import {name} ({code}): median {statistics.median(vals) * 1000:.0f} ms")
        return results

    # -- latency scenario --------------------------------------------------------
    async def c_consume_rate(self) -> float | None:
        """The C client's steady consume rate on a classic queue: from this run's consume/classic
        case when it has one, else measured now (1 warm-up + 2 runs, N = 20,000)."""
        if self._c_rate is not None:
            return self._c_rate
        got = self.results.get("consume/classic")
        ms = got[1].get((CEILING, ""), []) if got else []
        if not ms:
            c = self.by_name.get(CEILING)
            if c is None:
                try:
                    binary = build_native(CEILING)
                except RuntimeError as exc:
                    self.log(f"latency: no C client: {exc}")
                    return None
                c = Contender(CEILING, binary, sys.executable, argv=[str(binary)])
            case = Case("consume", "latency calibration", 20_000, queue_type="classic")
            for rnd in range(3):
                m = await self.measure(SCENARIOS["consume"], case, c, "", rnd)
                if m.ok and rnd:
                    ms.append(m)
        rates = [m.data["steady_rate"] for m in ms if m.data.get("steady_rate")]
        if not rates:
            return None
        self._c_rate = statistics.median(rates)
        self.log(f"latency: the C client consumes {self._c_rate:,.0f} msg/s (steady, classic)")
        return self._c_rate

    async def measure_latency(self, case: Case, c: Contender, producer: Path, rnd: int) -> Measurement:
        queue = f"{self.prefix}.latency.{c.name}.{rnd}.{secrets.token_hex(2)}"
        queues, exchanges = c.cleanup_names(queue, self.app_name)
        try:
            return await self._measure_latency(case, c, producer, queue, queues)
        except Exception as exc:
            return Measurement(False, error=f"runner: {exc!r}", runner_error=True)
        finally:
            try:
                await self.admin.delete_queues(queues)
                await self.admin.delete_exchanges(exchanges)
            except Exception as exc:
                self.log(f"cleanup of {queue} failed: {exc!r}")

    async def _measure_latency(
        self, case: Case, c: Contender, producer: Path, queue: str, queues: list[str]
    ) -> Measurement:
        sc = SCENARIOS["latency"]
        if c.declares_own_queue:
            m = await self.run_contender(c, case, "", queue, phase="declare")
            if not m.ok:
                return Measurement(False, error="declare phase: " + m.error)
        else:
            await self.admin.declare(queue, case.queue_type)
        await self.probe.settle()
        s0 = self.probe.snapshot()
        consumer = asyncio.create_task(self.run_contender(c, case, "", queue))
        try:
            deadline = time.monotonic() + 60.0
            while True:  # the producer starts once the contender's consumer is attached
                if consumer.done():
                    m = consumer.result()
                    return Measurement(False, error="exited before consuming: " + (m.error or "?"))
                got = await self.admin.depth(queue)
                if got is not None and got[1] >= 1:
                    break
                if time.monotonic() > deadline:
                    return Measurement(False, error="no consumer attached after 60 s")
                await asyncio.sleep(0.01)
            cmd = [
                str(producer),
                "produce",
                "--queue",
                queue,
                "--n",
                str(case.n),
                "--rate",
                f"{case.offered:.3f}",
            ]
            p = await self.run_argv(cmd, 60.0 + case.n / 200.0)
            if not p.ok:
                return Measurement(False, error="producer: " + p.error, runner_error=True)
            m = await consumer
        finally:
            if not consumer.done():
                consumer.cancel()  # run_argv kills the process
                with contextlib.suppress(asyncio.CancelledError):
                    await consumer
        if not m.ok:
            return m
        cpu = float(m.data.get("cpu_total_s", 0.0)) + float(p.data.get("cpu_total_s", 0.0))
        m.data.update(self.probe.account(s0, cpu))
        m.data["offered_rate"] = case.offered
        m.data["producer"] = {
            k: p.data.get(k) for k in ("rate", "lag_mean_us", "lag_max_us", "cpu_us_per_msg")
        }
        problem = await self.verify(sc, case, queue, queues)
        if problem:
            return Measurement(False, m.data, error="check failed: " + problem)
        return m

    # -- driver ----------------------------------------------------------------
    async def run(self) -> None:
        await self.admin.open()
        try:
            for sc in SCENARIOS.values():
                if self.cfg.only and sc.name not in self.cfg.only:
                    continue
                for case in sc.cases(self.cfg):
                    t = time.monotonic()
                    self.log(f"== {case.label} (n={case.n}, rounds={case.rounds} + {case.warmup} warm-up)")
                    if sc.run is not None:
                        res = await sc.run(self, case)
                    else:
                        res = await self.run_broker_case(sc, case)
                    self.results[case.label] = (case, res)
                    self.log(f"== {case.label} done in {time.monotonic() - t:.1f}s")
        finally:
            await self.sweep()
            await self.admin.close()

    async def sweep(self) -> None:
        """Delete anything left on the broker with this run's prefix."""
        ctl = shutil.which("rabbitmqctl")
        if not ctl or self.admin.conn is None:
            return
        for kind, delete in (
            ("queues", self.admin.delete_queues),
            ("exchanges", self.admin.delete_exchanges),
        ):
            try:
                proc = await asyncio.create_subprocess_exec(
                    ctl,
                    f"list_{kind}",
                    "-q",
                    "--no-table-headers",
                    "name",
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.DEVNULL,
                )
                out, _ = await asyncio.wait_for(proc.communicate(), 30)
            except Exception:  # best effort: rabbitmqctl may not be allowed to talk to the node
                continue
            names = [
                n.strip()
                for n in out.decode(errors="replace").splitlines()
                if n.strip().startswith((self.prefix, self.app_name))
            ]
            if names:
                self.log(f"sweep: deleting leftover {kind}: {', '.join(names)}")
                await delete(names)

    # -- reporting ---------------------------------------------------------------
    def stats(self, ms: list[Measurement], metric: str) -> dict[str, float] | None:
        vals = [float(m.data[metric]) for m in ms if m.data.get(metric) is not None]
        if not vals:
            return None
        return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "count": len(vals)}

    def cost_ratio(self, sc: Scenario, med: float, base: float) -> float:
        """Contender cost / baseline cost (1.0 = same as baseline, >1 = more expensive)."""
        return base / med if sc.higher_is_better else med / base

    def ratios(self) -> dict[str, dict[str, float]]:
        """case label -> contender -> cost ratio vs baseline (for the chart)."""
        out: dict[str, dict[str, float]] = {}
        for label, (case, res) in self.results.items():
            sc = SCENARIOS[case.scenario]
            if case.scenario == "retry":
                # Failed-once messages against the same retry hand-rolled on the baseline client.
                b = self.stats(res.get((BASELINE, "fail_once"), []), "seconds")
                row = {}
                for (name, v), ms in res.items():
                    s = self.stats(ms, "seconds")
                    if b and s and v == "fail_once":
                        row[name] = s["median"] / b["median"]
                out[label] = row
                continue
            if sc.baseline is None:
                continue
            b = self.stats(res.get((BASELINE, ""), []), sc.metric)
            if not b:
                continue
            row = {}
            for (name, v), ms in res.items():
                s = self.stats(ms, sc.metric)
                if s and not v:
                    row[name] = self.cost_ratio(sc, s["median"], b["median"])
            out[label] = row
        return out

    def unit_status(self, label: str, name: str, scenario: str) -> str:
        if (label, name) in self.failures:
            return "failed"
        c = self.by_name.get(name)
        if c is not None and c.error:
            return "failed"
        return "n/a"

    def render_table(self, case: Case, res: Results) -> list[str]:
        sc = SCENARIOS[case.scenario]
        base = self.stats(res.get((BASELINE, ""), []), sc.metric) if sc.baseline else None
        unit = "ms" if sc.unit == "s" else sc.unit
        # optional columns, shown when the contenders report them
        extras = [
            ("steady_rate", "steady msg/s", lambda v: f"{v:,.0f}"),
            ("first_s", "1st msg", lambda v: f"{v * 1000:.0f} ms"),
            ("cpu_us_per_msg", "client CPU/msg", lambda v: f"{v:.0f} µs"),
        ]
        extras = [e for e in extras if any(m.data.get(e[0]) is not None for ms in res.values() for m in ms)]
        lines = [
            f"| contender | median {unit} | min – max | cost vs {BASELINE} |"
            + "".join(f" {h} |" for _, h, _ in extras),
            "|---|---:|---:|---:|" + "---:|" * len(extras),
        ]
        for name in self.row_names(case):
            ms = res.get((name, "")) or []
            s = self.stats(ms, sc.metric)
            if s is None:
                status = self.unit_status(case.label, name, case.scenario)
                lines.append(f"| {name} | {status} | | |" + " |" * len(extras))
                continue
            if name.startswith("("):
                ratio = "(reference)"
            else:
                ratio = f"{self.cost_ratio(sc, s['median'], base['median']):.2f}×" if base else "–"
            row = (
                f"| {name} | {fmt_value(s['median'], sc.unit)} | "
                f"{fmt_value(s['min'], sc.unit)} – {fmt_value(s['max'], sc.unit)} | {ratio} |"
            )
            for key, _, f in extras:
                vals = [m.data[key] for m in ms if m.data.get(key) is not None]
                row += f" {f(statistics.median(vals))} |" if vals else " |"
            lines.append(row)
        return lines

    def row_names(self, case: Case) -> list[str]:
        names = [c.name for c in self.contenders]
        if case.scenario == "import":
            names = ["(python -c pass)", *names]
        return names

    def render_retry(self, case: Case, res: Results) -> list[str]:
        lines = [
            "| contender | all succeed, msg/s (min – max) | fail once, msg/s (min – max) "
            "| cost of a failed-once message / a succeeding one | client CPU/msg, all succeed → fail once "
            "| broker CPU/msg, all succeed → fail once |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for c in self.contenders:
            ok = self.stats(res.get((c.name, "all_ok"), []), "seconds")
            bad = self.stats(res.get((c.name, "fail_once"), []), "seconds")
            if not (c.error is None and c.supports("retry")):
                st = "failed" if c.error else "n/a"
                lines.append(f"| {c.name} | {st} | {st} | {st} | | |")
                continue
            if not ok or not bad:
                err = self.failures.get((case.label, f"{c.name}[all_ok]")) or self.failures.get(
                    (case.label, f"{c.name}[fail_once]")
                )
                lines.append(f"| {c.name} | {'failed' if err else 'n/a'} | | | | |")
                continue
            n = case.n

            def r(s: dict[str, float], n: int = n) -> str:
                return f"{n / s['median']:,.0f} ({n / s['max']:,.0f} – {n / s['min']:,.0f})"

            cpu_ok = self.stats(res.get((c.name, "all_ok"), []), "cpu_us_per_msg")
            cpu_bad = self.stats(res.get((c.name, "fail_once"), []), "cpu_us_per_msg")
            cpu = ""
            if cpu_ok and cpu_bad:
                a, b = cpu_ok["median"], cpu_bad["median"]
                cpu = f"{a:.0f} µs → {b:.0f} µs ({b / a:.2f}×)"

            def broker_us(variant: str, c: Contender = c, n: int = n) -> float | None:
                ms = [m for m in res.get((c.name, variant), []) if "broker_cpu_s" in m.data]
                if not ms:
                    return None
                return statistics.median(m.data["broker_cpu_s"] / n * 1e6 for m in ms)

            b_ok, b_bad = broker_us("all_ok"), broker_us("fail_once")
            broker = f"{b_ok:.0f} µs → {b_bad:.0f} µs ({b_bad / b_ok:.2f}×)" if b_ok and b_bad else ""
            lines.append(
                f"| {c.name} | {r(ok)} | {r(bad)} | {bad['median'] / ok['median']:.2f}× | {cpu} | {broker} |"
            )
        return lines + self.render_retry_phases(case, res)

    def render_retry_phases(self, case: Case, res: Results) -> list[str]:
        """The failed-once run split where the first retried message completes: the queue is
        FIFO, so the failures of the pre-filled messages come first and their returns after. Per
        phase, each side's CPU, and the floor both cores would reach if nothing ever waited."""
        n = case.n
        rows: list[str] = []
        ratios: list[str] = []
        for c in self.contenders:
            ok, bad = res.get((c.name, "all_ok"), []), res.get((c.name, "fail_once"), [])
            phases = [
                ("all succeed", _phase(ok, n, None)),
                ("fail once: the failures (start → first retry back)", _phase(bad, n, 0)),
                ("fail once: the returns (first → last retry back)", _phase(bad, n, 1)),
            ]
            if not ok or not bad or any(p is None for _, p in phases):
                continue
            floors = []
            for what, p in phases:
                assert p is not None
                floors.append(p.floor)
                rows.append(
                    f"| {c.name} | {what} | {p.wall:.0f} µs | {p.client:.0f} µs | {p.broker:.0f} µs "
                    f"| {(p.client + p.broker) / p.wall:.2f} | {p.floor:.0f} µs |"
                )
            # measured as in the table above (median over median), not from the phases' medians
            ok_s, bad_s = self.stats(ok, "seconds"), self.stats(bad, "seconds")
            measured = f"{bad_s['median'] / ok_s['median']:.2f}×" if ok_s and bad_s else "n/a"
            fail_floor = floors[1] + floors[2]
            ratios.append(
                f"- `{c.name}`: measured {measured}; at the floor "
                f"{fail_floor:.0f} µs / {floors[0]:.0f} µs = **{fail_floor / floors[0]:.2f}×**"
            )
        if not rows:
            return []
        return [
            "",
            "Where a failed-once run spends its time (medians, per message). The failed-once run is split "
            "where the first retried message completes: the queue is FIFO, so the N failures come first "
            "and the N returns after them. Broker CPU is traced every 10 ms on the contender's own "
            f'clock. "cores busy" = (client + broker CPU) / wall time, out of the {CORES} cores they share. '
            f'"floor" = max(client, (client + broker) / {CORES}): the wall time if the two overlapped '
            f"perfectly on the {CORES} cores and never waited (the client, one Python thread, on one core "
            "at most; the broker on whatever is left); its ratio is the least a failed-once message can "
            "cost, with that much CPU, on this machine.",
            "",
            f"| contender | run / phase | wall | client CPU | broker CPU | cores busy | {CORES}-core floor |",
            "|---|---|---:|---:|---:|---:|---:|",
            *rows,
            "",
            f"Cost of a failed-once message / a succeeding one, measured and at the {CORES}-core floor:",
            "",
            *ratios,
        ]

    def render_rss(self, case: Case, res: Results) -> list[str]:
        lines = [
            "| contender | peak RSS (VmHWM) | RSS after 10% | RSS at end | growth 10%→end "
            f"| peak vs {BASELINE} | msg/s |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        base = self.stats(res.get((BASELINE, ""), []), "hwm_kb")
        for c in self.contenders:
            ms = res.get((c.name, ""))
            if not ms:
                st = self.unit_status(case.label, c.name, "rss")
                lines.append(f"| {c.name} | {st} | | | | | |")
                continue

            def med(key: str, ms: list[Measurement] = ms) -> float:
                return statistics.median(float(m.data[key]) for m in ms)

            hwm = med("hwm_kb")
            ratio = f"{hwm / base['median']:.2f}×" if base else "–"
            lines.append(
                f"| {c.name} | {mib(hwm)} | {mib(med('rss_warm_kb'))} | {mib(med('rss_end_kb'))} | "
                f"{med('growth_kb') / 1024:+.1f} MiB | {ratio} | {med('rate'):,.0f} |"
            )
        return lines

    def render_latency(self, case: Case, res: Results) -> list[str]:
        offered = case.offered or 0.0
        lines = [
            f"Offered: {offered:,.0f} msg/s"
            + (f" ({case.load:.0%} of the C client's steady consume rate)" if case.load else "")
            + f" for {self.cfg.latency_seconds:g} s.",
            "",
            "| contender | p50 | p99 | p99.9 | max | handled msg/s | kept up | client CPU/msg "
            "| producer lag (mean / max) |",
            "|---|---:|---:|---:|---:|---:|:---:|---:|---:|",
        ]
        for c in self.contenders:
            ms = res.get((c.name, ""))
            if not ms:
                if c.error is None and not c.supports("latency"):
                    continue
                if (c.name, "") not in res and c.name in self.behind:
                    lines.append(
                        f"| {c.name} | not run: fell behind at {self.behind[c.name]} | | | | | | | |"
                    )
                    continue
                lines.append(
                    f"| {c.name} | {self.unit_status(case.label, c.name, 'latency')} | | | | | | | |"
                )
                continue

            def med(key: str, ms: list[Measurement] = ms) -> float | None:
                vals = [float(m.data[key]) for m in ms if m.data.get(key) is not None]
                return statistics.median(vals) if vals else None

            def prod(key: str, ms: list[Measurement] = ms) -> float:
                return statistics.median(float(m.data["producer"].get(key) or 0.0) for m in ms)

            handled = med("steady_rate") or 0.0
            kept = "yes" if handled >= KEPT_UP * offered else "**no**"
            cpu = med("cpu_us_per_msg")
            pcts = " | ".join(fmt_us(med(k)) for k in ("p50_us", "p99_us", "p999_us", "max_us"))
            lines.append(
                f"| {c.name} | {pcts} | {handled:,.0f} | {kept} | {'' if cpu is None else f'{cpu:.0f} µs'} | "
                f"{fmt_us(prod('lag_mean_us'))} / {fmt_us(prod('lag_max_us'))} |"
            )
        return lines

    def markdown(self, machine: dict[str, str], command: str, chart: str | None) -> str:
        cfg = self.cfg
        out = ["# Benchmarks", ""]
        out.append(
            "Generated by `benchmarks/run.py`; regenerate with the command below. Absolute numbers depend on "
            "this machine (2 cores shared by the broker, the runner and the client); compare the ratios."
        )
        out += ["", "## Setup", "", "| | |", "|---|---|"]
        for k, v in machine.items():
            out.append(f"| {k} | {v} |")
        out.append(f"| command | `{command}` |")
        out.append(f"| interference | {self.probe.summary()} |")
        out.append(
            f"| settings | {'quick' if cfg.quick else 'full'} mode; N = {cfg.n:,} (consume), "
            f"{cfg.mixed_n:,} (mixed), "
            f"{cfg.publish_n:,} (publish), {cfg.retry_n:,} (retry), {cfg.rss_n:,} (rss) messages; "
            f"{cfg.rounds} measured rounds + {cfg.warmup} warm-up "
            f"(rss: {cfg.rss_rounds} run, import: {cfg.import_rounds} rounds); prefetch {cfg.prefetch}; "
            f"publish window {cfg.window} |"
        )
        out += ["", "## Results", ""]
        out.append(
            f'"cost vs {BASELINE}" is the contender\'s time per message (or seconds, or KiB) divided by the '
            f"baseline's: 1.00× = as cheap as a hand-written aiormq loop, 2.00× = twice the cost. "
            f"`{CEILING}` is the same workload in C on librabbitmq (one basic.ack per message, "
            "single-threaded): the ceiling, what one client gets out of this broker on this machine, not a "
            "peer. `aiormq_batched` acks every 64th message with `multiple=True`, which no ack-after-handler "
            "framework does: it is the Python client ceiling, not a peer. "
            'Other columns (medians): "steady msg/s" = (N-1) / '
            "time from the first to the N-th handled message, i.e. without connection and topology set-up; "
            '"1st msg" = time from starting the consumer (connection included) to the first handled '
            'message; "client CPU/msg" = the contender process\'s CPU time (user+sys) over the timed section '
            "divided by N, which depends less on the broker and on the noise of a shared 2-core machine than "
            "wall time does."
        )
        if chart:
            out += ["", f"![cost ratio vs {BASELINE}]({chart})"]
        for label, (case, res) in self.results.items():
            sc = SCENARIOS[case.scenario]
            size = f", N = {case.n:,}" if case.n else ""
            out += ["", f"### {sc.title}: {label}{size}", "", sc.description, ""]
            if sc.render is not None:
                out += sc.render(self, case, res)
            else:
                out += self.render_table(case, res)
            noisy = []
            for (name, v), ms in res.items():
                k = sum(1 for m in ms if m.data.get("bg_cores", 0.0) > Probe.NOISY)
                if k:
                    noisy.append(f"{name}{f'[{v}]' if v else ''} {k}/{len(ms)}")
            if noisy:
                out += [
                    "",
                    f"⚠ other processes used more than {Probe.NOISY} cores during some measured runs "
                    f"({', '.join(noisy)}); treat those numbers with care.",
                ]
        notes = [(c.name, c.info.get("notes", "")) for c in self.contenders if c.info.get("notes")]
        if notes:
            out += ["", "## Contenders", ""]
            for name, note in notes:
                out.append(f"- `{name}`: {note}")
        problems = [(k, v) for k, v in self.failures.items()]
        problems += [(("(all)", c.name), c.error) for c in self.contenders if c.error]
        if problems or self.runner_errors:
            out += ["", "## Failures", ""]
            for (label, name), err in problems:
                out.append(f"- {label} / {name}: failed: {err[-600:]}")
            for err in self.runner_errors:
                out.append(f"- runner set-up failed, sample skipped: {err[-600:]}")
        out += ["", "## Method", ""]
        out += [
            "- One fresh subprocess per measurement (`benchmarks/contenders/<name>.py <scenario> ...`, one "
            "JSON line on stdout). Contenders interleaved round by round; the order inside a round is "
            "rotated every round; the warm-up round is discarded; median, min and max of the measured "
            "rounds are reported.",
            "- Each measurement has its own durable queue (random suffix) that the runner declares (or, for "
            "rabbitflow, which declares its own topology, lets a short-lived `async with app:` declare), "
            "pre-fills with plain aiormq before the contender starts, checks after it exits (consume: 0 "
            "messages left and no consumer, i.e. every message was acked; publish: exactly N arrived, "
            "persistent, content type application/json), and "
            "deletes. Leftovers with the run's prefix are swept at the end.",
            "- The same prefetch (256) for every contender; handlers do no work (mixed: 1 in "
            f"{benchlib.SLOW_EVERY} awaits asyncio.sleep({benchlib.SLOW_SECONDS})); bodies are decoded with "
            "orjson (FastStream uses orjson when installed). The default asyncio event loop (no uvloop) "
            "for every contender.",
            "- No assertion is made on any timing; a watchdog only kills a contender that hangs.",
        ]
        return "\n".join(out) + "\n"

    def chart(self, path: Path) -> bool:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except Exception:
            return False
        ratios = self.ratios()
        labels = [lbl for lbl, row in ratios.items() if row]
        if not labels:
            return False
        names = [c.name for c in self.contenders if any(c.name in ratios[lbl] for lbl in labels)]
        fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(labels) + 2), 4.2), dpi=110)
        width = 0.8 / max(1, len(names))
        for i, name in enumerate(names):
            xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(labels))]
            ys = [ratios[lbl].get(name, 0.0) for lbl in labels]
            if name == CEILING:  # the ceiling: grey and hatched, so it does not read as a peer
                bars = ax.bar(
                    xs, ys, width, label=f"{name} (C, ceiling)", color="0.75", hatch="//", edgecolor="0.35"
                )
            else:
                bars = ax.bar(xs, ys, width, label=name)
            for b, y in zip(bars, ys, strict=False):
                if y:
                    ax.annotate(
                        f"{y:.2f}", (b.get_x() + b.get_width() / 2, y), ha="center", va="bottom", fontsize=7
                    )
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(labels)))
        ticks = {
            "import": "import\n(time)",
            "rss/classic": "rss\n(peak RSS)",
            "retry/classic": "retry, fail once\nclassic",
            "retry/quorum": "retry, fail once\nquorum",
            "mixed/classic": "mixed latency\nclassic",
            "mixed/quorum": "mixed latency\nquorum",
        }
        ax.set_xticklabels([ticks.get(lbl, lbl.replace("/", "\n")) for lbl in labels])
        top = max((v for row in ratios.values() for v in row.values()), default=1.0)
        ax.set_ylim(0, top * 1.12)
        ax.set_ylabel(f"cost vs {BASELINE} (lower is better)")
        ax.set_title(f"Cost vs {BASELINE} (medians; 1.0 = baseline)", fontsize=10)
        ax.legend(
            fontsize=8,
            ncol=min(5, len(names)),
            loc="upper center",
            bbox_to_anchor=(0.5, -0.16),
            frameon=False,
        )
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)
        return True


# ---------------------------------------------------------------------------
# formatting / machine info


def _timed_run(cmd: list[str]) -> tuple[subprocess.CompletedProcess[str], float]:
    """Run a short process to completion; its wall time (blocking on purpose: nothing else runs)."""
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    return p, time.perf_counter() - t0


def fmt_value(v: float | None, unit: str) -> str:
    if v is None:
        return "–"
    if unit == "msg/s":
        return f"{v:,.0f}"
    if unit == "s":
        return f"{v * 1000:,.0f} ms"
    if unit == "KiB":
        return mib(v)
    return f"{v:g}"


def mib(kb: float) -> str:
    return f"{kb / 1024:.1f} MiB"


_VERSIONS_SNIPPET = r"""
import json, platform, sys
from importlib.metadata import version, PackageNotFoundError
out = {"python": platform.python_version() + " (" + sys.executable + ")"}
for p in ("aiormq", "aio-pika", "pamqp", "orjson", "faststream", "fast-depends", "pydantic", "rabbitflow"):
    try:
        out[p] = version(p)
    except PackageNotFoundError:
        pass
print(json.dumps(out))
"""


def machine_info(contenders: list[Contender], broker_version: str) -> dict[str, str]:
    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "date (UTC)": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M"),
        "CPU": f"{cpu}, {os.cpu_count()} cores",
        "OS": f"{platform.system()} {platform.release()}",
        "RabbitMQ": f"{broker_version} on {benchlib.AMQP_URL.split('@')[-1]} (same machine)",
    }
    seen: dict[str, dict[str, str]] = {}
    for py in dict.fromkeys([sys.executable] + [c.python for c in contenders]):
        try:
            p = subprocess.run(
                [py, "-c", _VERSIONS_SNIPPET], capture_output=True, text=True, cwd=ROOT, timeout=60
            )
            seen[py] = json.loads(p.stdout)
        except Exception:
            seen[py] = {"python": f"? ({py})"}
    for py, vers in seen.items():
        label = "python / packages" + ("" if py == sys.executable else " (FastStream venv)")
        pk = ", ".join(f"{k} {v}" for k, v in vers.items() if k != "python")
        info[label] = f"{vers.get('python', '?')}; {pk}"
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], capture_output=True, text=True, cwd=ROOT
        ).stdout
        info["git"] = (rev or "no commit yet") + (" + uncommitted changes" if dirty.strip() else "")
    except OSError:
        pass
    return info


# ---------------------------------------------------------------------------
# main


def parse_args(argv: list[str] | None = None) -> Config:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="small N and few rounds (~2 minutes)")
    p.add_argument("--rounds", type=int, help="measured rounds per case (a warm-up round comes on top)")
    p.add_argument("--warmup", type=int, default=1, help="warm-up rounds, discarded (default 1)")
    p.add_argument("--n", type=int, help="messages per consume/mixed/publish/retry measurement (all four)")
    p.add_argument("--rss-n", type=int, help="messages for the rss scenario")
    p.add_argument("--import-rounds", type=int, help="rounds for the import scenario")
    p.add_argument("--only", help=f"comma-separated scenarios: {','.join(SCENARIOS)}")
    p.add_argument("--contenders", help=f"comma-separated contenders: {','.join(CONTENDER_ORDER)}")
    p.add_argument(
        "--queue-types",
        help="for consume, mixed, publish and retry (default classic,quorum; --quick: publish and retry "
        "classic only)",
    )
    p.add_argument(
        "--latency-loads",
        help="latency: offered loads as shares of the C client's consume rate (default 0.25,0.5,0.8)",
    )
    p.add_argument("--latency-rates", help="latency: fixed offered rates in msg/s instead (e.g. 2000,5000)")
    p.add_argument("--latency-seconds", type=float, help="latency: producing time per measurement")
    p.add_argument("--out", type=Path, help="write the markdown report here (and a PNG chart next to it)")
    a = p.parse_args(argv)
    d = QUICK if a.quick else FULL
    only = [s.strip() for s in a.only.split(",")] if a.only else None
    if only:
        bad = [s for s in only if s not in SCENARIOS]
        if bad:
            p.error(f"unknown scenario(s) {bad}; known: {list(SCENARIOS)}")
    contenders = [s.strip() for s in a.contenders.split(",")] if a.contenders else None
    if contenders:
        bad = [s for s in contenders if s not in CONTENDER_ORDER + VARIANTS]
        if bad:
            p.error(f"unknown contender(s) {bad}; known: {CONTENDER_ORDER + VARIANTS}")
    qts = tuple(s.strip() for s in a.queue_types.split(",") if s.strip()) if a.queue_types else None
    if qts and any(q not in ("classic", "quorum") for q in qts):
        p.error("--queue-types: classic and/or quorum")
    return Config(
        quick=a.quick,
        rounds=a.rounds or d["rounds"],
        warmup=a.warmup,
        n=a.n or d["n"],
        mixed_n=a.n or d["mixed_n"],
        publish_n=a.n or d["publish_n"],
        retry_n=a.n or d["retry_n"],
        rss_n=a.rss_n or d["rss_n"],
        rss_rounds=d["rss_rounds"],
        import_rounds=a.import_rounds or d["import_rounds"],
        only=only,
        contenders=contenders,
        out=a.out,
        queue_types=qts or ("classic", "quorum"),
        publish_queue_types=qts or d["publish_queue_types"],
        retry_queue_types=qts or d["retry_queue_types"],
        latency_loads=_floats(a.latency_loads) or (0.25, 0.5, 0.8),
        latency_rates=_floats(a.latency_rates),
        latency_seconds=a.latency_seconds or d["latency_seconds"],
        latency_rounds=a.rounds or d["latency_rounds"],
    )


def _floats(text: str | None) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(",") if x.strip()) if text else ()


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    names = cfg.contenders or CONTENDER_ORDER
    if BASELINE not in names:
        names = [BASELINE, *names]  # ratios need the baseline
    contenders = load_contenders(names)
    for c in contenders:
        if c.error:
            print(f"contender {c.name}: failed: {c.error}", file=sys.stderr)
    runner = Runner(cfg, contenders)
    asyncio.run(runner.run())

    command = " ".join(
        shlex.quote(x) for x in [os.path.relpath(sys.executable, ROOT), "benchmarks/run.py", *sys.argv[1:]]
    )
    machine = machine_info(contenders, runner.admin.server_version)
    chart_name = None
    if cfg.out is not None:
        cfg.out.parent.mkdir(parents=True, exist_ok=True)
        png = cfg.out.with_suffix(".png")
        if runner.chart(png):
            chart_name = png.name
    md = runner.markdown(machine, command, chart_name)
    print(md)
    if cfg.out is not None:
        cfg.out.write_text(md)
        print(
            f"wrote {cfg.out}" + (f" and {cfg.out.with_suffix('.png')}" if chart_name else ""),
            file=sys.stderr,
        )
    runner.log("total")
    return 0


if __name__ == "__main__":
    sys.exit(main())
