"""The pipeline's own content-header encoder writes what pamqp writes, byte for byte (but for what
pamqp would alter), and the receiver's decoder reads what pamqp reads, and names what pamqp cannot."""

from __future__ import annotations

import datetime
import decimal
import random
from typing import Any

import pytest
from pamqp.body import ContentBody
from pamqp.commands import Basic
from pamqp.frame import marshal, unmarshal
from pamqp.header import ContentHeader

from rabbitflow.transport.amqp.encode import body_frames, content_header_frame

WHEN = datetime.datetime(2026, 11, 25, 22, 41, 7, tzinfo=datetime.UTC)

HEADER_VALUES: list[Any] = [
    "",
    "text",
    "ünïcødé ✓",
    "x" * 300,
    0,
    1,
    -1,
    127,
    -128,
    128,
    -129,
    32767,
    -32768,
    65535,
    70000,
    -70000,
    2**31,
    2**40,
    True,
    False,
    None,
    1.5,
    decimal.Decimal("3.14"),
    WHEN,
    {"nested": "table", "n": 3},
    {},
    ["a", 1, True],
    bytearray(b"\x00\xff"),
]


def _properties(rng: random.Random) -> Basic.Properties:
    def maybe(value: Any) -> Any:
        return value if rng.random() < 0.6 else rng.choice([None, ""])

    keys = ["x-rf-attempt", "a", "zz", "Ключ", "x-rf-first-failure"]
    headers = {rng.choice([*keys, f"k{i}"]): rng.choice(HEADER_VALUES) for i in range(rng.randrange(0, 8))}
    return Basic.Properties(
        content_type=maybe("application/json"),
        content_encoding=maybe("gzip"),
        headers=rng.choice([None, {}, headers, headers]),
        delivery_mode=rng.choice([None, 1, 2]),
        priority=rng.choice([None, 0, 9, 255]),
        correlation_id=maybe("corr-1"),
        reply_to=maybe("amq.rabbitmq.reply-to"),
        expiration=maybe("60000"),
        message_id=maybe("a1b2c3d4e5f6a7b8:42"),
        timestamp=rng.choice([None, WHEN, WHEN.replace(tzinfo=None)]),
        message_type=maybe("order.created"),
        user_id=maybe("guest"),
        app_id=maybe("orders"),
    )


def test_the_encoder_writes_what_pamqp_writes_over_many_property_sets() -> None:
    rng = random.Random(20261125)
    for _ in range(3000):
        properties = _properties(rng)
        channel, size = rng.choice([1, 7, 65535]), rng.choice([0, 1, 256, 2**33])
        expected = marshal(ContentHeader(0, size, properties), channel)
        assert content_header_frame(channel, size, properties) == expected, vars(properties)


def test_a_retry_copy_header_round_trips_through_pamqp() -> None:
    headers = {
        "x-rf-attempt": 2,
        "x-rf-original-exchange": "orders",
        "x-rf-original-routing-key": "order.created",
        "x-rf-first-failure": "2026-11-25T22:41:07.123Z",
        "tenant": "acme",
    }
    properties = Basic.Properties(
        content_type="application/json", headers=headers, delivery_mode=2, message_id="m-1"
    )
    _, channel, frame = unmarshal(content_header_frame(5, 256, properties))
    assert channel == 5
    assert isinstance(frame, ContentHeader)
    assert frame.body_size == 256
    assert frame.properties.headers == headers
    assert (frame.properties.content_type, frame.properties.delivery_mode) == ("application/json", 2)
    assert frame.properties.message_id == "m-1"


@pytest.mark.parametrize(
    "properties",
    [
        pytest.param(Basic.Properties(message_id="x" * 256), id="shortstr over 255 bytes"),
        pytest.param(Basic.Properties(headers={"bad": object()}), id="header of no AMQP type"),
        pytest.param(Basic.Properties(headers={"big": 2**70}), id="integer over 64 bits"),
    ],
)
def test_what_amqp_cannot_carry_fails_as_in_pamqp(properties: Basic.Properties) -> None:
    with pytest.raises(TypeError) as ours:
        content_header_frame(1, 0, properties)
    with pytest.raises(TypeError) as theirs:
        marshal(ContentHeader(0, 0, properties), 1)
    assert str(ours.value) == str(theirs.value)


@pytest.mark.parametrize("size", [0, 1, 4095, 4096, 4097, 10_000])
def test_bodies_split_into_frames_as_pamqp_would(size: int) -> None:
    body = bytes(random.Random(size).randbytes(size))
    limit = 4096
    expected = [marshal(ContentBody(body[i : i + limit]), 3) for i in range(0, len(body), limit)]
    assert body_frames(3, body, limit) == expected
    assert b"".join(f[7:-1] for f in body_frames(3, body, limit)) == body


def test_ack_frames_are_pamqps_byte_for_byte() -> None:
    from pamqp.commands import Basic as Methods

    from rabbitflow.transport.amqp.encode import ack_frame

    for channel, tag, multiple in [(1, 1, False), (7, 2**40 + 3, True), (65535, 2**62, False)]:
        assert ack_frame(channel, tag, multiple) == marshal(
            Methods.Ack(delivery_tag=tag, multiple=multiple), channel
        )


# -- the receiving side: rabbitflow's decoder (transport/inbound.py) ---------------------------


def test_the_decoder_reads_what_pamqp_reads_over_many_property_sets() -> None:
    from rabbitflow.transport.amqp.decode import content_header

    rng = random.Random(20261126)
    for _ in range(3000):
        properties = _properties(rng)
        size = rng.choice([0, 1, 256, 2**33])
        frame = marshal(ContentHeader(0, size, properties), 1)
        theirs = unmarshal(frame)[2]
        ours = content_header(frame[7:-1])
        assert ours.undecodable is None
        assert ours.body_size == size
        for name in Basic.Properties.__slots__:
            expected, got = getattr(theirs.properties, name), getattr(ours.properties, name)
            assert got == expected, name
            assert type(got) is type(expected), name


@pytest.mark.parametrize(
    ("payload_properties", "named"),
    [
        pytest.param(b"\x80\x00" + b"\x03\xff\xfe\xfd", "content_type", id="content type not UTF-8"),
        pytest.param(b"\x00\x40" + (2**62).to_bytes(8, "big"), "timestamp", id="timestamp past 9999"),
        pytest.param(
            b"\x20\x00" + b"\x00\x00\x00\x04" + b"\x02\xc3\x28" + b"V",
            "not UTF-8",
            id="header name not UTF-8",
        ),
    ],
)
def test_what_pamqp_cannot_decode_is_named_not_raised(payload_properties: bytes, named: str) -> None:
    from pamqp.exceptions import UnmarshalingException

    from rabbitflow.transport.amqp.decode import content_header

    payload = b"\x00\x3c\x00\x00" + (5).to_bytes(8, "big") + payload_properties
    frame = b"\x02\x00\x01" + len(payload).to_bytes(4, "big") + payload + b"\xce"
    with pytest.raises((UnmarshalingException, OverflowError, ValueError)):
        unmarshal(frame)
    header = content_header(payload)
    assert header.body_size == 5
    assert header.undecodable is not None
    assert named in header.undecodable


def test_a_header_as_it_arrived_is_written_back_with_its_type() -> None:
    from rabbitflow.transport.amqp.tables import Encoded, entries, header_table

    arrived = {"int32": Encoded(b"I\x00\x00\x00\x05"), "float": Encoded(b"f" + b"\x3d\xcc\xcc\xcd")}
    frame = content_header_frame(1, 0, Basic.Properties(headers={**arrived, "plain": 5}))
    table = header_table(frame[7:-1])
    assert table is not None
    assert entries(table) == {**arrived, "plain": Encoded(b"b\x05")}


def test_a_millisecond_timestamp_goes_out_as_it_came_in() -> None:
    from rabbitflow.transport.amqp.decode import content_header

    millis = 1_764_000_000_123
    payload = b"\x00\x3c\x00\x00" + bytes(8) + b"\x00\x40" + millis.to_bytes(8, "big")
    stamp = content_header(payload).properties.timestamp
    assert stamp == datetime.datetime.fromtimestamp(millis / 1000, datetime.UTC)  # pamqp's reading
    frame = content_header_frame(1, 0, Basic.Properties(timestamp=stamp, headers={"at": stamp}))
    assert frame.endswith(millis.to_bytes(8, "big") + b"\xce")  # the property, the last one here
    assert b"\x02atT" + millis.to_bytes(8, "big") in frame


def test_a_header_name_is_written_whole_or_refused_never_truncated() -> None:
    long = "k" * 200
    frame = content_header_frame(1, 0, Basic.Properties(headers={long: 1}))
    assert bytes((200,)) + long.encode() + b"b\x01" in frame  # pamqp would cut it at 128 bytes
    with pytest.raises(TypeError, match="255 bytes"):
        content_header_frame(1, 0, Basic.Properties(headers={"k" * 256: 1}))
