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
import json
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from eth_account.signers.local import LocalAccount
from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool
from web3 import Web3

from client import safejson
from client.receipts import Acceptance, ReceiptDomain, SignedAcceptance, sign_acceptance
from client.voucher import Voucher
from client.x402 import (
    ACCEPTANCE_HEADER,
    MAX_HEADER_BYTES,
    PAYMENT_REQUIRED,
    PAYMENT_RESPONSE,
    PAYMENT_SIGNATURE,
    SCHEME,
    ChannelFigures,
    ChannelTerms,
    MalformedPayment,
    NeedVoucher,
    OtherRequirement,
    PaymentRequired,
    PaymentRequirement,
    ResourceInfo,
    SettlementResponse,
    parse_payment,
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


class PaymentMalformed(PaymentNeeded):
    """400: the payment header cannot be read (x402 transport: malformed input is a bad request)."""

    status = 400
    type = "invalid_request_error"


if TYPE_CHECKING:
    from node.payments.batch import BatchSettlement

log = logging.getLogger("dcml.payments")

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
    acceptance: str = ""  # the signed acceptance, base64 (X-DCML-Acceptance)
    settlement: dict = field(default_factory=dict)  # SettlementResponse fields other than the figures
    asked_at: int = -1  # the accepted amount when we last asked for a voucher (one ask per level)
    precharged: int = 0  # output tokens charged at admission, in the same commit (saves one before the 1st token)
    writer: LedgerWriter | None = None  # the ledger this request is charged in (batch-settlement has its own)
    payment_response: str | None = None  # batch-settlement: fixed at admission (the reservation, see batch.py)

    @property
    def headers(self) -> dict[str, str]:
        """The response's payment headers with the figures as they stand now: read after the last charge
        (a non-streamed answer) they are the request's final ones."""
        if self.payment_response is not None:
            return {ACCEPTANCE_HEADER: self.acceptance, PAYMENT_RESPONSE: self.payment_response}
        figures = ChannelFigures(channelId=self.channel_id, accepted=self.accepted, spent=self.spent, cost=self.cost)
        settlement = SettlementResponse(**self.settlement, amount=str(self.cost),
                                        extensions={SCHEME: figures.to_json()})
        return {ACCEPTANCE_HEADER: self.acceptance, PAYMENT_RESPONSE: settlement.to_header()}


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
        self._intake = ThreadPoolExecutor(max_workers=8, thread_name_prefix="voucher-intake")
        # x402's batch-settlement, offered beside `channel` where its contract is deployed (batch.py).
        self.batch: BatchSettlement | None = None
        self.batch_writer: LedgerWriter | None = None
        if config.batch_settlement and dep.batch_settlement:
            self._start_batch(payments, config)

    def _start_batch(self, payments: Payments, config: PaymentsConfig) -> None:
        try:  # the x402 SDK is an optional dependency (the `x402` extra)
            from node.payments.batch import BatchSettlement
        except ImportError:
            log.warning("batch-settlement is deployed but the x402 package is missing (pip install 'dcml[x402]'): "
                        "only the channel scheme is offered")
            return
        dep = payments.deployment
        if BatchSettlement.deployed(payments.w3):
            self.batch = BatchSettlement(payments.w3, chain_id=dep.chain_id, token=self.token, payee=payments.payee,
                                         rpc_url=dep.rpc_url, data_dir=payments.ledger.path.parent,
                                         model_registry=dep.model_registry, max_timeout_s=config.response_deadline_s)
            self.batch_writer = LedgerWriter(self.batch.ledger)
            self.batch.start(interval=config.settle_interval_s, threshold=config.settle_threshold)

    # -- terms -----------------------------------------------------------------------------------

    def terms(self, model: str) -> ChannelTerms:
        price = self.config.prices[model]
        out = price.price_per_output_token
        return ChannelTerms(escrow=self.payments.deployment.payment_channels, modelId=self.model_ids[model],
                            pricePerInputToken=price.price_per_input_token, pricePerOutputToken=out,
                            prepay=self.config.prepay_tokens * out, creditWindow=self.config.credit_tokens * out,
                            voucherTimeoutSeconds=self.config.voucher_timeout_s)

    def requirement(self, model: str, amount: int | None = None, channel_id: str | None = None,
                    required: int | None = None) -> PaymentRequirement:
        """The offer; `amount` is what admitting the request needs now (default: a prepay of output)."""
        terms = self.terms(model)
        if required is not None:
            terms = terms.model_copy(update={"channel_id": channel_id, "required_cumulative": required})
        return PaymentRequirement(network=f"eip155:{self.payments.deployment.chain_id}", asset=self.token,
                                  amount=terms.prepay if amount is None else amount,
                                  payTo=self.payments.payee.address, maxTimeoutSeconds=self.config.response_deadline_s,
                                  extra=terms)

    def needed(self, model: str, error: str, message: str, required: int | None = None, *, amount: int | None = None,
               channel_id: str | None = None, resource: str = "", status: type[PaymentNeeded] = PaymentNeeded,
               batch_amount: int | None = None, batch_state: dict | None = None) -> PaymentNeeded:
        accepts: list[PaymentRequirement | OtherRequirement] = [self.requirement(model, amount, channel_id, required)]
        if self.batch is not None and batch_amount is not None:  # the whole request: batch clients cannot top up
            offer = self.batch.requirement(batch_amount, batch_state).model_dump(by_alias=True, exclude_none=True)
            accepts.append(OtherRequirement.model_validate(offer))
        body = PaymentRequired(error=error, resource=ResourceInfo(url=resource or "/", mimeType="application/json"),
                               accepts=accepts)
        return status(message, code=error, headers={PAYMENT_REQUIRED: body.to_header()})

    # -- admission -------------------------------------------------------------------------------

    async def admit(self, *, headers, model: str, request_hash: str, prompt_tokens: int, max_tokens: int,
                    stream: bool, accepted_at: float | None = None, resource: str = "") -> PaidRequest:
        """Admit and charge a paid request, or raise `PaymentNeeded`. `accepted_at` (unix seconds; default now)
        is signed in the acceptance: pass the receipt's, so both select the same SLA terms."""
        header = headers.get(PAYMENT_SIGNATURE)
        terms = self.terms(model)
        prompt_cost = prompt_tokens * terms.price_per_input_token
        ahead = max_tokens * terms.price_per_output_token if not stream else min(
            terms.prepay, max_tokens * terms.price_per_output_token)
        need = prompt_cost + ahead  # what admitting this request needs available on the channel
        worst = prompt_cost + max_tokens * terms.price_per_output_token  # batch-settlement pays it all ahead

        def needed(error: str, message: str, required: int | None = None, channel_id: str | None = None,
                   status: type[PaymentNeeded] = PaymentNeeded, batch_state: dict | None = None) -> PaymentNeeded:
            return self.needed(model, error, message, required, amount=need, channel_id=channel_id,
                               resource=resource, status=status, batch_amount=worst, batch_state=batch_state)

        if not header:
            raise needed("payment_required", "this request must be paid: open a channel to payTo and send a "
                         f"PaymentPayload with a voucher in the {PAYMENT_SIGNATURE} header")
        if self.batch is not None:
            from node.payments.batch import parse_batch_payment

            try:
                batch_payment = parse_batch_payment(_decode(header))
            except ValueError as exc:
                raise needed("malformed_payment", str(exc), status=PaymentMalformed) from None
            if batch_payment is not None:
                return await self._admit_batch(batch_payment, needed, model=model, request_hash=request_hash,
                                               prompt_cost=prompt_cost, worst=worst, stream=stream,
                                               accepted_at=accepted_at)
        try:
            voucher, chosen = parse_payment(header)
        except MalformedPayment as exc:
            raise needed("malformed_payment", str(exc), status=PaymentMalformed) from None
        if chosen is not None and not chosen.matches(self.requirement(model)):
            raise needed("accepted_mismatch", "the PaymentPayload's `accepted` is not this node's offer for "
                         f"{model} (scheme, network, asset, payTo, escrow and modelId must match accepts[0])")
        try:
            state = await run_in_threadpool(self.payments.verifier.verify, voucher, allow_equal=True)
        except VoucherRejected as exc:
            raise needed(exc.reason, str(exc)) from None
        if state.token.lower() != self.token.lower():
            raise needed("wrong_token", f"channel pays in {state.token}; this node takes {self.token}")
        if "0x" + state.params.model_id.hex() != terms.model_id.lower():
            raise needed("wrong_model", f"channel is for model 0x{state.params.model_id.hex()}, "
                         f"not {model} ({terms.model_id}); open a channel for this model")
        balance = self.payments.ledger.get(voucher.channel_id)
        accepted = max(voucher.cumulative_amount, balance.accepted if balance else 0)
        spent_before = balance.spent if balance else 0
        if accepted - spent_before < need:
            required = spent_before + need
            raise needed("insufficient_funds", f"channel has {accepted - spent_before} available; this "
                         f"request needs {need} ahead: sign a voucher for {required}", required, voucher.channel_id)
        # One commit for the new voucher (if any) and the prompt's charge.
        ops: list[LedgerOp] = []
        new_voucher = balance is None or voucher.cumulative_amount > balance.accepted
        if new_voucher:
            ops.append(VoucherOp(voucher.channel_id, voucher.cumulative_amount, voucher.signature))
        ops.append(ChargeOp(voucher.channel_id, prompt_cost))
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
        after = await self._commit_admission(model, voucher.channel_id, ops, acceptance, charged,
                                             spent_before + prompt_cost + ahead)
        if new_voucher:  # streams of this channel paused for funds may go on
            self._notify(voucher.channel_id)
        spent = after.spent
        # `transaction`: the commitment identifier of the channel's accepted voucher, its EIP-712 digest.
        commitment = self.payments.verifier.domain.digest(voucher.channel_id_bytes, after.accepted)
        settlement = {"transaction": "0x" + commitment.hex(), "payer": state.payer,
                      "network": f"eip155:{self.payments.deployment.chain_id}"}
        return PaidRequest(voucher.channel_id, terms, after.accepted, spent, charged,
                           acceptance=base64.b64encode(acceptance.model_dump_json(by_alias=True).encode()).decode(),
                           settlement=settlement, precharged=1 if first_token else 0)

    async def _admit_batch(self, payment, needed, *, model: str, request_hash: str, prompt_cost: int, worst: int,
                           stream: bool, accepted_at: float | None) -> PaidRequest:
        """Admit a batch-settlement payment: the SDK's facilitator verifies it (and submits a deposit), then the
        voucher's ceiling must cover what was served plus this request's worst case; charged per token as below."""
        from node.payments.batch import BatchRejected

        assert self.batch is not None and self.batch_writer is not None
        terms = self.terms(model)
        try:
            bv = await run_in_threadpool(self.batch.verify, payment, worst, terms.model_id)
        except BatchRejected as exc:
            raise needed(exc.reason, f"batch-settlement payment refused: {exc}") from None
        balance = self.batch.ledger.get(bv.channel_id)
        spent_before = balance.spent if balance else 0
        if bv.max_claimable - spent_before < worst:
            state = await run_in_threadpool(self.batch.channel_state, bv.channel_id)
            raise needed("insufficient_funds", f"voucher ceiling {bv.max_claimable} leaves "
                         f"{bv.max_claimable - spent_before}; this request needs {worst}", batch_state=state)
        ops: list[LedgerOp] = []
        if balance is None or bv.max_claimable > balance.accepted:
            ops.append(VoucherOp(bv.channel_id, bv.max_claimable, bv.signature))
        ops.append(ChargeOp(bv.channel_id, prompt_cost))
        first_token = terms.price_per_output_token if stream and worst > prompt_cost else 0
        if first_token:
            ops.append(ChargeOp(bv.channel_id, first_token))
        now = int(time.time())
        acceptance = sign_acceptance(Acceptance(requestHash=request_hash, channelId=bv.channel_id,
                                                acceptedAt=now if accepted_at is None else int(accepted_at),
                                                deadline=now + self.config.response_deadline_s),
                                     self.signer, self.receipt_domain)
        charged = prompt_cost + first_token
        after = await self._commit_admission(model, bv.channel_id, ops, acceptance, charged,
                                             spent_before + worst, writer=self.batch_writer)
        # What the SDK client books (batch.py): this request's reservation and the voucher's ceiling.
        commitment = self.batch.voucher_digest(bv.channel_id, bv.max_claimable)
        response = {"success": True, "transaction": commitment, "network": self.batch.network, "payer": bv.payer,
                    "amount": str(worst),
                    "extra": {"chargedAmount": str(worst), **({"depositTransaction": bv.deposit_tx}
                                                              if bv.deposit_tx else {}),
                              "channelState": {"channelId": bv.channel_id, "chargedCumulativeAmount":
                                               str(bv.max_claimable)},
                              "royalty": {"modelId": terms.model_id, "paidBy": "node forwards publisherBps of "
                                          "each claim"}}}
        header = base64.b64encode(json.dumps(response, separators=(",", ":")).encode()).decode()
        return PaidRequest(bv.channel_id, terms.model_copy(update={"credit_window": 0}), after.accepted, after.spent,
                           charged, acceptance=base64.b64encode(acceptance.model_dump_json(by_alias=True).encode())
                           .decode(), precharged=1 if first_token else 0, writer=self.batch_writer,
                           payment_response=header)

    async def _commit_admission(self, model: str, channel_id: str, ops: list[LedgerOp],
                                acceptance: SignedAcceptance, charged: int, required: int,
                                writer: LedgerWriter | None = None) -> ChannelBalance:
        """The admission's ledger ops and the acceptance's store write, concurrently; both must succeed
        before anything is sent. An acceptance stored for a refused request is harmless: it never left."""
        writer = writer or self.writer
        writes = [writer.write_many(ops)]
        if self.record_acceptance is not None:
            writes.append(self.record_acceptance(acceptance))
        ledger, *stored = await asyncio.gather(*writes, return_exceptions=True)
        if isinstance(ledger, LedgerConflict):  # a concurrent request or voucher on the channel got there first
            raise self.needed(model, ledger.reason, str(ledger), required, channel_id=channel_id) from None
        if isinstance(ledger, BaseException):
            raise ledger
        if stored and isinstance(stored[0], BaseException):  # charged, but the promise is not durable: undo it
            await run_in_threadpool(writer.ledger.refund, channel_id, charged)
            raise internal_error(stored[0], "acceptance_store") from None
        return ledger[-1]

    # -- charging output -------------------------------------------------------------------------

    async def charge_output(self, paid: PaidRequest, tokens: int) -> tuple[bool, NeedVoucher | None]:
        """Charge `tokens` of output, durably. Returns (charged, ask):
        - charged is False when spent would pass accepted + credit: nothing is charged, the caller must
          send `ask` and `wait_and_charge`;
        - otherwise `ask`, if set, is an early request for a voucher, made once per accepted level when
          half the credit window is in use: the client pays while the other half hides the round trip."""
        used = min(tokens, paid.precharged)  # already charged at admission
        paid.precharged -= used
        tokens -= used
        if tokens == 0:
            return True, None
        amount = tokens * paid.price.price_per_output_token
        try:
            after = await (paid.writer or self.writer).write(ChargeOp(paid.channel_id, amount,
                                                                      paid.price.credit_window))
            paid.spent, accepted = after.spent, after.accepted
        except LedgerConflict as exc:
            if exc.reason != "insufficient_funds":
                raise
            return False, NeedVoucher(channelId=paid.channel_id, spent=paid.spent,
                                      requiredCumulative=paid.spent + amount)
        paid.cost += amount
        # Ask early, once half the credit window is in use: the other half covers the round trip.
        if paid.spent - accepted >= max(paid.price.credit_window // 2, 1) and paid.asked_at != accepted:
            paid.asked_at = accepted
            return True, NeedVoucher(channelId=paid.channel_id, spent=paid.spent, requiredCumulative=paid.spent)
        return True, None

    async def wait_and_charge(self, paid: PaidRequest, tokens: int) -> bool:
        """After a blocking payment-need-voucher: wait for vouchers until `tokens` can be charged or the
        voucher timeout passes (then False: the stream ends)."""
        deadline = time.monotonic() + paid.price.voucher_timeout_s
        while True:
            event = self._funds.setdefault(paid.channel_id, asyncio.Event())
            charged, _ = await self.charge_output(paid, tokens)
            if charged:
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), remaining)

    async def refund(self, paid: PaidRequest) -> None:
        """Undo a request's charges when it failed before any output left (an engine error or overload)."""
        if paid.cost:
            await run_in_threadpool((paid.writer or self.writer).ledger.refund, paid.channel_id, paid.cost)
            paid.cost, paid.precharged = 0, 0

    async def refund_unused(self, paid: PaidRequest) -> None:
        """A stream that ended before using its precharged output token gives it back (before the receipt)."""
        if paid.precharged:
            amount = paid.precharged * paid.price.price_per_output_token
            paid.spent = await run_in_threadpool((paid.writer or self.writer).ledger.refund, paid.channel_id, amount)
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
        # Its own few threads: vouchers posted by strangers (chain reads for unknown channels) never take the
        # threads paid admissions verify on.
        await asyncio.get_running_loop().run_in_executor(self._intake, self.payments.verifier.verify, voucher)
        return await self._record(voucher)

    def close(self) -> None:
        self._intake.shutdown(wait=True)
        self.writer.close()
        if self.batch_writer is not None:
            self.batch_writer.close()
        if self.batch is not None:
            self.batch.stop(flush=True)  # claims what was served before the process exits
            self.batch.close()


def _decode(header: str) -> object:
    """The `PAYMENT-SIGNATURE` JSON, or None when it cannot be read (parse_payment then says why)."""
    if len(header) > MAX_HEADER_BYTES:
        return None
    try:
        return safejson.loads(base64.b64decode(header, validate=True), max_bytes=MAX_HEADER_BYTES)
    except (ValueError, RecursionError):
        return None

