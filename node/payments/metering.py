"""Metering one answer: the HTTP stream calls `on_chunk` for each chunk the engine yields, and the meter says
whether the chunk is paid (send it), whether to ask the payer for a voucher first, or whether the stream must
pause for one or stop. Every charge is durable before the tokens it pays for may leave the node.

`OutputMeter` meters a free request (it only counts); `PaidMeter` charges an admitted request's channel
(`gate.PaymentGate.admit` makes it). Output may run at most `creditWindow` past what is accepted, and never
more past it than the channel has paid in all (`ChargeOp.earned_credit`): the node's whole exposure.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import anyio

from dcml.client.wire.errors import PaymentReason
from dcml.client.wire.x402 import (
    ACCEPTANCE_HEADER,
    PAYMENT_RESPONSE,
    SCHEME,
    ChannelFigures,
    ChannelTerms,
    NeedVoucher,
    SettlementResponse,
)
from dcml.node.payments.errors import PaymentNeeded
from dcml.node.payments.ledger import ChargeOp, LedgerConflict, LedgerWriter, RefundOp

# The gate's 402 for this request's model: (reason, message) -> the PaymentNeeded to raise.
Needed = Callable[[str, str], PaymentNeeded]
REASK_S = 1.0  # a stream paused for funds asks again this often (other streams of its channel may spend them)
# Output is charged in blocks: a commit reserves up to this many tokens beyond the chunk it pays for, so a stream
# waits on the disk once per block rather than once per token. The reservation never passes what the ledger
# allows (accepted + the earned credit window) nor the request's max_tokens; `finish` releases what was not
# used before the receipt is signed, so the receipt (and what settlement takes) is the exact cost. Bound: a
# stream holds at most RESERVE_TOKENS unserved tokens as spent at any time (also after a crash, when the
# ledger keeps them: still within the credit window the node extends anyway).
RESERVE_TOKENS = 16


@dataclass
class PaidRequest:
    """One admitted request's account with its channel."""

    channel_id: str
    price: ChannelTerms
    accepted: int
    spent: int  # the channel's cumulative spent after this request's latest charge
    cost: int = 0  # what this request has been charged so far
    acceptance: str | None = None  # the signed acceptance, base64 (X-DCML-Acceptance); None without SLA terms
    settlement: dict = field(default_factory=dict)  # SettlementResponse fields other than the figures
    asked_at: int = -1  # the accepted amount when we last asked for a voucher (one ask per level)
    precharged: int = 0  # output tokens charged ahead, not yet served (the 1st at admission, then reserved blocks)
    max_tokens: int = 0  # the answer's cap: no output token is reserved past it
    output_tokens: int = 0  # output tokens charged (and counted as served): what the receipt's outputTokens says
    payment_response: str | None = None  # batch-settlement: fixed at admission (the reservation, see batch.py)

    @property
    def headers(self) -> dict[str, str]:
        """The response's payment headers with the figures as they stand now: read after the last charge
        (a non-streamed answer) they are the request's final ones."""
        response = self.payment_response
        if response is None:
            figures = ChannelFigures(channel_id=self.channel_id, accepted=self.accepted, spent=self.spent,
                                     cost=self.cost)
            response = SettlementResponse(**self.settlement, amount=str(self.cost),
                                          extensions={SCHEME: figures.to_json()}).to_header()
        headers = {PAYMENT_RESPONSE: response}
        if self.acceptance is not None:
            headers[ACCEPTANCE_HEADER] = self.acceptance
        return headers


class Funds:
    """Wakes the streams of a channel paused for funds when a voucher raises its accepted amount."""

    def __init__(self) -> None:
        self._events: dict[str, asyncio.Event] = {}

    def event(self, channel_id: str) -> asyncio.Event:
        return self._events.setdefault(channel_id.lower(), asyncio.Event())

    def notify(self, channel_id: str) -> None:
        event = self._events.pop(channel_id.lower(), None)
        if event is not None:
            event.set()  # wakes every stream of this channel; each re-checks its own charge


@dataclass(frozen=True)
class Verdict:
    """What to do with a chunk: send `ask` (a payment-need-voucher) first if set; then send the chunk if `paid`,
    end the stream with payment_timeout if `stop`, else call `on_chunk` again with the same chunk (paused)."""

    paid: bool = True
    ask: NeedVoucher | None = None
    stop: bool = False


PAID = Verdict()
STOP = Verdict(paid=False, stop=True)


class OutputMeter:
    """A free request's meter: every chunk is paid; it counts the output tokens for the receipt."""

    paid: PaidRequest | None = None
    voucher_timeout_s = 0.0

    def __init__(self) -> None:
        self._output_tokens = 0
        self.paused_s = 0.0  # time spent waiting for the payer's vouchers: the client's, not the node's

    @property
    def output_tokens(self) -> int:
        return self._output_tokens

    @property
    def headers(self) -> dict[str, str]:
        return {}

    def receipt_fields(self) -> dict:
        """The receipt's payment fields (channel, cost, cumulative spent): none for a free request."""
        return {}

    async def on_chunk(self, tokens: int) -> Verdict:
        self._output_tokens += tokens
        return PAID

    async def charge_all(self, tokens: int) -> None:
        """A non-streamed answer's output, charged at once when it is complete; raises PaymentNeeded when the
        channel cannot pay it (then nothing is charged, and nothing may be sent)."""
        self._output_tokens += tokens

    async def refund(self) -> None:
        """Undo every charge: the answer failed before any of it was delivered."""

    async def finish(self) -> None:
        """The answer ended: give back what was charged ahead and not used (before the receipt)."""


class PaidMeter(OutputMeter):
    def __init__(self, paid: PaidRequest, writer: LedgerWriter, funds: Funds, needed: Needed) -> None:
        super().__init__()
        self.paid: PaidRequest = paid
        self._needed = needed
        self.voucher_timeout_s = paid.price.voucher_timeout_s
        self._writer, self._funds = writer, funds
        self._deadline: float | None = None  # while paused for funds: when the stream stops (monotonic)
        self._paused_at = 0.0
        self._asked = 0  # requiredCumulative of the last ask sent while paused

    @property
    def output_tokens(self) -> int:
        return self.paid.output_tokens

    @property
    def headers(self) -> dict[str, str]:
        return self.paid.headers

    def receipt_fields(self) -> dict:
        return {"channel_id": self.paid.channel_id, "cost": self.paid.cost, "cumulative_spent": self.paid.spent}

    async def on_chunk(self, tokens: int) -> Verdict:
        paid = self.paid
        if self._deadline is None and tokens <= paid.precharged:  # paid ahead (a reserved block): no write
            paid.precharged -= tokens
            paid.output_tokens += tokens
            return PAID
        if self._deadline is None:
            charged, ask = await self._charge(tokens)
            if charged:
                return PAID if ask is None else Verdict(ask=ask)
            assert ask is not None
            self._paused_at = time.perf_counter()
            self._deadline = time.monotonic() + self.voucher_timeout_s
            self._asked = ask.required_cumulative
            return Verdict(paid=False, ask=ask)
        waited = await self._wait_and_charge(tokens)
        if isinstance(waited, NeedVoucher):  # other streams of the channel spent what we asked for: ask again
            self._asked = waited.required_cumulative
            return Verdict(paid=False, ask=waited)
        self.paused_s += time.perf_counter() - self._paused_at
        self._deadline = None
        return PAID if waited else STOP

    async def charge_all(self, tokens: int) -> None:
        if not tokens or (await self._charge(tokens, reserve=False))[0]:
            return
        # Admission reserved max_tokens, so only a concurrent request on the same channel gets here.
        await self.refund()  # nothing is delivered, so nothing is charged
        raise self._needed("insufficient_funds", "the channel ran out while answering (a concurrent request spent "
                           "it); top it up with a higher voucher and retry")

    async def _charge(self, tokens: int, *, reserve: bool = True) -> tuple[bool, NeedVoucher | None]:
        """Charge `tokens` of output, durably. Returns (charged, ask):
        - charged is False when spent would pass accepted + credit: nothing is charged, the caller must
          send `ask` and wait for funds;
        - otherwise `ask`, if set, is an early request for a voucher, made once per accepted level when
          half the credit window is in use: the client pays while the other half hides the round trip."""
        paid = self.paid
        # Shielded: a charge that lands is always counted in this request's account (and so in its receipt),
        # even when the client hangs up while the commit is on disk.
        with anyio.CancelScope(shield=True):
            price = paid.price.price_per_output_token
            used = min(tokens, paid.precharged)  # already charged ahead
            amount = (tokens - used) * price
            accepted = paid.accepted
            extra = 0  # tokens reserved beyond this chunk, when the channel's funds (as last seen) allow them
            if amount and reserve:
                extra = max(0, min(RESERVE_TOKENS, paid.max_tokens - paid.output_tokens - tokens))
                limit = paid.accepted + min(paid.price.credit_window, paid.accepted)
                if paid.spent + amount + extra * price > limit:
                    extra = 0  # near the end of what is paid: charge exactly, so pauses and asks come as before
            if amount:
                try:
                    after = await self._writer.write(ChargeOp(paid.channel_id, amount + extra * price,
                                                              paid.price.credit_window, earned_credit=True))
                except LedgerConflict as exc:
                    if exc.reason != PaymentReason.INSUFFICIENT_FUNDS:
                        raise
                    # Ask from the channel's spent now: other streams of the channel charge too, and a voucher
                    # sized from this request's last view would be stale (lower than the node already holds).
                    now = self._writer.ledger.get(paid.channel_id)
                    spent = max(now.spent if now else 0, paid.spent)
                    if extra:  # others spent since we looked: charge exactly instead
                        paid.spent = spent
                        return await self._charge(tokens, reserve=False)
                    return False, NeedVoucher(channel_id=paid.channel_id, spent=spent,
                                              required_cumulative=spent + amount)
                paid.spent, accepted = after.spent, after.accepted
                paid.accepted = accepted
            paid.precharged += extra - used
            paid.cost += amount + extra * price
            paid.output_tokens += tokens
        if not amount:
            return True, None
        # Ask early, once half the credit window is in use: the other half covers the round trip.
        if paid.spent - accepted >= max(paid.price.credit_window // 2, 1) and paid.asked_at != accepted:
            paid.asked_at = accepted
            return True, NeedVoucher(channel_id=paid.channel_id, spent=paid.spent,
                                     required_cumulative=paid.spent)
        return True, None

    async def _wait_and_charge(self, tokens: int) -> bool | NeedVoucher:
        """Paused: wait for vouchers until `tokens` can be charged (True) or the deadline passes (False: the stream
        ends). A stream still short after REASK_S gets a fresh ask to send before calling again, if the channel's
        other streams spent since it asked (so the voucher it asked for no longer covers it)."""
        assert self._deadline is not None
        ask_at = time.monotonic() + REASK_S
        while True:
            event = self._funds.event(self.paid.channel_id)
            charged, ask = await self._charge(tokens)
            if charged:
                return True
            now = time.monotonic()
            if now >= self._deadline:
                return False
            if now >= ask_at and ask is not None and ask.required_cumulative > self._asked:
                return ask
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), min(self._deadline, ask_at) - now)

    async def refund(self) -> None:
        paid = self.paid
        with anyio.CancelScope(shield=True):  # a refund that lands is always reflected in the receipt
            if paid.cost:
                paid.spent = (await self._writer.write(RefundOp(paid.channel_id, paid.cost))).spent
                paid.cost, paid.precharged, paid.output_tokens = 0, 0, 0

    async def finish(self) -> None:
        """Give back the output tokens charged ahead and not served (a reservation; the first token of a stream
        that produced none), before the receipt, so the receipt states the exact cost."""
        paid = self.paid
        with anyio.CancelScope(shield=True):  # a refund that lands is always reflected in the receipt
            if paid.precharged:
                amount = paid.precharged * paid.price.price_per_output_token
                paid.spent = (await self._writer.write(RefundOp(paid.channel_id, amount))).spent
                paid.cost -= amount
                paid.precharged = 0
