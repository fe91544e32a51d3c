"""What differs between the RabbitMQ versions the in-memory broker emulates.

3.10.8 and 4.0.5 run here: tests/transport/test_profile_real.py plays every rule against the
real broker of its version. The 3.13 and 4.3 profiles follow the release notes and docs cited
beside each field. `rabbitflow.topology.versions` reads the same table to say what a plan relies
on that a server does differently.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

__all__ = ["PROFILES", "VERSIONS", "Profile", "profile", "profile_for_server"]

MiB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Profile:
    """One RabbitMQ version as the memory broker plays it."""

    version: str  # "4.3"
    server_version: str  # what connection.start's server properties say: "4.3.0"
    # https://github.com/rabbitmq/rabbitmq-server/releases/tag/v4.0.1 ("default redelivery limit set to 20")
    default_delivery_limit: int | None
    # https://www.rabbitmq.com/docs/4.3/nack (basic.reject counts, basic.nack does not)
    nack_counts: bool
    # https://github.com/rabbitmq/rabbitmq-server/discussions/18226 (4.3: a consumer timeout does not count)
    timeout_counts: bool
    # https://github.com/rabbitmq/rabbitmq-server/releases/tag/v4.3.0 (x-acquired-count: every hand-out)
    acquired_count_header: bool
    # https://github.com/rabbitmq/rabbitmq-server/pull/11339 (3.13.3 interprets a client's x-death
    # again, as up to 3.12; 3.13.0-3.13.2 and 4.0+ never do)
    interprets_client_x_death: bool
    # https://github.com/rabbitmq/rabbitmq-website/pull/1913 (x-last-death-* headers, 3.13)
    last_death_headers: bool
    # https://github.com/rabbitmq/rabbitmq-server/releases/tag/v4.3.0 (transient_nonexcl_queues denied)
    refuses_transient_nonexclusive: bool
    # https://github.com/rabbitmq/rabbitmq-dotnet-client/issues/1931 (global_qos denied by default in 4.3)
    refuses_global_qos: bool
    # https://github.com/rabbitmq/rabbitmq-server/pull/14769 (4.3 rejects x-queue-mode, CQv1 gone)
    refuses_queue_mode: bool
    # https://github.com/rabbitmq/rabbitmq-server/blob/main/consumer_timeouts.md (4.3: basic.cancel
    # to consumers with consumer_cancel_notify; up to 4.2 the channel closes with 406)
    timeout_cancels: bool
    # x-consumer-timeout as a queue argument: 3.12+ (3.11.15); 3.10 only has the broker setting
    # https://www.rabbitmq.com/docs/consumers#per-queue-delivery-timeouts-using-an-optional-queue-argument
    queue_consumer_timeout: bool
    # ... on classic queues too: seen on 4.0.5 (its channel closes with the same 406); refused on
    # classic queues from 4.3.2 (release notes), which the memory broker plays as not honoured
    classic_consumer_timeout: bool
    # 3.10's basic.get adds x-delivery-count 0 to a quorum message's first hand-out; 4.0.5 adds
    # none until it was returned (seen on 4.0.5; 3.13 not checked: played as 3.10)
    get_adds_delivery_count: bool
    # An unknown exchange type: 3.10 closes the connection (503 COMMAND_INVALID), 4.0.5 only the
    # channel (406 PRECONDITION_FAILED - unknown exchange type 'x'; seen on 4.0.5)
    unknown_exchange_type_closes_connection: bool
    # A dead-lettered message keeps its delivery count (the rejection counted) round a loop back
    # to a quorum queue, and arrives redelivered: seen on 4.0.5, not on 3.10.8
    dead_letter_keeps_counts: bool
    # https://github.com/rabbitmq/rabbitmq-server/pull/11455 (4.0: 16 MiB, was 128 MiB)
    max_message_size: int
    # rabbit_fifo up to 3.13 appends a message rejected with requeue to the back of a quorum
    # queue without a delivery limit; from 4.0 every quorum queue has one (returns go first)
    requeue_to_back: bool


_3_10 = Profile(
    version="3.10",
    server_version="3.10.8",
    default_delivery_limit=None,
    nack_counts=True,
    timeout_counts=True,
    acquired_count_header=False,
    interprets_client_x_death=True,
    last_death_headers=False,
    refuses_transient_nonexclusive=False,
    refuses_global_qos=False,
    refuses_queue_mode=False,
    timeout_cancels=False,
    queue_consumer_timeout=False,
    classic_consumer_timeout=False,
    get_adds_delivery_count=True,
    unknown_exchange_type_closes_connection=True,
    dead_letter_keeps_counts=False,
    max_message_size=128 * MiB,
    requeue_to_back=True,
)
_3_13 = replace(
    _3_10,
    version="3.13",
    server_version="3.13.7",
    last_death_headers=True,
    queue_consumer_timeout=True,
    classic_consumer_timeout=True,
)
_4_0 = replace(
    _3_13,
    version="4.0",
    server_version="4.0.0",
    default_delivery_limit=20,
    interprets_client_x_death=False,
    max_message_size=16 * MiB,
    requeue_to_back=False,
    get_adds_delivery_count=False,
    unknown_exchange_type_closes_connection=False,
    dead_letter_keeps_counts=True,
)
_4_3 = replace(
    _4_0,
    version="4.3",
    server_version="4.3.0",
    nack_counts=False,
    timeout_counts=False,
    acquired_count_header=True,
    refuses_transient_nonexclusive=True,
    refuses_global_qos=True,
    refuses_queue_mode=True,
    timeout_cancels=True,
    classic_consumer_timeout=False,
)

PROFILES: dict[str, Profile] = {p.version: p for p in (_3_10, _3_13, _4_0, _4_3)}
VERSIONS = tuple(PROFILES)


def profile(version: str) -> Profile:
    """The profile of `version` ("3.10", "3.13", "4.0", "4.3"); ValueError naming the allowed ones."""
    try:
        return PROFILES[version]
    except (KeyError, TypeError):
        allowed = ", ".join(repr(v) for v in VERSIONS)
        raise ValueError(
            f"MemoryBroker(version={version!r}): the memory broker emulates RabbitMQ {allowed}; "
            "pick one of those (4.1 and 4.2 behave as '4.0' here)"
        ) from None


def profile_for_server(server_version: str) -> Profile | None:
    """The profile whose behaviour a server of this version ("4.1.2") has, or None if unknown.
    3.11-3.12 map to 3.10 (x-last-death-* came with 3.13), 3.13.x to 3.13, 4.0-4.2 to 4.0,
    4.3 and later to 4.3."""
    parts = server_version.strip().split(".")
    try:
        major, minor = int(parts[0]), int(parts[1]) if len(parts) > 1 else 0
    except ValueError:
        return None
    if (major, minor) < (3, 10):
        return None
    if (major, minor) < (3, 13):
        return _3_10
    if major == 3:
        return _3_13
    if (major, minor) < (4, 3):
        return _4_0
    return _4_3
