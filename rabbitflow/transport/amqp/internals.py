"""Every reach into aiormq's private state, in one place.

Checked on aiormq 7.2.x (pyproject pins `aiormq>=7.2,<8`; tests/transport/test_internals.py
fails when an installed aiormq lacks one of them). Each buys a measured speed-up or works around
an aiormq behaviour, and each has a fallback to aiormq's public path, taken when this aiormq
lacks what it needs or when `RABBITFLOW_AIORMQ_PATCHES=off`: slower, never less correct
(`make test` runs the contract suite that way).

- `aiormq.connection.FrameReceiver`, replaced for rabbitflow's connections (`decode.py`):
  hostile properties park their message instead of killing the connection, and decoding is
  4-8x faster. Without it pamqp decodes: an undecodable property closes the connection, as it
  does for any aiormq client. The receiver also hands the deliveries of rabbitflow's consumers
  to them itself (`broker.AmqpChannel.consume`, with a consumer tag it chose): it relies on
  aiormq's connection reader asking it for one frame after another, and on a heartbeat frame
  being a no-op there that only sets aiormq's clock of the last frame. Without it: aiormq's
  channel reader and a task of aiormq's per delivery.
- a channel's `delivery_tag`, `confirmations`, `write_queue` and close event (`pipeline.py`):
  the publishes and acks of one loop turn leave in one write. Without: `basic_publish` and
  `basic_ack`, a write each.
- a channel's `_on_return_frame`, `_on_confirm_frame`, `_get_frame`, `_read_content`
  (`returns.py`): a basic.return matched to its publish by the broker's order, not by
  `message_id`. Without (the pipeline is then off too): aiormq matches by `message_id`.
- a connection's unblocked event (`broker.py`): `blocked` answered without waiting. Without:
  reported unblocked; a publish then waits inside aiormq, bounded by its timeout.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import aiormq
import aiormq.connection
from aiormq.abc import ChannelFrame, DeliveredMessage
from pamqp.header import ContentHeader

__all__ = [
    "ENABLED",
    "PATCHES_ENV",
    "FrameReceiver",
    "blocked",
    "can_pipeline",
    "closing",
    "confirmations",
    "hook_returns",
    "next_delivery_tag",
    "read_returned",
    "swap_frame_receiver",
    "write",
]

PATCHES_ENV = "RABBITFLOW_AIORMQ_PATCHES"
# Read once, at import: a process runs with the patches or without them.
ENABLED = os.environ.get(PATCHES_ENV, "on").strip().lower() not in {"off", "0", "false", "no"}

# The receiver rabbitflow's decoder extends (`decode.Receiver`).
FrameReceiver = aiormq.connection.FrameReceiver
_AIORMQ_RECEIVER = aiormq.connection.FrameReceiver

_CHANNEL_NEEDS = (
    "delivery_tag",
    "write_queue",
    "max_content_size",
    "confirmations",
    "_on_return_frame",
    "_on_confirm_frame",
    "_read_content",
    "_get_frame",
)


# -- the frame receiver -------------------------------------------------------------------------


def swap_frame_receiver(factory: Any) -> bool:
    """Make aiormq build its connections' frame receivers with `factory(reader)` (which gives
    aiormq's own to connections that are not rabbitflow's); False when this aiormq builds its
    receiver some other way, or the patches are off."""
    if not ENABLED:
        return False
    current = getattr(aiormq.connection, "FrameReceiver", None)
    if current is factory:
        return True
    if current is not _AIORMQ_RECEIVER or not hasattr(_AIORMQ_RECEIVER, "get_frame"):
        return False
    aiormq.connection.FrameReceiver = factory  # type: ignore[misc]
    return True


def aiormq_receiver(reader: asyncio.StreamReader) -> Any:
    """aiormq's own receiver, for the connections that are not rabbitflow's."""
    return _AIORMQ_RECEIVER(reader)


# -- a channel's publishing state ---------------------------------------------------------------


def can_pipeline(channel: aiormq.Channel) -> bool:
    """Whether `pipeline.Pipeline` may drive this channel: confirm mode, and every private field
    it uses is there."""
    return ENABLED and channel.publisher_confirms and all(hasattr(channel, n) for n in _CHANNEL_NEEDS)


def closing(channel: aiormq.Channel) -> bool:
    """Closed, or closing: aiormq answers the broker's channel.close (queueing close-ok) before
    `is_closed` turns true, and a frame written after that close-ok is a connection error (504
    CHANNEL_ERROR) that takes every channel down. aiormq's own methods check the same event."""
    event = getattr(channel, "_Channel__close_event", None)
    return channel.is_closed or (isinstance(event, asyncio.Event) and event.is_set())


def next_delivery_tag(channel: aiormq.Channel) -> int:
    """Take the channel's next publish sequence number, as `basic_publish` does."""
    channel.delivery_tag += 1
    return channel.delivery_tag


def confirmations(channel: aiormq.Channel) -> dict[int, Any]:
    """The channel's futures by delivery tag, which aiormq resolves on basic.ack / basic.nack and
    fails when the channel closes."""
    return channel.confirmations


def write(channel: aiormq.Channel, payload: bytes) -> bool:
    """Hand marshalled frames to the connection's writer; False when its queue is full."""
    try:
        channel.write_queue.put_nowait(ChannelFrame(payload=payload, should_close=False))
    except asyncio.QueueFull:
        return False
    return True


async def write_waiting(channel: aiormq.Channel, payload: bytes) -> None:
    """`write`, waiting for room in the writer's queue."""
    await channel.write_queue.put(ChannelFrame(payload=payload, should_close=False))


# -- returns ------------------------------------------------------------------------------------


def hook_returns(channel: aiormq.Channel, on_return: Any, on_confirm: Any) -> Any:
    """Handle this channel's basic.return and confirm frames with ours; returns aiormq's confirm
    handler, which ours passes each confirm on to. aiormq's channel reader looks both up on the
    instance for every frame."""
    original = channel._on_confirm_frame
    channel._on_return_frame = on_return  # type: ignore[method-assign]
    channel._on_confirm_frame = on_confirm  # type: ignore[method-assign]
    return original


async def read_returned(channel: aiormq.Channel, frame: Any) -> DeliveredMessage:
    """The content of a basic.return just read: its header and body frames."""
    header = await channel._get_frame()
    if not isinstance(header, ContentHeader):
        raise ValueError(f"Unexpected frame {header!r} instead of ContentHeader", header)
    return await channel._read_content(frame, header)


# -- a connection -------------------------------------------------------------------------------


def blocked(connection: aiormq.abc.AbstractConnection) -> bool:
    """Whether the broker blocked the connection (connection.blocked: a resource alarm)."""
    if not ENABLED:
        return False
    unblocked = getattr(connection, "_Connection__connection_unblocked", None)
    return isinstance(unblocked, asyncio.Event) and not unblocked.is_set()
