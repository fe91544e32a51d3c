"""The bounded chaos run: one fixed seed, one cycle of every fault, about 2-3 minutes on the local
3-node cluster. `make chaos` is the soak (random seeds, 10 minutes, 200,000 messages)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from . import cluster
from .runner import Options, Runner

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(420)]

SEED = 20240611


@pytest.fixture(scope="module")
def running_cluster() -> Iterator[None]:
    """The 3-node cluster; started here (and stopped after) when it does not run yet."""
    started_here = not cluster.running()
    if started_here:
        cluster.start_sync()
    yield
    if started_here:
        cluster.stop_sync()


async def test_chaos_ledger_balances(running_cluster: None, capsys: pytest.CaptureFixture[str]) -> None:
    with capsys.disabled():
        result = await Runner(Options(seed=SEED, rate=150)).run()
    assert result["lost"] == 0, f"lost messages (seed {SEED}): {result['missing']}; logs in {result['logs']}"
    assert result["stuck"] == 0, f"stuck messages (seed {SEED}): {result['queues']}; logs in {result['logs']}"
    assert not result["wrong"], f"messages with the wrong end (seed {SEED}): {result['wrong'][:10]}"
    assert not result["unhealthy"], f"apps unhealthy at the end: {result['unhealthy']}"
    # The partitioned consumer's keys went through it all in order (their problems are in "wrong").
    assert result["ordered"]["events"] > 0
    assert result["ordered"]["overlaps"] == 0
    assert {f["name"] for f in result["faults"]} >= {
        "kill-consumer-node",
        "kill-other-node",
        "proxy-cut",
        "proxy-blackhole",
        "memory-alarm",
        "delete-queue",
    }
    # Duplicates come from deliveries in flight at a loss (prefetch) and re-sent publishes.
    losses = sum(f["name"] != "memory-alarm" for f in result["faults"])
    assert result["duplicates"] <= losses * (4 * 50 + 200)
