"""Which RabbitMQ the tests run against.

The single broker is whatever RABBITFLOW_TEST_URL points at (3.10 on 5672 by default, or the
4.0 node of scripts/rabbitmq4.sh on 5690): tests that expect a version's behaviour ask the
server which version it is (`broker_version`), never the port. The 3-node cluster is
scripts/cluster.sh's: RabbitMQ 3.10 on 5673-5675, or with RABBITFLOW_BROKER_VERSION=4.0 the
4.0 cluster of scripts/rabbitmq4.sh on 5691-5693 (cluster.sh hands its commands over).
"""

from __future__ import annotations

import asyncio
import os

import aiormq
import pytest

from rabbitflow.transport.memory.profile import profile_for_server

CLUSTER_VERSION = os.environ.get("RABBITFLOW_BROKER_VERSION", "3.10")
_FIRST = int(os.environ.get("RABBITFLOW_CLUSTER_PORT", "5673"))  # as scripts/cluster.sh reads it
_CLUSTER_PORTS = {"3.10": {n: _FIRST - 1 + n for n in (1, 2, 3)}, "4.0": {1: 5691, 2: 5692, 3: 5693}}


def cluster_ports() -> dict[int, int]:
    """The AMQP port of each node (1..3) of the cluster scripts/cluster.sh runs."""
    try:
        return dict(_CLUSTER_PORTS[CLUSTER_VERSION])
    except KeyError:
        allowed = " or ".join(_CLUSTER_PORTS)
        raise RuntimeError(f"RABBITFLOW_BROKER_VERSION={CLUSTER_VERSION!r}: use {allowed}") from None


async def server_version(url: str) -> str:
    """The version the server at `url` announces in connection.start ("4.0.5")."""
    connection = await asyncio.wait_for(aiormq.connect(url), 10)
    try:
        version = (connection.server_properties or {}).get("version", "")
    finally:
        await connection.close()
    return version.decode() if isinstance(version, bytes) else str(version)


def version_key(version: str) -> tuple[int, ...]:
    """ "4.0.5" -> (4, 0, 5), for comparing versions."""
    return tuple(int(part) for part in version.split(".") if part.isdigit())


def behaves_as(version: str) -> str:
    """The memory-broker profile ("3.10", "3.13", "4.0", "4.3") a server of `version` plays."""
    found = profile_for_server(version)
    if found is None:
        raise RuntimeError(f"RabbitMQ {version} is older than anything rabbitflow supports")
    return found.version


@pytest.fixture(scope="session")
def broker_version(broker_url: str) -> str:
    """The test broker's RabbitMQ version, as its server properties say ("3.10.8", "4.0.5")."""
    return asyncio.run(server_version(broker_url))
