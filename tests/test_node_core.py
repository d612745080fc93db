"""The node's payment and storage core without HTTP or a chain: the one group-commit writer, the ledger's one
write path, and the meter that charges a stream in reserved blocks (exact cost in the end, credit bound kept)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from dcml.client.wire.x402 import ChannelTerms
from dcml.node.payments.errors import PaymentNeeded
from dcml.node.payments.ledger import Ledger, LedgerConflict, LedgerWriter, VoucherOp
from dcml.node.payments.metering import PAID, RESERVE_TOKENS, Funds, PaidMeter, PaidRequest
from dcml.node.storage.group_commit import GroupCommitWriter

CID = "0x" + "ab" * 32
PRICE = 10


def test_group_commit_batches_and_refuses_items_one_by_one() -> None:
    batches: list[list[int]] = []
    gate = threading.Event()

    def commit(items: list[int]) -> list[object]:
        gate.wait(5)  # the first commit is "on disk" while the others queue behind it
        batches.append(items)
        return [ValueError(f"odd {i}") if i % 2 else i * 10 for i in items]

    async def main() -> list[object]:
        writer: GroupCommitWriter[int, int] = GroupCommitWriter(commit, name="test-commit")
        tasks = [asyncio.create_task(writer.submit(i)) for i in range(6)]
        await asyncio.sleep(0.05)
        gate.set()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        writer.close()
        return results

    results = asyncio.run(main())
    assert results[0::2] == [0, 20, 40]
    assert [str(r) for r in results[1::2]] == ["odd 1", "odd 3", "odd 5"]  # refused alone, neighbours committed
    assert len(batches) < 6 and sorted(i for b in batches for i in b) == list(range(6))


def test_group_commit_failure_fails_the_whole_batch() -> None:
    def commit(items: list[int]) -> list[object]:
        raise OSError("disk full")

    async def main() -> list[object]:
        writer: GroupCommitWriter[int, int] = GroupCommitWriter(commit, name="test-commit")
        results = await asyncio.gather(*(writer.submit(i) for i in range(3)), return_exceptions=True)
        writer.close()
        return results

    assert all(isinstance(r, OSError) for r in asyncio.run(main()))


def test_ledger_refund_and_settled_go_through_the_one_write_path(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.sqlite")
    with pytest.raises(LedgerConflict):
        ledger.refund(CID, 1)  # no channel: nothing to refund
    ledger.set_settled(CID, 5)  # no channel: nothing recorded, no error
    assert ledger.get(CID) is None
    ledger.record_voucher(CID, 100, "0x01")
    ledger.add_spent(CID, 30)
    assert ledger.refund(CID, 50) == 0  # never below zero
    ledger.set_settled(CID, 80, finalized=True)
    ledger.set_settled(CID, 40)  # the chain only ever grows what is settled
    b = ledger.get(CID)
    assert b is not None and (b.settled, b.finalized) == (80, True)
    ledger.close()


def test_payments_import_no_http_framework() -> None:
    code = ("import sys, dcml.node.payments.gate, dcml.node.payments.metering, dcml.node.receipts.store; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('fastapi', 'starlette', 'uvicorn')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def _meter(ledger: Ledger, *, accepted: int, credit_tokens: int, max_tokens: int) -> tuple[PaidMeter, LedgerWriter]:
    ledger.record_voucher(CID, accepted, "0x01")
    terms = ChannelTerms(escrow="0x" + "00" * 20, model_id="0x" + "11" * 32, price_per_input_token=0,
                         price_per_output_token=PRICE, prepay=0, credit_window=credit_tokens * PRICE,
                         voucher_timeout_s=0.2)
    writer = LedgerWriter(ledger)
    paid = PaidRequest(CID, terms, accepted=accepted, spent=0, max_tokens=max_tokens)
    return PaidMeter(paid, writer, Funds(), lambda reason, message: PaymentNeeded(message, code=reason)), writer


def test_meter_reserves_a_block_and_the_receipt_states_the_exact_cost(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.sqlite")

    async def main() -> None:
        meter, writer = _meter(ledger, accepted=1000 * PRICE, credit_tokens=4, max_tokens=100)
        assert await meter.on_chunk(1) is PAID
        assert ledger.get(CID).spent == (1 + RESERVE_TOKENS) * PRICE  # one commit paid ahead for a block
        for _ in range(RESERVE_TOKENS):
            assert await meter.on_chunk(1) is PAID  # from the reservation: no write
        assert ledger.get(CID).spent == (1 + RESERVE_TOKENS) * PRICE
        assert await meter.on_chunk(2) is PAID
        await meter.finish()  # the unused reservation goes back before the receipt
        served = RESERVE_TOKENS + 3
        assert meter.output_tokens == served
        assert meter.receipt_fields() == {"channel_id": CID, "cost": served * PRICE, "cumulative_spent": served * PRICE}
        assert ledger.get(CID).spent == served * PRICE
        writer.close()

    asyncio.run(main())
    ledger.close()


def test_meter_near_the_credit_limit_charges_exactly_then_pauses_and_stops(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.sqlite")

    async def main() -> None:
        meter, writer = _meter(ledger, accepted=10 * PRICE, credit_tokens=4, max_tokens=100)
        for _ in range(14):  # 10 paid + 4 on credit: no reservation may take the credit past its bound
            verdict = await meter.on_chunk(1)
            assert verdict.paid
        assert ledger.get(CID).spent <= (10 + 4) * PRICE
        verdict = await meter.on_chunk(1)
        assert not verdict.paid and verdict.ask is not None and verdict.ask.required_cumulative == 15 * PRICE
        verdict = await meter.on_chunk(1)  # nobody pays within the voucher timeout
        assert verdict.stop
        await meter.finish()
        assert ledger.get(CID).spent == meter.paid.cost == 14 * PRICE
        writer.close()

    asyncio.run(main())
    ledger.close()


def test_non_streamed_answer_is_charged_exactly_without_a_reservation(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.sqlite")

    async def main() -> None:
        meter, writer = _meter(ledger, accepted=1000 * PRICE, credit_tokens=4, max_tokens=100)
        await meter.charge_all(6)  # no `finish` follows a non-streamed answer: nothing may stay reserved
        assert ledger.get(CID).spent == meter.paid.cost == 6 * PRICE and meter.paid.precharged == 0
        writer.close()

    asyncio.run(main())
    ledger.close()


def test_non_streamed_answer_the_channel_cannot_pay_is_refunded(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.sqlite")

    async def main() -> None:
        meter, writer = _meter(ledger, accepted=5 * PRICE, credit_tokens=0, max_tokens=100)
        with pytest.raises(PaymentNeeded) as exc:
            await meter.charge_all(6)
        assert exc.value.code == "insufficient_funds"
        assert ledger.get(CID).spent == 0 and meter.paid.cost == 0
        writer.close()

    asyncio.run(main())
    ledger.close()


def test_ledger_writer_groups_vouchers_in_one_commit(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.sqlite")

    async def main() -> None:
        writer = LedgerWriter(ledger)
        ops = [VoucherOp("0x" + f"{i:064x}", 10 + i, "0x01") for i in range(1, 33)]
        balances = await asyncio.gather(*(writer.write(op) for op in ops))
        assert [b.accepted for b in balances] == [10 + i for i in range(1, 33)]
        writer.close()

    asyncio.run(main())
    assert len(ledger.channels()) == 32
    ledger.close()


def test_pre_encoded_chunks_are_the_bytes_the_full_encoder_writes() -> None:
    from dcml.node.api.openai_plan import Plan
    from dcml.node.api.openai_shapes import Shapes, _json
    from dcml.node.engine.base import GenerationRequest, SamplingParams, TokenChunk

    for kind in ("chat", "completion"):
        shapes = Shapes(Plan(kind, 'm"odel', GenerationRequest(prompt="", params=SamplingParams(max_tokens=1)), 1,
                             True, False))
        for text in ["hi", "", 'é"\\\n\u2028 😀', "\x00\x1f</script>"]:
            choice: dict = ({"index": 0, "delta": {"content": text}, "logprobs": None, "finish_reason": None}
                            if kind == "chat" else
                            {"index": 0, "text": text, "logprobs": None, "finish_reason": None, "stop_reason": None})
            obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
            want = _json({"id": shapes.id, "object": obj, "created": shapes.created, "model": 'm"odel',
                          "choices": [choice]})
            assert shapes.chunk(TokenChunk(text=text, tokens=1)) == want
