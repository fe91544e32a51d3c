"""The chaos ledger's per-key order check of the partitioned consumer catches what it should."""

from __future__ import annotations

from .runner import Ledger


def test_ordered_check_catches_disorder_gaps_and_overlaps() -> None:
    ledger = Ledger(["ok"])
    ledger.ordered_confirmed_items([["k", 2]])
    # [key, seq, attempt, ok, started, ended]: 0, 1 failing once then retried, 1 again (ack lost), 2.
    ledger.ordered_calls("a", [["k", 0, 1, 1, 1.0, 1.1], ["k", 1, 1, 0, 1.2, 1.3], ["k", 1, 2, 1, 1.8, 1.9]])
    ledger.ordered_calls("b", [["k", 1, 1, 1, 5.0, 5.1], ["k", 2, 1, 1, 5.2, 5.3]])
    check = ledger.check_ordered()
    assert (check["events"], check["redeliveries"], check["retried_in_place"]) == (3, 1, 1)
    assert check["wrong"] == check["missing"] == []

    ledger.ordered_calls("a", [["k", 4, 1, 1, 6.0, 6.1]])  # 3 skipped
    ledger.ordered_calls("b", [["k", 4, 1, 1, 6.05, 6.2]])  # while a's call of k ran
    check = ledger.check_ordered()
    assert any("gap or disorder" in w for w in check["wrong"])
    assert check["overlaps"] == 1

    ledger.ordered_confirmed_items([["k", 5]])
    assert ledger.check_ordered()["missing"] == ["k#3", "k#5"]
