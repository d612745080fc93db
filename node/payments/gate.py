"""The payment gate: admits a paid request, charges its tokens before they are sent, and pauses a
stream that reaches the end of what is paid plus the credit window until a voucher arrives.

Money rules (ARCHITECTURE.md, "Paying over HTTP"):
- a request is admitted only if `accepted − spent` covers its prompt plus the prepay (for a
  non-streamed request: plus its whole `max_tokens`, since it cannot pause);
- every charge is committed to the ledger (fsync) *before* the tokens it pays for leave the node;
  concurrent vouchers and charges share one commit (`LedgerWriter`), so a commit costs each stream one
  fsync wait however many streams there are;
- output may run at most `creditWindow` past what is accepted: the node's whole exposure.

The signed acceptance (the node's promise to answer by a deadline, which a client can take to the SLA
court) is stored durably before it leaves, so the node can always answer a dispute about it; that write
shares the admission's wait with the ledger commit.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import anyio
from eth_account.signers.local import LocalAccount
from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool
from pydantic import ValidationError
from web3 import Web3

from client.channel import ChannelState
from client.receipts import Acceptance, ReceiptDomain, SignedAcceptance, sign_acceptance
from client.voucher import MalformedVoucher, Voucher
from client.x402 import (
    ACCEPTANCE_HEADER,
    PAYMENT_REQUIRED,
    PAYMENT_RESPONSE,
    PAYMENT_SIGNATURE,
    ChannelTerms,
    NeedVoucher,
    PaymentRequired,
    PaymentRequirement,
    PaymentResponse,
)
from node.api.errors import APIError, internal_error
from node.config import PaymentsConfig
from node.payments.ledger import ChannelBalance, ChargeOp, Ledger, LedgerConflict, LedgerOp, VoucherOp
from node.payments.service import Payments, payments_router
from node.payments.verifier import VoucherRejected


class PaymentNeeded(APIError):
    """402 with the x402 `PAYMENT-REQUIRED` header saying what would admit the request."""

    status = 402
    type = "payment_required"


RecordAcceptance = Callable[[SignedAcceptance], Awaitable[None]]


class LedgerWriter:
    """Group commit: vouchers and charges that arrive while one commit is on disk go in the next one."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self._pending: list[tuple[list[LedgerOp], asyncio.Future[list[ChannelBalance]]]] = []
        self._flusher: asyncio.Task[None] | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ledger-writer")

    async def write(self, op: LedgerOp) -> ChannelBalance:
        """The channel's balance once `op` is durable; raises the LedgerConflict that refused it."""
        return (await self.write_many([op]))[0]

    async def write_many(self, ops: list[LedgerOp]) -> list[ChannelBalance]:
        """Several ops in the same commit, all or nothing: if one is refused none of them is applied."""
        fut: asyncio.Future[list[ChannelBalance]] = asyncio.get_running_loop().create_future()
        self._pending.append((ops, fut))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())
        return await fut

    async def _flush(self) -> None:
        loop = asyncio.get_running_loop()
        while self._pending:
            batch, self._pending = self._pending, []
            try:
                results = await loop.run_in_executor(self._executor, self.ledger.apply_groups,
                                                     [ops for ops, _ in batch])
            except Exception as exc:  # nothing in the batch was committed
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            for (_, fut), result in zip(batch, results, strict=True):
                if fut.done():
                    continue
                if isinstance(result, LedgerConflict):
                    fut.set_exception(result)
                else:
                    fut.set_result(result)

    def close(self) -> None:
        self._executor.shutdown(wait=True)


@dataclass
class PaidRequest:
    """One admitted request's account with its channel."""

    channel_id: str
    price: ChannelTerms
    accepted: int
    spent: int  # the channel's cumulative spent after this request's latest charge
    cost: int = 0  # what this request has been charged so far
    headers: dict[str, str] = field(default_factory=dict)
    asked_at: int = -1  # the accepted amount when we last asked for a voucher (one ask per level)
    precharged: int = 0  # output tokens charged at admission, in the same commit (saves one before the 1st token)
    output_tokens: int = 0  # output tokens charged (and counted as served): what the receipt's outputTokens says


class PaymentGate:
    def __init__(self, payments: Payments, config: PaymentsConfig, *, signer: LocalAccount,
                 receipt_domain: ReceiptDomain, model_ids: dict[str, str],
                 record_acceptance: RecordAcceptance | None = None) -> None:
        self.payments = payments
        self.config = config
        self.signer = signer
        self.receipt_domain = receipt_domain
        self.model_ids = model_ids  # served model name -> bytes32 hex (the channel's modelId must match)
        # Durable store of signed acceptances (ReceiptStore.put_acceptance); None: not kept (tests, no SLA).
        self.record_acceptance = record_acceptance
        dep = payments.deployment
        self.token = Web3.to_checksum_address(config.token or dep.token)
        self.writer = LedgerWriter(payments.ledger)
        self._funds: dict[str, asyncio.Event] = {}  # set when a voucher raises a channel's accepted amount

    # -- terms -----------------------------------------------------------------------------------

    def terms(self, model: str) -> ChannelTerms:
        price = self.config.prices[model]
        out = price.price_per_output_token
        return ChannelTerms(escrow=self.payments.deployment.payment_channels, modelId=self.model_ids[model],
                            pricePerInputToken=price.price_per_input_token, pricePerOutputToken=out,
                            prepay=self.config.prepay_tokens * out, creditWindow=self.config.credit_tokens * out,
                            voucherTimeoutSeconds=self.config.voucher_timeout_s)

    def requirement(self, model: str) -> PaymentRequirement:
        return PaymentRequirement(network=f"eip155:{self.payments.deployment.chain_id}", asset=self.token,
                                  payTo=self.payments.payee.address, maxTimeoutSeconds=self.config.response_deadline_s,
                                  extra=self.terms(model))

    def needed(self, model: str, error: str, message: str, required: int | None = None) -> PaymentNeeded:
        body = PaymentRequired(error=error, message=message, accepts=[self.requirement(model)],
                               requiredCumulative=required)
        return PaymentNeeded(message, code=error, headers={PAYMENT_REQUIRED: body.to_header()})

    # -- admission -------------------------------------------------------------------------------

    async def admit(self, *, headers, model: str, request_hash: str, prompt_tokens: int, max_tokens: int,
                    stream: bool, accepted_at: float | None = None) -> PaidRequest:
        """Admit and charge a paid request, or raise `PaymentNeeded`. `accepted_at` (unix seconds; default now)
        is signed in the acceptance: pass the receipt's, so both select the same SLA terms."""
        header = headers.get(PAYMENT_SIGNATURE)
        terms = self.terms(model)
        if not header:
            raise self.needed(model, "payment_required", "this request must be paid: open a channel to payTo and "
                              f"send a voucher in the {PAYMENT_SIGNATURE} header")
        try:
            voucher = Voucher.from_header(header)
        except (MalformedVoucher, ValidationError, ValueError) as exc:
            raise self.needed(model, "malformed", f"{PAYMENT_SIGNATURE} is not a voucher: {exc}") from None
        try:
            state = await run_in_threadpool(self.payments.verifier.verify, voucher, allow_equal=True)
        except VoucherRejected as exc:
            raise self.needed(model, exc.reason, str(exc)) from None
        if state.token.lower() != self.token.lower():
            raise self.needed(model, "wrong_token", f"channel pays in {state.token}; this node takes {self.token}")
        if "0x" + state.params.model_id.hex() != terms.model_id.lower():
            raise self.needed(model, "wrong_model", f"channel is for model 0x{state.params.model_id.hex()}, "
                              f"not {model} ({terms.model_id}); open a channel for this model")
        settle_first = await self._contract_signer(model, state)
        balance = self.payments.ledger.get(voucher.channel_id)
        accepted = max(voucher.cumulative_amount, balance.accepted if balance else 0)
        spent_before = balance.spent if balance else 0
        prompt_cost = prompt_tokens * terms.price_per_input_token
        ahead = max_tokens * terms.price_per_output_token if not stream else min(
            terms.prepay, max_tokens * terms.price_per_output_token)
        if accepted - spent_before < prompt_cost + ahead:
            required = spent_before + prompt_cost + ahead
            raise self.needed(model, "insufficient_funds", f"channel has {accepted - spent_before} available; this "
                              f"request needs {prompt_cost + ahead} ahead: sign a voucher for {required}", required)
        # One commit for the new voucher (if any) and the prompt's charge.
        ops: list[LedgerOp] = []
        new_voucher = balance is None or voucher.cumulative_amount > balance.accepted
        if new_voucher:
            ops.append(VoucherOp(voucher.channel_id, voucher.cumulative_amount, voucher.signature))
        ops.append(ChargeOp(voucher.channel_id, prompt_cost))
        if new_voucher and settle_first:
            await self._settle_first(voucher, model)
        first_token = terms.price_per_output_token if stream and max_tokens > 0 else 0
        if first_token:  # the first output token rides on the admission commit (it may use the credit window)
            ops.append(ChargeOp(voucher.channel_id, first_token, terms.credit_window))
        # Signed before the commit so that its durable write shares the wait with the ledger's.
        now = int(time.time())
        acceptance = sign_acceptance(Acceptance(requestHash=request_hash, channelId=voucher.channel_id,
                                                acceptedAt=now if accepted_at is None else int(accepted_at),
                                                deadline=now + self.config.response_deadline_s),
                                     self.signer, self.receipt_domain)
        charged = prompt_cost + first_token
        after = await self._commit_admission(model, voucher.channel_id, ops, acceptance, charged, prompt_cost + ahead)
        if new_voucher and settle_first:
            await run_in_threadpool(self.payments.ledger.set_settled, voucher.channel_id, voucher.cumulative_amount)
        if new_voucher:  # streams of this channel paused for funds may go on
            self._notify(voucher.channel_id)
        spent = after.spent
        paid = PaidRequest(voucher.channel_id, terms, after.accepted, spent, charged,
                           precharged=1 if first_token else 0)
        paid.headers = {
            ACCEPTANCE_HEADER: base64.b64encode(acceptance.model_dump_json(by_alias=True).encode()).decode(),
            PAYMENT_RESPONSE: PaymentResponse(channelId=voucher.channel_id, accepted=after.accepted,
                                              spent=spent).to_header(),
        }
        return paid

    async def _commit_admission(self, model: str, channel_id: str, ops: list[LedgerOp],
                                acceptance: SignedAcceptance, charged: int, need: int) -> ChannelBalance:
        """The admission's ledger ops and the acceptance's store write, concurrently; both must succeed
        before anything is sent. An acceptance stored for a refused request is harmless: it never left."""
        writes = [self.writer.write_many(ops)]
        if self.record_acceptance is not None:
            writes.append(self.record_acceptance(acceptance))
        ledger, *stored = await asyncio.gather(*writes, return_exceptions=True)
        if isinstance(ledger, LedgerConflict) and ledger.reason == "not_increasing" and isinstance(ops[0], VoucherOp):
            # A concurrent request on the channel recorded this voucher (or a higher one) first. It was valid when
            # verified and still names the channel: admit on what is held now (the charges re-check the funds).
            (ledger,) = await asyncio.gather(self.writer.write_many(ops[1:]), return_exceptions=True)
        if isinstance(ledger, LedgerConflict):  # a concurrent request or voucher on the channel got there first
            now = self.payments.ledger.get(channel_id)  # ask for what would admit it now, not before the race
            raise self.needed(model, ledger.reason, str(ledger), (now.spent if now else 0) + need) from None
        if isinstance(ledger, BaseException):
            raise ledger
        if stored and isinstance(stored[0], BaseException):  # charged, but the promise is not durable: undo it
            await run_in_threadpool(self.payments.ledger.refund, channel_id, charged)
            raise internal_error(stored[0], "acceptance_store") from None
        return ledger[-1]

    # -- charging output -------------------------------------------------------------------------

    async def charge_output(self, paid: PaidRequest, tokens: int) -> tuple[bool, NeedVoucher | None]:
        """Charge `tokens` of output, durably. Returns (charged, ask):
        - charged is False when spent would pass accepted + credit: nothing is charged, the caller must
          send `ask` and `wait_and_charge`;
        - otherwise `ask`, if set, is an early request for a voucher, made once per accepted level when
          half the credit window is in use: the client pays while the other half hides the round trip."""
        # Shielded: a charge that lands is always counted in this request's account (and so in its receipt),
        # even when the client hangs up while the commit is on disk.
        with anyio.CancelScope(shield=True):
            used = min(tokens, paid.precharged)  # already charged at admission
            amount = (tokens - used) * paid.price.price_per_output_token
            accepted = paid.accepted
            if amount:
                try:
                    after = await self.writer.write(ChargeOp(paid.channel_id, amount, paid.price.credit_window))
                except LedgerConflict as exc:
                    if exc.reason != "insufficient_funds":
                        raise
                    # Ask from the channel's spent now: other streams of the channel charge too, and a voucher
                    # sized from this request's last view would be stale (lower than the node already holds).
                    now = self.payments.ledger.get(paid.channel_id)
                    spent = max(now.spent if now else 0, paid.spent)
                    return False, NeedVoucher(channelId=paid.channel_id, spent=spent, requiredCumulative=spent + amount)
                paid.spent, accepted = after.spent, after.accepted
                paid.accepted = accepted
            paid.precharged -= used
            paid.cost += amount
            paid.output_tokens += tokens
        if not amount:
            return True, None
        # Ask early, once half the credit window is in use: the other half covers the round trip.
        if paid.spent - accepted >= max(paid.price.credit_window // 2, 1) and paid.asked_at != accepted:
            paid.asked_at = accepted
            return True, NeedVoucher(channelId=paid.channel_id, spent=paid.spent, requiredCumulative=paid.spent)
        return True, None

    async def wait_and_charge(self, paid: PaidRequest, tokens: int, *, deadline: float | None = None,
                              ask_after: float | None = None, asked: int = 0) -> bool | NeedVoucher:
        """After a blocking payment-need-voucher: wait for vouchers until `tokens` can be charged (True) or
        `deadline` (monotonic; default: the voucher timeout from now) passes (False: the stream ends). With
        `ask_after`, a stream still short after that long gets a fresh ask to send before calling again with the
        same deadline, if the channel's other streams spent since it asked for `asked` (so the voucher it asked
        for no longer covers it)."""
        deadline = time.monotonic() + paid.price.voucher_timeout_s if deadline is None else deadline
        ask_at = time.monotonic() + ask_after if ask_after else deadline
        while True:
            event = self._funds.setdefault(paid.channel_id, asyncio.Event())
            charged, ask = await self.charge_output(paid, tokens)
            if charged:
                return True
            now = time.monotonic()
            if now >= deadline:
                return False
            if now >= ask_at and ask is not None and ask.required_cumulative > asked:
                return ask
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), min(deadline, ask_at) - now)

    async def refund(self, paid: PaidRequest) -> None:
        """Undo a request's charges when it failed before any output left (an engine error or overload)."""
        if paid.cost:
            await run_in_threadpool(self.payments.ledger.refund, paid.channel_id, paid.cost)
            paid.cost, paid.precharged, paid.output_tokens = 0, 0, 0

    async def refund_unused(self, paid: PaidRequest) -> None:
        """A stream that ended before using its precharged output token gives it back (before the receipt)."""
        with anyio.CancelScope(shield=True):  # a refund that lands is always reflected in the receipt
            if paid.precharged:
                amount = paid.precharged * paid.price.price_per_output_token
                paid.spent = await run_in_threadpool(self.payments.ledger.refund, paid.channel_id, amount)
                paid.cost -= amount
                paid.precharged = 0

    async def _record(self, voucher: Voucher, model: str | None = None) -> ChannelBalance:
        """Persist a verified voucher (group commit), then wake streams waiting on its channel."""
        try:
            balance = await self.writer.write(VoucherOp(voucher.channel_id, voucher.cumulative_amount,
                                                        voucher.signature))
        except LedgerConflict as exc:  # a concurrent voucher for the channel got there first
            if model is not None:
                raise self.needed(model, exc.reason, str(exc)) from None
            raise VoucherRejected(exc.reason, str(exc)) from None
        self._notify(voucher.channel_id)
        return balance

    def _notify(self, channel_id: str) -> None:
        event = self._funds.pop(channel_id.lower(), None)
        if event is not None:
            event.set()  # wakes every stream of this channel; each re-checks its own charge

    # -- the vouchers endpoint -------------------------------------------------------------------

    def router(self) -> APIRouter:
        """The vouchers endpoint with this gate's group commit (and wake-up of paused streams)."""
        return payments_router(self.payments, accept=self._accept)

    async def _accept(self, voucher: Voucher) -> ChannelBalance:
        state = await run_in_threadpool(self.payments.verifier.verify, voucher)
        if not await self._contract_signer(None, state):
            return await self._record(voucher)
        await self._settle_first(voucher, None)
        balance = await self._record(voucher)
        await run_in_threadpool(self.payments.ledger.set_settled, voucher.channel_id, voucher.cumulative_amount)
        return balance

    # -- contract (ERC-1271) signers ----------------------------------------------------------

    async def _contract_signer(self, model: str | None, state: ChannelState) -> bool:
        """Whether the channel's signer is a contract, whose vouchers must then be settled before they count
        (`contract_signers = "settle_first"`); refused under the default "refuse". A contract can revoke its
        signatures after being served, and a voucher that no longer verifies on-chain cannot be settled."""
        chain, signer = self.payments.chain, state.authorized_signer
        known = chain.known_contract(signer)  # cached: no thread hop on the admission path
        if not (known if known is not None else await run_in_threadpool(chain.is_contract, signer)):
            return False
        if self.config.contract_signers == "refuse":
            message = (f"channel signer {state.authorized_signer} is a contract (ERC-1271); this node serves only "
                       "channels whose session signer is a key: open one with an EOA session key")
            if model is None:
                raise VoucherRejected("contract_signer", message)
            raise self.needed(model, "contract_signer", message)
        return True

    async def _settle_first(self, voucher: Voucher, model: str | None) -> None:
        try:
            await run_in_threadpool(self.payments.worker.settle_now, voucher.channel_id, voucher.cumulative_amount,
                                    voucher.signature)
        except Exception as exc:  # a revoked or refusing contract signer: the voucher is worth nothing
            message = (f"the channel's contract signer did not let this voucher settle on-chain ({type(exc).__name__}"
                       "); it is not counted")
            if model is None:
                raise VoucherRejected("signer_refused", message) from None
            raise self.needed(model, "signer_refused", message) from None

    def close(self) -> None:
        self.writer.close()

