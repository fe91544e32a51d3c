"""Shared helpers for the benchmark runner and the contender scripts.

Nothing in here is timed by itself.  The contenders import only the small
pieces they need (message factory, RSS sampler, CLI wrapper); the runner uses
``Admin`` to declare, pre-fill, verify and delete queues with plain aiormq, so
that every contender starts from a queue prepared by the same code.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import resource
import sys
import time
import traceback
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

AMQP_URL = os.environ.get("BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
PREFETCH = 256  # the same prefetch (and handler concurrency) for every contender
WINDOW = 256  # publishes in flight, awaited together, per window
CONTENT_TYPE = "application/json"

# ---------------------------------------------------------------------------
# payload


_PAD = "x" * 152


def make_message(i: int) -> dict[str, Any]:
    """A JSON document that serialises to ~256 bytes with orjson."""
    return {
        "id": i,
        "kind": "bench.event",
        "ts": 1_700_000_000.0 + i / 1000.0,
        "tags": ["alpha", "beta", "gamma"],
        "ok": True,
        "pad": _PAD,
    }


def make_messages(n: int) -> list[dict[str, Any]]:
    return [make_message(i) for i in range(n)]


# mixed: 1 handler in SLOW_EVERY (message id % SLOW_EVERY == 0, ids 0..N-1 as filled by the
# runner) awaits SLOW_SECONDS; the rest do nothing.
SLOW_EVERY = 500
SLOW_SECONDS = 0.1


async def mixed_handler(body: dict[str, Any]) -> None:
    """The mixed scenario's user handler, the same function for every contender."""
    if body["id"] % SLOW_EVERY == 0:
        await asyncio.sleep(SLOW_SECONDS)


# latency: the paced C producer (contenders/c) stamps "sent_ns", CLOCK_REALTIME in ns, into each
# body; the handler's first act is to take time.time_ns() (also CLOCK_REALTIME) minus that stamp.
LATENCY_SKIP = 0.1  # the first 10% (connection, first prefetch window) are left out


def percentile(sorted_xs: list[int], p: float) -> int:
    """Nearest-rank percentile of an ascending list (the C contender uses the same rule)."""
    k = min(len(sorted_xs), max(1, math.ceil(p * len(sorted_xs) - 1e-9)))
    return sorted_xs[k - 1]


class Latencies:
    """Publish -> handler start, per message, in ns; ``handler`` is the latency scenario's handler."""

    def __init__(self, n: int) -> None:
        self.xs: list[int] = []
        self.n = n

    async def handler(self, body: dict[str, Any]) -> None:
        self.xs.append(time.time_ns() - body["sent_ns"])

    def summary(self) -> dict[str, Any]:
        xs = sorted(self.xs[int(len(self.xs) * LATENCY_SKIP) :])
        if not xs:
            return {"lat_n": 0}
        return {
            "lat_n": len(xs),
            "p50_us": percentile(xs, 0.5) / 1e3,
            "p99_us": percentile(xs, 0.99) / 1e3,
            "p999_us": percentile(xs, 0.999) / 1e3,
            "max_us": xs[-1] / 1e3,
        }


def queue_arguments(queue_type: str) -> dict[str, Any]:
    if queue_type not in ("classic", "quorum"):
        raise ValueError(f"unknown queue type {queue_type!r}")
    return {"x-queue-type": queue_type}


# ---------------------------------------------------------------------------
# memory


def read_rss_kb() -> tuple[int, int]:
    """(VmRSS, VmHWM) of this process in KiB, from /proc/self/status."""
    rss = hwm = 0
    with open("/proc/self/status", "rb") as fh:
        for line in fh:
            if line.startswith(b"VmRSS:"):
                rss = int(line.split()[1])
            elif line.startswith(b"VmHWM:"):
                hwm = int(line.split()[1])
    return rss, hwm


class RssSampler:
    """Samples VmRSS every ``interval`` seconds in a background task.

    The same sampler is used by every contender, so its (tiny) cost is equal
    for all of them.  ``mark_warm()`` is called by the contender once 10% of
    the messages were handled; growth is measured from there to the end, so
    one-off allocations at start-up (imports, connection buffers, first
    prefetch window) are not counted as growth.
    """

    def __init__(self, interval: float = 0.05) -> None:
        self.interval = interval
        self.samples: list[tuple[float, int]] = []
        self.start_kb = read_rss_kb()[0]
        self.warm_kb: int | None = None
        self._t0 = time.perf_counter()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            self.samples.append((time.perf_counter() - self._t0, read_rss_kb()[0]))
            await asyncio.sleep(self.interval)

    def mark_warm(self) -> None:
        if self.warm_kb is None:
            self.warm_kb = read_rss_kb()[0]

    async def stop(self) -> dict[str, Any]:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        end_kb, hwm_kb = read_rss_kb()
        warm = self.warm_kb if self.warm_kb is not None else self.start_kb
        peak_sampled = max([kb for _, kb in self.samples] + [end_kb])
        # keep ~20 evenly spaced samples for the report, not all of them
        step = max(1, len(self.samples) // 20)
        return {
            "rss_start_kb": self.start_kb,
            "rss_warm_kb": warm,
            "rss_end_kb": end_kb,
            "rss_peak_sampled_kb": peak_sampled,
            "hwm_kb": hwm_kb,
            "growth_kb": end_kb - warm,
            "rss_samples": [(round(t, 2), kb) for t, kb in self.samples[::step]],
        }


_cpu0 = 0.0
_cpu1: float | None = None


def start_clock() -> float:
    """Start of the timed section: returns perf_counter(), remembers CPU time."""
    global _cpu0
    _cpu0 = time.process_time()
    return time.perf_counter()


def stop_clock() -> float:
    """End of a timed section that has no Counter (publish): returns perf_counter(), remembers
    CPU time, so that closing the connection afterwards is not counted as publishing."""
    global _cpu1
    _cpu1 = time.process_time()
    return time.perf_counter()


class Counter:
    """Counts handled messages and resolves ``done`` at the N-th one."""

    __slots__ = ("count", "cpu_done", "cpu_first", "done", "first_at", "n", "on_warm", "warm_at")

    def __init__(self, n: int, on_warm: Callable[[], None] | None = None) -> None:
        self.n = n
        self.count = 0
        self.done: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self.first_at: float | None = None
        self.warm_at = max(1, n // 10)
        self.on_warm = on_warm
        self.cpu_done: float | None = None
        self.cpu_first: float | None = None

    def hit(self) -> None:
        self.count += 1
        c = self.count
        if c == 1:
            self.first_at = time.perf_counter()
            self.cpu_first = time.process_time()
        if c == self.warm_at and self.on_warm is not None:
            self.on_warm()
        if c == self.n and not self.done.done():
            self.cpu_done = time.process_time()
            self.done.set_result(time.perf_counter())


# ---------------------------------------------------------------------------
# contender CLI


ScenarioFn = Callable[[argparse.Namespace], Awaitable[dict[str, Any]]]


def contender_main(
    name: str,
    scenarios: dict[str, ScenarioFn],
    *,
    import_module: str | None,
    declares_own_queue: bool = False,
    declare: ScenarioFn | None = None,
    notes: str = "",
    extra: dict[str, Any] | None = None,
) -> None:
    """Command line shared by every contender script.

    ``<script> --describe`` prints what the contender supports (without
    importing the library under test).  ``<script> <scenario> --n N --queue Q
    --queue-type T`` runs one measurement and prints exactly one JSON line on
    stdout.  Anything else goes to stderr.  Exit code 0 = measured, 1 = failed.
    """
    p = argparse.ArgumentParser(prog=name)
    p.add_argument("scenario", nargs="?")
    p.add_argument("--describe", action="store_true")
    p.add_argument("--phase", choices=("run", "declare"), default="run")
    p.add_argument("--n", type=int, default=10_000)
    p.add_argument("--queue", default=None)
    p.add_argument("--queue-type", choices=("classic", "quorum"), default="classic")
    p.add_argument("--prefetch", type=int, default=PREFETCH)
    p.add_argument("--window", type=int, default=WINDOW)
    p.add_argument("--mode", default="", help="scenario variant, e.g. fail_once|all_ok")
    p.add_argument("--app-name", default="bench")
    p.add_argument("--url", default=AMQP_URL)
    args = p.parse_args()

    if args.describe:
        print(
            json.dumps(
                {
                    "name": name,
                    "scenarios": sorted(scenarios),
                    "import_module": import_module,
                    "declares_own_queue": declares_own_queue,
                    "notes": notes,
                    **(extra or {}),
                }
            )
        )
        return
    if args.scenario is None:
        p.error("scenario required")
    if args.phase == "declare":
        fn = declare
        if fn is None:
            p.error(f"{name} has no declare phase")
    else:
        fn = scenarios.get(args.scenario)
        if fn is None:
            print(f"{name}: scenario {args.scenario!r} not supported", file=sys.stderr)
            sys.exit(2)
    if args.queue is None:
        p.error("--queue required")

    try:
        result = asyncio.run(fn(args))
    except SystemExit as exc:  # a contender's own clear error message
        if exc.code not in (None, 0):
            print(exc.code if isinstance(exc.code, str) else f"exit {exc.code}", file=sys.stderr)
        sys.exit(1)
    except BaseException:
        traceback.print_exc()
        sys.exit(1)
    result.setdefault("contender", name)
    result.setdefault("scenario", args.scenario)
    result.setdefault("n", args.n)
    result.setdefault("queue_type", args.queue_type)
    result.setdefault("pid", os.getpid())
    ru = resource.getrusage(resource.RUSAGE_SELF)
    result["cpu_total_s"] = ru.ru_utime + ru.ru_stime  # whole process, for the runner's interference check
    print(json.dumps(result), flush=True)


def timing_result(n: int, t0: float, t_end: float, counter: Counter | None = None) -> dict[str, Any]:
    """Result fields of a timed section that began with ``t0 = start_clock()``.

    seconds/rate: wall time start -> N-th message; first_s: start -> first
    message; steady_rate: (N-1) / (first -> N-th); cpu_us_per_msg: this
    process's CPU time (user+sys) over the timed section, per message.
    """
    if counter is not None and counter.cpu_done:
        cpu_end = counter.cpu_done
    else:
        cpu_end = _cpu1 if _cpu1 is not None else time.process_time()
    seconds = t_end - t0
    out: dict[str, Any] = {
        "seconds": seconds,
        "rate": n / seconds if seconds > 0 else None,
        "cpu_us_per_msg": (cpu_end - _cpu0) / n * 1e6 if n else None,
    }
    if counter is not None and counter.first_at is not None:
        out["first_s"] = counter.first_at - t0
        if n > 1 and t_end > counter.first_at:
            out["steady_rate"] = (n - 1) / (t_end - counter.first_at)
        if counter.cpu_first is not None and n:
            # Split at the first handled message: in a failed-once run that is the first retry
            # back, so before it lie the failures and after it the returns (the queue is FIFO).
            out["first_cpu_us_per_msg"] = (counter.cpu_first - _cpu0) / n * 1e6
        # perf_counter is CLOCK_MONOTONIC, shared by every process on Linux: the runner places its
        # own samples of the broker's CPU on this time line.
        out["clock"] = {"start": t0, "first": counter.first_at, "end": t_end}
    return out


# ---------------------------------------------------------------------------
# runner-side broker administration (plain aiormq, never timed)


class Admin:
    """Declares, fills, inspects and deletes benchmark queues."""

    def __init__(self, url: str = AMQP_URL) -> None:
        self.url = url
        self.conn: Any = None
        self.server_version = "?"

    async def open(self) -> None:
        import aiormq

        self.conn = await aiormq.connect(self.url)
        props = getattr(self.conn, "server_properties", None) or {}
        v = props.get("version", "?")
        self.server_version = v.decode() if isinstance(v, bytes) else str(v)

    async def close(self) -> None:
        if self.conn is not None and not self.conn.is_closed:
            await self.conn.close()
        self.conn = None

    async def _ensure(self) -> None:
        """Reconnect if the broker closed the admin connection (a shared broker may be restarted)."""
        if self.conn is None or self.conn.is_closed:
            await self.open()

    async def declare(self, queue: str, queue_type: str) -> None:
        await self._ensure()
        ch = await self.conn.channel()
        try:
            await ch.queue_declare(queue, durable=True, arguments=queue_arguments(queue_type))
        finally:
            await ch.close()

    async def fill(self, queue: str, n: int, queue_type: str, stall_timeout: float = 20.0) -> None:
        """Put n persistent JSON messages into an (empty) queue; return when it holds exactly n.

        Quorum queues get confirmed publishes (window 1024): without confirms a
        quorum queue may drop enqueues under load (seen here: 9,824 of 10,000
        while a test suite hammered the broker).  Classic queues get
        unconfirmed publishes (3-7x faster than confirms on a classic queue on
        this 2-core box), and then we wait until the queue reports n ready
        messages.  ``stall_timeout`` only guards against a hang: the longest
        time the depth may stay unchanged.
        """
        await self._ensure()
        import aiormq
        import orjson

        props = aiormq.spec.Basic.Properties(content_type=CONTENT_TYPE, delivery_mode=2)
        dumps = orjson.dumps
        confirms = queue_type != "classic"
        ch = await self.conn.channel(publisher_confirms=confirms)
        try:
            if confirms:
                window = 1024
                for start in range(0, n, window):
                    await asyncio.gather(
                        *(
                            ch.basic_publish(dumps(make_message(i)), routing_key=queue, properties=props)
                            for i in range(start, min(n, start + window))
                        )
                    )
            else:
                for i in range(n):
                    await ch.basic_publish(dumps(make_message(i)), routing_key=queue, properties=props)
            last, last_change = -1, time.monotonic()
            while True:  # the channel stays open until the queue holds every message
                got = await self.depth(queue)
                depth = got[0] if got else -1
                if depth == n:
                    return
                if depth > n:
                    raise RuntimeError(f"fill: queue {queue} has {depth} > {n} messages")
                if depth != last:
                    last, last_change = depth, time.monotonic()
                elif time.monotonic() - last_change > stall_timeout:
                    raise RuntimeError(f"fill: queue {queue} stuck at {depth}/{n} messages")
                await asyncio.sleep(0.01)
        finally:
            if not ch.is_closed:
                await ch.close()

    async def depth(self, queue: str) -> tuple[int, int] | None:
        """(ready messages, consumers) or None if the queue does not exist."""
        await self._ensure()
        import aiormq

        ch = await self.conn.channel()
        try:
            ok = await ch.queue_declare(queue, passive=True)
        except aiormq.exceptions.ChannelNotFoundEntity:
            return None
        with contextlib.suppress(Exception):
            await ch.close()
        return ok.message_count, ok.consumer_count

    async def peek(self, queue: str) -> tuple[int | None, str | None] | None:
        """(delivery_mode, content_type) of the message at the head of the queue (removed)."""
        await self._ensure()
        ch = await self.conn.channel()
        try:
            msg = await ch.basic_get(queue, no_ack=True)
        finally:
            if not ch.is_closed:
                await ch.close()
        if msg is None or getattr(msg, "header", None) is None:
            return None
        props = msg.header.properties
        return props.delivery_mode, props.content_type

    async def delete_queues(self, names: Iterable[str]) -> list[str]:
        """Delete queues by trying; not-found is ignored. Returns deleted names."""
        await self._ensure()
        import aiormq

        deleted = []
        for name in names:
            ch = await self.conn.channel()
            try:
                await ch.queue_delete(name)
                deleted.append(name)
            except aiormq.exceptions.AMQPError:
                pass
            finally:
                if not ch.is_closed:
                    with contextlib.suppress(Exception):
                        await ch.close()
        return deleted

    async def delete_exchanges(self, names: Iterable[str]) -> None:
        await self._ensure()
        import aiormq

        for name in names:
            ch = await self.conn.channel()
            try:
                await ch.exchange_delete(name)
            except aiormq.exceptions.AMQPError:
                pass
            finally:
                if not ch.is_closed:
                    with contextlib.suppress(Exception):
                        await ch.close()
