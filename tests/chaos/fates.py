"""What each message's handler does, by message number: a seeded pattern of fates.

The producer puts the fate in the body (`{"n": 7, "fate": "fail-once"}`), the handler obeys it, and
the ledger checks the end each fate allows.
"""

from __future__ import annotations

import random
from typing import Any

OK = "ok"
FAIL_ONCE = "fail-once"  # raises on attempt 1, returns on attempt 2
FAIL_ALWAYS = "fail-always"  # raises every time: parked with x-rf-reason exhausted
SLOW = "slow"  # takes seconds (below handler_timeout)
CANCEL_ONCE = "cancel-once"  # raises asyncio.CancelledError on attempt 1
TIMEOUT_ONCE = "timeout-once"  # exceeds handler_timeout on attempt 1
MISSING_EXCHANGE = "missing-exchange"  # publishes to a missing exchange first, catches ChannelClosed
POISON = "poison"  # not a handler fate: invalid JSON from an outside producer, parked decode-error

# Per 1,000 messages.
MIX = {
    FAIL_ONCE: 10,
    FAIL_ALWAYS: 3,
    SLOW: 3,
    CANCEL_ONCE: 5,
    TIMEOUT_ONCE: 2,
    MISSING_EXCHANGE: 3,
}
BLOCK = 1000

# The end a fate must reach: handled (the handler returned) or parked with this x-rf-reason.
PARKED_AS = {FAIL_ALWAYS: "exhausted", POISON: "decode-error"}


def pattern(seed: int) -> list[str]:
    fates = [fate for fate, count in MIX.items() for _ in range(count)]
    fates += [OK] * (BLOCK - len(fates))
    random.Random(seed).shuffle(fates)
    return fates


def fate_of(body: dict[str, Any]) -> str:
    return str(body.get("fate", OK))
