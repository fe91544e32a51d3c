"""A parked message as an operator reads it, from whatever its headers hold (no broker)."""

from __future__ import annotations

import datetime
import decimal
import io
import json
from contextlib import redirect_stdout
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from rabbitflow import names
from rabbitflow.cli.parked import _print_message
from rabbitflow.parking.message import Filter, GroupCounter, ParkedMessage
from rabbitflow.transport.base import Delivery, Properties

X_RF = [
    names.REASON,
    names.PARKED_ATTEMPTS,
    names.EXCEPTION,
    names.ERROR,
    names.TRACEBACK,
    names.QUEUE,
    names.ORIGINAL_EXCHANGE,
    names.ORIGINAL_ROUTING_KEY,
    names.FIRST_FAILURE,
    names.LAST_FAILURE,
    "x-death",
    "x-rf-origin-queue",
]
# What the decoder can hand over for one header value (tables.decode_table).
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64),
    st.floats(),
    st.decimals(allow_nan=False),
    st.text(max_size=20),
    st.binary(max_size=20),
    st.binary(max_size=20).map(bytearray),
    st.datetimes(timezones=st.just(datetime.UTC)),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
HEADERS = st.dictionaries(st.sampled_from(X_RF) | st.text(max_size=10), VALUES, max_size=8)


def delivery(headers: Any, **props: Any) -> Delivery:
    return Delivery(b"\xff\x00body", Properties(headers=headers, **props), 1, False, "", "q")


@settings(max_examples=500, deadline=None)
@given(headers=HEADERS, correlation_id=st.none() | st.text(max_size=10))
def test_no_header_value_stops_reading_grouping_filtering_or_printing(
    headers: dict[str, Any], correlation_id: str | None
) -> None:
    message = ParkedMessage.of(delivery(headers, correlation_id=correlation_id, message_id="m"))
    assert message.message_id == "m"
    json.dumps(message.details(), ensure_ascii=False)
    json.dumps(message.summary())
    counter = GroupCounter()
    counter.add(message)
    counter.add(ParkedMessage.of(delivery({names.FIRST_FAILURE: "2026-01-01T00:00:00.000Z"})))
    counter.result()
    for reason in ("rejected", None):
        Filter(reason=reason, exception="ValueError").matches(message)
    with redirect_stdout(io.StringIO()):
        _print_message(message)


def test_epoch_milliseconds_and_out_of_range_times_are_shown_not_raised() -> None:
    message = ParkedMessage.of(
        delivery({names.FIRST_FAILURE: 1_767_225_600_000, names.LAST_FAILURE: 2**63 - 1})
    )
    assert message.first_failure == "2026-01-01T00:00:00.000Z"  # milliseconds, as AMQP reads them
    assert message.last_failure == str(2**63 - 1)


def test_bytes_values_are_text_and_filters_match_them() -> None:
    message = ParkedMessage.of(
        delivery(
            {
                names.REASON: bytearray(b"rejected"),
                names.ERROR: b"caf\xc3\xa9 \xff",
                "tenant": bytearray(b"acme"),
                names.FIRST_FAILURE: decimal.Decimal("1.5"),
            }
        )
    )
    assert message.reason == "rejected"
    assert Filter(reason="rejected").matches(message)
    assert message.error == "café \\xff"  # hex-escaped where it is not UTF-8
    shown = message.details()
    assert shown["headers"]["tenant"] == "acme"
    assert "bytearray" not in json.dumps(shown)


def test_show_says_where_a_message_came_from() -> None:
    message = ParkedMessage.of(
        delivery(
            {
                names.REASON: "exhausted",
                names.ORIGINAL_EXCHANGE: "shop",
                "x-rf-origin-service": "billing",
                "x-rf-origin-queue": b"invoices",
            },
            correlation_id="req-7",
        )
    )
    out = io.StringIO()
    with redirect_stdout(out):
        _print_message(message)
    text = out.getvalue()
    assert "correlation id: req-7" in text
    assert "origin-service: billing" in text
    assert "origin-queue: invoices" in text
    assert "original-exchange: shop" in text
    assert message.details()["origin"] == {
        "correlation_id": "req-7",
        names.ORIGINAL_EXCHANGE: "shop",
        "x-rf-origin-service": "billing",
        "x-rf-origin-queue": "invoices",
    }
