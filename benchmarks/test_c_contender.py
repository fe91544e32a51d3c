"""The C contender speaks the runner's protocol, and its latency numbers mean what they say.

Run by hand (they need the broker, a C compiler and librabbitmq-dev, and are not part of `make test`):

    python -m pytest benchmarks/test_c_contender.py -q -p no:cacheprovider
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import benchlib  # noqa: E402
import run  # noqa: E402

# Outside tests/ (no conftest) pytest-asyncio leaves an event loop of its own unclosed, which
# pyproject's filterwarnings=error turns into a failure of whichever test runs next.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@pytest.fixture(scope="module")
def binary() -> Path:
    try:
        return run.build_native("c_librabbitmq")
    except RuntimeError as exc:
        pytest.skip(f"C contender not buildable here: {exc}")


def _run(cmd: list[str]) -> dict[str, Any]:
    env = {**os.environ, "BENCH_AMQP_URL": benchlib.AMQP_URL}
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.strip().splitlines()
    assert len(lines) == 1, p.stdout  # exactly one JSON line on stdout
    result: dict[str, Any] = json.loads(lines[0])
    return result


async def _with_queue(fill: int, body: Any) -> tuple[Any, tuple[int, int] | None]:
    admin = benchlib.Admin()
    await admin.open()
    queue = f"test.cbench.{secrets.token_hex(3)}"
    try:
        await admin.declare(queue, "classic")
        if fill:
            await admin.fill(queue, fill, "classic")
        out = await asyncio.to_thread(body, queue)
        return out, await admin.depth(queue)
    finally:
        await admin.delete_queues([queue, f"{queue}.retry"])
        await admin.close()


def test_describe_lists_its_scenarios(binary: Path) -> None:
    info = _run([str(binary), "--describe"])
    assert info["name"] == "c_librabbitmq"
    assert {"consume", "mixed", "publish", "retry", "rss", "latency"} <= set(info["scenarios"])
    assert info["import_module"] is None


async def test_consume_acks_every_message_and_reports_rate_and_cpu(binary: Path) -> None:
    def consume(queue: str) -> dict[str, Any]:
        return _run([str(binary), "consume", "--n", "2000", "--queue", queue, "--queue-type", "classic"])

    result, depth = await _with_queue(2000, consume)
    assert depth == (0, 0)  # all 2,000 acked, consumer gone
    assert result["rate"] > 0
    assert result["steady_rate"] > 0
    assert 0 < result["cpu_us_per_msg"] < 1000
    assert result["clock"]["start"] <= result["clock"]["first"] <= result["clock"]["end"]


async def test_mixed_acks_the_sleeping_deliveries_too(binary: Path) -> None:
    def mixed(queue: str) -> dict[str, Any]:
        return _run([str(binary), "mixed", "--n", "1500", "--queue", queue])

    result, depth = await _with_queue(1500, mixed)
    assert depth == (0, 0)
    assert result["seconds"] >= benchlib.SLOW_SECONDS  # id 1000 slept its 100 ms before the last ack


async def test_paced_producer_and_latency_consumer(binary: Path) -> None:
    def both(queue: str) -> tuple[dict[str, Any], dict[str, Any]]:
        env = {**os.environ, "BENCH_AMQP_URL": benchlib.AMQP_URL}
        consumer = subprocess.Popen(
            [str(binary), "latency", "--n", "1000", "--queue", queue],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        producer = _run([str(binary), "produce", "--n", "1000", "--rate", "2000", "--queue", queue])
        out, _ = consumer.communicate(timeout=60)
        assert consumer.returncode == 0
        return producer, json.loads(out)

    (producer, consumer), depth = await _with_queue(0, both)
    assert depth == (0, 0)
    assert 1500 < producer["rate"] < 2100  # paced: 1,000 messages take about half a second
    assert consumer["lat_n"] == 900  # the first 10% left out
    assert 0 < consumer["p50_us"] <= consumer["p99_us"] <= consumer["p999_us"] <= consumer["max_us"]
    assert consumer["max_us"] < 5e6  # stamps and clock agree (both CLOCK_REALTIME, ns)


def test_percentile_is_nearest_rank() -> None:
    xs = list(range(1, 1001))
    assert benchlib.percentile(xs, 0.5) == 500
    assert benchlib.percentile(xs, 0.99) == 990
    assert benchlib.percentile(xs, 0.999) == 999
    assert benchlib.percentile([7], 0.999) == 7
