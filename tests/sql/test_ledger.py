"""The crash-proof ledger, bounded: workers SIGKILLed between commit and ack and mid-relay, and
by the runner at random, for 20 s; every input's effect and every output's downstream effect
exactly once. The long run: `python -m tests.sql.ledger --minutes 10` (see ledger.py)."""

from __future__ import annotations

import pytest

from . import ledger


@pytest.mark.timeout(90)
@pytest.mark.one_version  # PostgreSQL and worker kills; the 4.0 cluster ledger is the version check
async def test_sigkilled_workers_leave_every_effect_exactly_once(broker_url: str, pg_database: str) -> None:
    result = await ledger.run(
        pg_database, inputs=400, seconds=20, workers=3, kill_every=2.0, kill_chance=0.01, seed=26
    )
    assert result.problems() == []
    assert result.worker_deaths >= 10  # the faults did happen ...
    assert result.arrivals > result.inputs  # ... and some outputs reached the broker twice


@pytest.mark.cluster
@pytest.mark.timeout(180)
async def test_every_effect_exactly_once_while_broker_nodes_are_killed_too(pg_database: str) -> None:
    """The same ledger on the 3-node cluster with quorum queues: nodes 2 and 3 SIGKILLed in turn
    while the workers die too."""
    result = await ledger.run(
        pg_database,
        inputs=300,
        seconds=30,
        workers=3,
        kill_every=3.0,
        kill_chance=0.01,
        seed=2626,
        cluster=True,
    )
    assert result.problems() == []
    assert result.node_kills >= 2  # the broker's faults did happen
    assert result.worker_deaths >= 5
