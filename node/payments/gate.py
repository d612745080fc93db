"""The payment gate: admits a paid request, charges its tokens before they are sent, and pauses a
stream that reaches the end of what is paid plus the credit window until a voucher arrives.

Money rules (ARCHITECTURE.md, "Paying over HTTP"):
- a request is admitted only if `accepted − spent` covers its prompt plus the prepay (for a
  non-streamed request: plus its whole `max_tokens`, since it cannot pause);
- every charge is committed to the ledger (fsync) *before* the tokens it pays for leave the node;
  concurrent vouchers and charges share one commit (`LedgerWriter`), so a commit costs each stream one
  fsync wait however many streams there are;
- output may run at most `creditWindow` past what is accepted, and never more past it than the channel has
  paid in all (credit is earned: a 1-wei channel gets none): the node's whole exposure;
- a voucher below the accepted one, posted after a receipt, releases the unused part of a reservation:
  settlement then takes it (`ledger.ReleaseOp`), so what is settled equals the receipts.

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

import anyio
from eth_account.signers.local import LocalAccount
from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool
from web3 import Web3

from dcml.client.chain.channel import ChannelState
from dcml.client.wire import safejson
from dcml.client.wire.errors import ErrorType, PaymentError, PaymentReason
from dcml.client.wire.receipts import Acceptance, ReceiptDomain, SignedAcceptance, sign_acceptance
from dcml.client.wire.voucher import Voucher
from dcml.client.wire.x402 import (
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
from dcml.node.api.errors import APIError, internal_error
from dcml.node.config import PaymentsConfig
from dcml.node.payments.ledger import ChannelBalance, ChargeOp, Ledger, LedgerConflict, LedgerOp, ReleaseOp, VoucherOp
from dcml.node.payments.service import Payments, payments_router
from dcml.node.payments.verifier import VoucherRejected


class PaymentNeeded(APIError, PaymentError):
    """402 with the x402 `PAYMENT-REQUIRED` header saying what would admit the request."""

    status = 402
    reason = PaymentReason.PAYMENT_REQUIRED
    error_type = ErrorType.PAYMENT


class PaymentMalformed(PaymentNeeded):
    """400: the payment header cannot be read (x402 transport: malformed input is a bad request)."""

    status = 400
    reason = PaymentReason.MALFORMED_PAYMENT


if TYPE_CHECKING:
    from dcml.node.payments.batch import BatchSettlement

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
    acceptance: str | None = None  # the signed acceptance, base64 (X-DCML-Acceptance); None without SLA terms
    settlement: dict = field(default_factory=dict)  # SettlementResponse fields other than the figures
    asked_at: int = -1  # the accepted amount when we last asked for a voucher (one ask per level)
    precharged: int = 0  # output tokens charged at admission, in the same commit (saves one before the 1st token)
    output_tokens: int = 0  # output tokens charged (and counted as served): what the receipt's outputTokens says
    writer: LedgerWriter | None = None  # the ledger this request is charged in (batch-settlement has its own)
    payment_response: str | None = None  # batch-settlement: fixed at admission (the reservation, see batch.py)

    @property
    def headers(self) -> dict[str, str]:
        """The response's payment headers with the figures as they stand now: read after the last charge
        (a non-streamed answer) they are the request's final ones."""
        response = self.payment_response
        if response is None:
            figures = ChannelFigures(channelId=self.channel_id, accepted=self.accepted, spent=self.spent,
                                     cost=self.cost)
            response = SettlementResponse(**self.settlement, amount=str(self.cost),
                                          extensions={SCHEME: figures.to_json()}).to_header()
        headers = {PAYMENT_RESPONSE: response}
        if self.acceptance is not None:
            headers[ACCEPTANCE_HEADER] = self.acceptance
        return headers


def _acceptance_header(acceptance: SignedAcceptance | None) -> str | None:
    return None if acceptance is None else base64.b64encode(acceptance.model_dump_json(by_alias=True).encode()).decode()


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
        # Served model name -> unix time from which the node's SLA terms for it are in force in the court. An
        # acceptance under the court's domain is signed only for requests accepted then or later: without terms
        # in force the court cannot judge it (`openNoResponse` reverts NoTerms), so it would promise nothing.
        self.terms_in_force_from: dict[str, int] = {}
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
            from dcml.node.payments.batch import BatchSettlement
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

    def _untrusted_royalty(self, model: str, publisher: str, bps: int) -> str | None:
        """Why a channel's snapshotted royalty terms are refused (None: accepted). A squatter who registered
        the model id first would otherwise take `bps` of everything this node earns."""
        price = self.config.prices[model]
        limit = price.max_royalty_bps if price.max_royalty_bps is not None else (10_000 if price.publisher else 0)
        if price.publisher is not None and bps and publisher.lower() != price.publisher.lower():
            return (f"the channel pays a {bps} bps royalty to {publisher}, not to {model}'s publisher "
                    f"{price.publisher}: its model id is squatted; this node refuses such channels")
        if bps > limit:
            return (f"the channel pays a {bps} bps royalty to {publisher}; this node accepts at most {limit} bps for "
                    f"{model}")
        return None

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
            from dcml.node.payments.batch import parse_batch_payment

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
        if (why := self._untrusted_royalty(model, state.params.publisher, state.params.publisher_bps)) is not None:
            raise needed("untrusted_publisher", why)
        if state.deposit < self.config.min_deposit:  # Sybil channels must at least lock real capital
            raise needed("deposit_too_small", f"channel holds {state.deposit}; this node takes channels of at "
                         f"least {self.config.min_deposit}: top it up or open a larger one")
        settle_first = await self._contract_signer(model, state)
        balance = self.payments.ledger.get(voucher.channel_id)
        accepted = max(voucher.cumulative_amount, balance.accepted if balance else 0)
        spent_before = balance.spent if balance else 0
        if stream and max_tokens > 0 and min(terms.credit_window, accepted) < terms.price_per_output_token:
            # Credit is earned (`ChargeOp.earned_credit`): until the channel has paid a token's worth, its
            # first output token is paid ahead too.
            ahead = max(ahead, terms.price_per_output_token)
            need = prompt_cost + ahead
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
        if new_voucher and settle_first:
            await self._settle_first(voucher, model)
        first_token = terms.price_per_output_token if stream and max_tokens > 0 else 0
        if first_token:  # the first output token rides on the admission commit (it may use the credit window)
            ops.append(ChargeOp(voucher.channel_id, first_token, terms.credit_window, earned_credit=True))
        # Signed before the commit so that its durable write shares the wait with the ledger's.
        acceptance = self._acceptance(model, request_hash, voucher.channel_id, accepted_at)
        charged = prompt_cost + first_token
        after = await self._commit_admission(model, voucher.channel_id, ops, acceptance, charged, need)
        if new_voucher and settle_first:
            await run_in_threadpool(self.payments.ledger.set_settled, voucher.channel_id, voucher.cumulative_amount)
        if new_voucher:  # streams of this channel paused for funds may go on
            self._notify(voucher.channel_id)
        spent = after.spent
        # `transaction`: the commitment identifier of the channel's accepted voucher, its EIP-712 digest.
        commitment = self.payments.verifier.domain.digest(voucher.channel_id_bytes, after.accepted)
        settlement = {"transaction": "0x" + commitment.hex(), "payer": state.payer,
                      "network": f"eip155:{self.payments.deployment.chain_id}"}
        return PaidRequest(voucher.channel_id, terms, after.accepted, spent, charged,
                           acceptance=_acceptance_header(acceptance),
                           settlement=settlement, precharged=1 if first_token else 0)

    async def _admit_batch(self, payment, needed, *, model: str, request_hash: str, prompt_cost: int, worst: int,
                           stream: bool, accepted_at: float | None) -> PaidRequest:
        """Admit a batch-settlement payment: the SDK's facilitator verifies it (and submits a deposit), then the
        voucher's ceiling must cover what was served plus this request's worst case; charged per token as below."""
        from dcml.node.payments.batch import BatchRejected

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
        acceptance = self._acceptance(model, request_hash, bv.channel_id, accepted_at)
        charged = prompt_cost + first_token
        after = await self._commit_admission(model, bv.channel_id, ops, acceptance, charged, worst,
                                             writer=self.batch_writer)
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
                           charged, acceptance=_acceptance_header(acceptance), precharged=1 if first_token else 0,
                           writer=self.batch_writer,
                           payment_response=header)

    def _acceptance(self, model: str, request_hash: str, channel_id: str,
                    accepted_at: float | None) -> SignedAcceptance | None:
        """The signed promise to answer, under the court's domain: only while the model's SLA terms are in force
        at `accepted_at` (the court cannot judge an acceptance made under no terms). Both schemes use it."""
        now = int(time.time())
        at = now if accepted_at is None else int(accepted_at)
        in_force_from = self.terms_in_force_from.get(model)
        if in_force_from is None or at < in_force_from:
            return None
        return sign_acceptance(Acceptance(requestHash=request_hash, channelId=channel_id, acceptedAt=at,
                                          deadline=now + self.config.response_deadline_s),
                               self.signer, self.receipt_domain)

    async def _commit_admission(self, model: str, channel_id: str, ops: list[LedgerOp],
                                acceptance: SignedAcceptance | None, charged: int, need: int,
                                writer: LedgerWriter | None = None) -> ChannelBalance:
        """The admission's ledger ops and the acceptance's store write, concurrently; both must succeed
        before anything is sent. An acceptance stored for a refused request is harmless: it never left."""
        writer = writer or self.writer
        writes = [writer.write_many(ops)]
        if self.record_acceptance is not None and acceptance is not None:
            writes.append(self.record_acceptance(acceptance))
        ledger, *stored = await asyncio.gather(*writes, return_exceptions=True)
        if isinstance(ledger, LedgerConflict) and ledger.reason == PaymentReason.NOT_INCREASING and isinstance(
                ops[0], VoucherOp):
            # A concurrent request on the channel recorded this voucher (or a higher one) first. It was valid when
            # verified and still names the channel: admit on what is held now (the charges re-check the funds).
            (ledger,) = await asyncio.gather(writer.write_many(ops[1:]), return_exceptions=True)
        if isinstance(ledger, LedgerConflict):  # a concurrent request or voucher on the channel got there first
            now = writer.ledger.get(channel_id)  # ask for what would admit it now, not before the race
            raise self.needed(model, ledger.reason, str(ledger), (now.spent if now else 0) + need,
                              channel_id=channel_id) from None
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
        # Shielded: a charge that lands is always counted in this request's account (and so in its receipt),
        # even when the client hangs up while the commit is on disk.
        with anyio.CancelScope(shield=True):
            used = min(tokens, paid.precharged)  # already charged at admission
            amount = (tokens - used) * paid.price.price_per_output_token
            accepted = paid.accepted
            if amount:
                try:
                    after = await (paid.writer or self.writer).write(ChargeOp(
                        paid.channel_id, amount, paid.price.credit_window, earned_credit=True))
                except LedgerConflict as exc:
                    if exc.reason != PaymentReason.INSUFFICIENT_FUNDS:
                        raise
                    # Ask from the channel's spent now: other streams of the channel charge too, and a voucher
                    # sized from this request's last view would be stale (lower than the node already holds).
                    now = (paid.writer or self.writer).ledger.get(paid.channel_id)
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
            await run_in_threadpool((paid.writer or self.writer).ledger.refund, paid.channel_id, paid.cost)
            paid.cost, paid.precharged, paid.output_tokens = 0, 0, 0

    async def refund_unused(self, paid: PaidRequest) -> None:
        """A stream that ended before using its precharged output token gives it back (before the receipt)."""
        with anyio.CancelScope(shield=True):  # a refund that lands is always reflected in the receipt
            if paid.precharged:
                amount = paid.precharged * paid.price.price_per_output_token
                ledger = (paid.writer or self.writer).ledger
                paid.spent = await run_in_threadpool(ledger.refund, paid.channel_id, amount)
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
        if voucher.cumulative_amount < self.payments.ledger.accepted(voucher.channel_id):
            return await self._release(voucher)
        # Its own few threads: vouchers posted by strangers (chain reads for unknown channels) never take the
        # threads paid admissions verify on.
        state = await asyncio.get_running_loop().run_in_executor(self._intake, self.payments.verifier.verify, voucher)
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

    async def _release(self, voucher: Voucher) -> ChannelBalance:
        """A voucher below the accepted one, signed by the payer after a receipt: settlement takes it instead
        (`ReleaseOp`), so a reservation no answer used (a non-streamed max_tokens) is never settled."""
        await run_in_threadpool(self.payments.verifier.verify, voucher, allow_lower=True)
        try:
            return await self.writer.write(ReleaseOp(voucher.channel_id, voucher.cumulative_amount,
                                                     voucher.signature))
        except LedgerConflict as exc:
            raise VoucherRejected(exc.reason, str(exc)) from None

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

