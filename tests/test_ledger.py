"""The ledger's own rules, without a chain: monotonic, durable across reopen, safe under races."""

from __future__ import annotations

import threading

import pytest

from dcml.node.payments.ledger import ChargeOp, Ledger, LedgerConflict, VoucherOp

CID = "0x" + "ab" * 32


def test_accepted_only_grows_and_every_voucher_is_logged_once(tmp_path) -> None:
    ledger = Ledger(tmp_path / "l.sqlite")
    ledger.record_voucher(CID, 10, "0x01")
    ledger.record_voucher(CID, 20, "0x02")
    for stale in (20, 15):
        with pytest.raises(LedgerConflict) as info:
            ledger.record_voucher(CID, stale, "0x03")
        assert info.value.reason == "not_increasing"
    balance = ledger.get(CID)
    assert (balance.accepted, balance.signature) == (20, "0x02")
    assert ledger.voucher_count(CID) == 2


def test_durable_across_reopen(tmp_path) -> None:
    ledger = Ledger(tmp_path / "l.sqlite")
    ledger.record_voucher(CID, 2**127 + 3, "0xaa")  # above SQLite's 64-bit integers
    ledger.add_spent(CID, 5)
    ledger.set_settled(CID, 2**126)
    ledger.close()
    again = Ledger(tmp_path / "l.sqlite").get(CID)
    assert (again.accepted, again.spent, again.settled) == (2**127 + 3, 5, 2**126)


def test_settled_never_decreases_and_finalized_is_sticky(tmp_path) -> None:
    ledger = Ledger(tmp_path / "l.sqlite")
    ledger.record_voucher(CID, 100, "0x01")
    ledger.set_settled(CID, 80, finalized=True)
    ledger.set_settled(CID, 50)
    balance = ledger.get(CID)
    assert balance.settled == 80 and balance.finalized
    assert ledger.open_channels() == []
    with pytest.raises(LedgerConflict):
        ledger.record_voucher(CID, 200, "0x02")


def test_spending_is_capped_at_accepted_plus_slack(tmp_path) -> None:
    ledger = Ledger(tmp_path / "l.sqlite")
    with pytest.raises(LedgerConflict):
        ledger.add_spent(CID, 1)
    ledger.record_voucher(CID, 10, "0x01")
    assert ledger.add_spent(CID, 7) == 7
    with pytest.raises(LedgerConflict) as info:
        ledger.add_spent(CID, 4)  # 11 > accepted 10
    assert info.value.reason == "insufficient_funds"
    assert ledger.add_spent(CID, 4, slack=1) == 11  # within the credit window
    assert ledger.get(CID).spent == 11


def test_a_batch_is_one_transaction_with_per_op_results(tmp_path) -> None:
    ledger = Ledger(tmp_path / "l.sqlite")
    ops = [VoucherOp(CID, 10, "0x01"), ChargeOp(CID, 6), ChargeOp(CID, 6), ChargeOp(CID, 4),
           ChargeOp("0x" + "00" * 32, 1), VoucherOp(CID, 9, "0x02"), ChargeOp(CID, 2, slack=2)]
    results = [r if isinstance(r, LedgerConflict) else r[0] for r in ledger.apply_groups([[op] for op in ops])]
    assert results[0].accepted == 10
    assert (results[1].spent, results[3].spent, results[6].spent) == (6, 10, 12)
    for refused in (results[2], results[4], results[5]):
        assert isinstance(refused, LedgerConflict)
    assert (ledger.get(CID).spent, ledger.get(CID).accepted) == (12, 10)


def test_racing_vouchers_for_one_channel_keep_the_highest(tmp_path) -> None:
    ledger = Ledger(tmp_path / "l.sqlite")
    wins: list[int] = []

    def submit(amounts: range) -> None:
        for a in amounts:
            try:
                ledger.record_voucher(CID, a, f"0x{a:04x}")
                wins.append(a)
            except LedgerConflict:
                pass

    threads = [threading.Thread(target=submit, args=(range(start, 400, 4),)) for start in range(1, 5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert ledger.get(CID).accepted == max(wins)
    assert ledger.voucher_count(CID) == len(wins) == len(set(wins))
    import sqlite3

    logged = [int(r[0]) for r in sqlite3.connect(tmp_path / "l.sqlite").execute(
        "SELECT cumulative FROM vouchers ORDER BY id")]
    assert logged == sorted(logged)  # in commit order, each accepted voucher beat every earlier one


def test_a_group_is_all_or_nothing(tmp_path) -> None:
    ledger = Ledger(tmp_path / "l.sqlite")
    ledger.record_voucher(CID, 10, "0x01")
    ok, refused = ledger.apply_groups([[VoucherOp(CID, 20, "0x02"), ChargeOp(CID, 15)],
                                       [VoucherOp(CID, 30, "0x03"), ChargeOp(CID, 100)]])
    assert [b.spent for b in ok] == [0, 15] and isinstance(refused, LedgerConflict)
    balance = ledger.get(CID)
    assert (balance.accepted, balance.spent) == (20, 15)  # the refused group's voucher was rolled back too
    assert ledger.voucher_count(CID) == 2


def test_the_in_memory_mirror_follows_every_commit_and_a_foreign_write_is_still_checked(tmp_path) -> None:
    """`get`/`accepted` read a mirror (no SQLite read on the paid path); the money rules stay in the ops, which
    re-read the row inside their transaction, so a write another Ledger on the same file made is never undone."""
    ledger = Ledger(tmp_path / "l.sqlite")
    ledger.record_voucher(CID, 100, "0x01")
    ledger.add_spent(CID, 30)
    assert (ledger.get(CID).accepted, ledger.get(CID).spent, ledger.accepted(CID)) == (100, 30, 100)
    assert ledger.get("0x" + "cd" * 32) is None and ledger.accepted("0x" + "cd" * 32) == 0
    with pytest.raises(LedgerConflict):  # refused: the mirror is unchanged
        ledger.add_spent(CID, 1000)
    assert ledger.get(CID).spent == 30
    other = Ledger(tmp_path / "l.sqlite")  # loads what is on disk
    assert other.get(CID) == ledger.get(CID)
    other.record_voucher(CID, 500, "0x02")  # behind `ledger`'s back
    with pytest.raises(LedgerConflict) as info:  # its mirror says 100; the row says 500: the row wins
        ledger.record_voucher(CID, 200, "0x03")
    assert info.value.reason == "not_increasing"
    assert ledger.add_spent(CID, 300) == 330  # allowed by the row (500), and the mirror catches up on it
    assert (ledger.get(CID).accepted, ledger.get(CID).spent) == (500, 330)
    assert Ledger(tmp_path / "l.sqlite").get(CID) == ledger.get(CID)
