"""The payment gate: admits a paid request (its prompt charged before any compute) and hands the HTTP stream a
meter (`metering.PaidMeter`) that charges its tokens before they are sent and pauses it at the end of what is
paid plus the credit window until a voucher arrives. Vouchers posted on their own go through `intake`.

Money rules (ARCHITECTURE.md, "Paying over HTTP"):
- a request is admitted only if `accepted − spent` covers its prompt plus the prepay (for a
  non-streamed request: plus its whole `max_tokens`, since it cannot pause);
- every charge is committed to the ledger (fsync) *before* the tokens it pays for leave the node;
  concurrent vouchers and charges share one commit (`LedgerWriter`, `node.storage`), so a commit costs each
  stream one fsync wait however many streams there are;
- admission is two steps: `check` (the voucher verified from memory on the event loop, the funds there) reserves
  what the request needs, so concurrent checks on the channel see it as spent; `commit` writes it. The engine
  starts between them (`node.api.openai._start`): its prefill hides the commit's fsync and signing, and only a
  request whose payment checked out ever reaches it;
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
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

from anyio import to_thread
from eth_account.signers.local import LocalAccount
from web3 import Web3

from dcml.client.chain.channel import ChannelState
from dcml.client.wire import safejson
from dcml.client.wire.errors import PaymentReason
from dcml.client.wire.receipts import Acceptance, ReceiptDomain, SignedAcceptance, sign_acceptance
from dcml.client.wire.voucher import Voucher
from dcml.client.wire.x402 import (
    MAX_HEADER_BYTES,
    PAYMENT_REQUIRED,
    PAYMENT_SIGNATURE,
    ChannelTerms,
    MalformedPayment,
    OtherRequirement,
    PaymentRequired,
    PaymentRequirement,
    ResourceInfo,
    parse_payment,
)
from dcml.node.config import PaymentsConfig
from dcml.node.payments.errors import PaymentMalformed, PaymentNeeded
from dcml.node.payments.intake import VoucherIntake
from dcml.node.payments.ledger import (
    ChannelBalance,
    ChargeOp,
    LedgerConflict,
    LedgerOp,
    LedgerWriter,
    RefundOp,
    SettledOp,
    VoucherOp,
)
from dcml.node.payments.metering import Funds, PaidMeter, PaidRequest
from dcml.node.payments.service import Payments
from dcml.node.payments.verifier import NeedsChain, VoucherRejected

if TYPE_CHECKING:
    from dcml.node.payments.batch import BatchSettlement

log = logging.getLogger("dcml.payments")

RecordAcceptance = Callable[[SignedAcceptance], Awaitable[None]]


def _acceptance_header(acceptance: SignedAcceptance | None) -> str | None:
    return None if acceptance is None else base64.b64encode(acceptance.model_dump_json(by_alias=True).encode()).decode()


@dataclass(frozen=True)
class Admission:
    """A paid request that passed every check; `commit` charges it (durable on return) and gives its meter."""

    commit: Callable[[], Awaitable[PaidMeter]]


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
        # What admissions checked but not yet committed will charge, per channel: counted as spent by the next
        # check, so the engine may start on a checked request without a concurrent one taking the same funds.
        self._reserved: dict[str, int] = {}
        self.funds = Funds()  # wakes the streams of a channel paused for funds when a voucher arrives
        self.intake = VoucherIntake(payments, config, self.writer, self.funds)
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

    @property
    def config(self) -> PaymentsConfig:
        return self._config

    @config.setter
    def config(self, config: PaymentsConfig) -> None:  # one policy for admissions and posted vouchers alike
        self._config = config
        if hasattr(self, "intake"):
            self.intake.config = config

    # -- terms -----------------------------------------------------------------------------------

    def terms(self, model: str) -> ChannelTerms:
        price = self.config.prices[model]
        out = price.price_per_output_token
        return ChannelTerms(escrow=self.payments.deployment.payment_channels, model_id=self.model_ids[model],
                            price_per_input_token=price.price_per_input_token, price_per_output_token=out,
                            prepay=self.config.prepay_tokens * out, credit_window=self.config.credit_tokens * out,
                            voucher_timeout_s=self.config.voucher_timeout_s)

    def requirement(self, model: str, amount: int | None = None, channel_id: str | None = None,
                    required: int | None = None) -> PaymentRequirement:
        """The offer; `amount` is what admitting the request needs now (default: a prepay of output)."""
        terms = self.terms(model)
        if required is not None:
            terms = terms.model_copy(update={"channel_id": channel_id, "required_cumulative": required})
        return PaymentRequirement(network=f"eip155:{self.payments.deployment.chain_id}", asset=self.token,
                                  amount=terms.prepay if amount is None else amount,
                                  pay_to=self.payments.payee.address,
                                  max_timeout_seconds=self.config.response_deadline_s,
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

    async def check(self, *, headers, model: str, request_hash: str, prompt_tokens: int, max_tokens: int,
                    stream: bool, accepted_at: float | None = None, resource: str = "") -> Admission:
        """Admit a paid request: every check (the voucher verified, the funds there, and reserved for it), or
        `PaymentNeeded`. Its `commit` then charges the prompt and first token durably and gives the meter that
        charges the rest. Between the two the engine may start on the prompt (its prefill hides the commit's fsync
        and signing); nothing may be sent before `commit` returns. `accepted_at` (unix seconds; default now) is
        signed in the acceptance: pass the receipt's, so both select the same SLA terms."""
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
                return await self._check_batch(batch_payment, needed, model=model, request_hash=request_hash,
                                               prompt_cost=prompt_cost, worst=worst, stream=stream,
                                               accepted_at=accepted_at, max_tokens=max_tokens)
        try:
            voucher, chosen = parse_payment(header)
        except MalformedPayment as exc:
            raise needed("malformed_payment", str(exc), status=PaymentMalformed) from None
        if chosen is not None and not chosen.matches(self.requirement(model)):
            raise needed("accepted_mismatch", "the PaymentPayload's `accepted` is not this node's offer for "
                         f"{model} (scheme, network, asset, payTo, escrow and modelId must match accepts[0])")
        try:
            state = await self._verify(voucher)
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
        try:
            settle_first = await self.intake.contract_signer(state)
        except VoucherRejected as exc:
            raise self.needed(model, exc.reason, str(exc)) from None
        balance = self.payments.ledger.get(voucher.channel_id)
        accepted = max(voucher.cumulative_amount, balance.accepted if balance else 0)
        key = voucher.channel_id.lower()
        spent_before = (balance.spent if balance else 0) + self._reserved.get(key, 0)
        if stream and max_tokens > 0 and min(terms.credit_window, accepted) < terms.price_per_output_token:
            # Credit is earned (`ChargeOp.earned_credit`): until the channel has paid a token's worth, its
            # first output token is paid ahead too.
            ahead = max(ahead, terms.price_per_output_token)
            need = prompt_cost + ahead
        if accepted - spent_before < need:
            required = spent_before + need
            raise needed("insufficient_funds", f"channel has {accepted - spent_before} available; this "
                         f"request needs {need} ahead: sign a voucher for {required}", required, voucher.channel_id)
        self._reserve(key, need)  # admissions checked but not yet committed count as spent: no two share funds
        try:
            # One commit for the new voucher (if any) and the prompt's charge.
            ops: list[LedgerOp] = []
            new_voucher = balance is None or voucher.cumulative_amount > balance.accepted
            if new_voucher:
                ops.append(VoucherOp(voucher.channel_id, voucher.cumulative_amount, voucher.signature))
            ops.append(ChargeOp(voucher.channel_id, prompt_cost))
            if new_voucher and settle_first:  # a contract signer's voucher counts once settled: before any compute
                try:
                    await self.intake.settle_first(voucher)
                except VoucherRejected as exc:
                    raise self.needed(model, exc.reason, str(exc)) from None
            first_token = terms.price_per_output_token if stream and max_tokens > 0 else 0
            if first_token:  # the first output token rides on the admission commit (it may use the credit window)
                ops.append(ChargeOp(voucher.channel_id, first_token, terms.credit_window, earned_credit=True))
            charged = prompt_cost + first_token
        except BaseException:
            self._reserve(key, -need)
            raise

        async def finish() -> PaidMeter:
            after, acceptance = await self._commit_admission(
                model, voucher.channel_id, ops, self._acceptance(model, request_hash, voucher.channel_id,
                                                                 accepted_at), charged, need)
            if new_voucher and settle_first:
                await self.writer.write(SettledOp(voucher.channel_id, voucher.cumulative_amount))
            if new_voucher:  # streams of this channel paused for funds may go on
                self.funds.notify(voucher.channel_id)
            # `transaction`: the commitment identifier of the channel's accepted voucher, its EIP-712 digest.
            commitment = self.payments.verifier.domain.digest(voucher.channel_id_bytes, after.accepted)
            settlement = {"transaction": "0x" + commitment.hex(), "payer": state.payer,
                          "network": f"eip155:{self.payments.deployment.chain_id}"}
            return PaidMeter(PaidRequest(voucher.channel_id, terms, after.accepted, after.spent, charged,
                                         acceptance=_acceptance_header(acceptance), settlement=settlement,
                                         precharged=1 if first_token else 0, max_tokens=max_tokens),
                             self.writer, self.funds, partial(self.needed, model))

        return self._admission(key, need, finish)

    def _admission(self, key: str, reserved: int, finish: Callable[[], Awaitable[PaidMeter]]) -> Admission:
        """The admission whose commit is `finish`; the check's reservation (`reserved` on `key`) ends with it,
        whether it commits or fails."""
        async def commit() -> PaidMeter:
            try:
                return await finish()
            finally:
                self._reserve(key, -reserved)
        return Admission(commit)

    def _reserve(self, key: str, amount: int) -> None:
        left = self._reserved.get(key, 0) + amount
        if left:
            self._reserved[key] = left
        else:
            self._reserved.pop(key, None)

    async def _verify(self, voucher: Voucher) -> ChannelState:
        """The verifier's checks on the event loop when they need no chain read (~60 µs: cheaper than a thread
        hop, and it keeps 64 simultaneous admissions from queueing for the GIL behind thread switches), else
        off it."""
        try:
            return self.payments.verifier.verify(voucher, allow_equal=True, local=True)
        except NeedsChain:
            return await to_thread.run_sync(partial(self.payments.verifier.verify, voucher, allow_equal=True))

    async def _check_batch(self, payment, needed, *, model: str, request_hash: str, prompt_cost: int, worst: int,
                           stream: bool, accepted_at: float | None, max_tokens: int) -> Admission:
        """Admit a batch-settlement payment: the SDK's facilitator verifies it (and submits a deposit), then the
        voucher's ceiling must cover what was served plus this request's worst case; charged per token as below."""
        from dcml.node.payments.batch import BatchRejected

        assert self.batch is not None and self.batch_writer is not None
        batch, batch_writer = self.batch, self.batch_writer
        terms = self.terms(model)
        try:
            bv = await to_thread.run_sync(self.batch.verify, payment, worst, terms.model_id)
        except BatchRejected as exc:
            raise needed(exc.reason, f"batch-settlement payment refused: {exc}") from None
        balance = self.batch.ledger.get(bv.channel_id)
        key = "batch:" + bv.channel_id.lower()
        spent_before = (balance.spent if balance else 0) + self._reserved.get(key, 0)
        if bv.max_claimable - spent_before < worst:
            state = await to_thread.run_sync(self.batch.channel_state, bv.channel_id)
            raise needed("insufficient_funds", f"voucher ceiling {bv.max_claimable} leaves "
                         f"{bv.max_claimable - spent_before}; this request needs {worst}", batch_state=state)
        ops: list[LedgerOp] = []
        if balance is None or bv.max_claimable > balance.accepted:
            ops.append(VoucherOp(bv.channel_id, bv.max_claimable, bv.signature))
        ops.append(ChargeOp(bv.channel_id, prompt_cost))
        first_token = terms.price_per_output_token if stream and worst > prompt_cost else 0
        if first_token:
            ops.append(ChargeOp(bv.channel_id, first_token))
        charged = prompt_cost + first_token
        self._reserve(key, worst)

        async def finish() -> PaidMeter:
            after, acceptance = await self._commit_admission(
                model, bv.channel_id, ops, self._acceptance(model, request_hash, bv.channel_id, accepted_at), charged,
                worst, writer=batch_writer)
            # What the SDK client books (batch.py): this request's reservation and the voucher's ceiling.
            commitment = batch.voucher_digest(bv.channel_id, bv.max_claimable)
            response = {"success": True, "transaction": commitment, "network": batch.network, "payer": bv.payer,
                        "amount": str(worst),
                        "extra": {"chargedAmount": str(worst), **({"depositTransaction": bv.deposit_tx}
                                                                  if bv.deposit_tx else {}),
                                  "channelState": {"channelId": bv.channel_id, "chargedCumulativeAmount":
                                                   str(bv.max_claimable)},
                                  "royalty": {"modelId": terms.model_id, "paidBy": "node forwards publisherBps of "
                                              "each claim"}}}
            header = base64.b64encode(json.dumps(response, separators=(",", ":")).encode()).decode()
            return PaidMeter(PaidRequest(bv.channel_id, terms.model_copy(update={"credit_window": 0}), after.accepted,
                                         after.spent, charged, acceptance=_acceptance_header(acceptance),
                                         precharged=1 if first_token else 0, max_tokens=max_tokens,
                                         payment_response=header),
                             batch_writer, self.funds, partial(self.needed, model))

        return self._admission(key, worst, finish)

    async def _acceptance(self, model: str, request_hash: str, channel_id: str,
                    accepted_at: float | None) -> SignedAcceptance | None:
        """The signed promise to answer, under the court's domain: only while the model's SLA terms are in force
        at `accepted_at` (the court cannot judge an acceptance made under no terms). Both schemes use it."""
        now = int(time.time())
        at = now if accepted_at is None else int(accepted_at)
        in_force_from = self.terms_in_force_from.get(model)
        if in_force_from is None or at < in_force_from:
            return None
        acceptance = Acceptance(request_hash=request_hash, channel_id=channel_id, accepted_at=at,
                                deadline=now + self.config.response_deadline_s)
        # Signed off the event loop: an EIP-712 signature costs the loop ~1 ms that every stream would wait on.
        return await to_thread.run_sync(sign_acceptance, acceptance, self.signer, self.receipt_domain)

    async def _commit_admission(self, model: str, channel_id: str, ops: list[LedgerOp],
                                signing: Awaitable[SignedAcceptance | None], charged: int, need: int,
                                writer: LedgerWriter | None = None) -> tuple[ChannelBalance, SignedAcceptance | None]:
        """The admission's ledger ops, and the acceptance signed (off the loop) then stored, concurrently: one
        wait for both. Both must succeed before anything is sent. An acceptance stored for a refused request is
        harmless: it never left."""
        writer = writer or self.writer

        async def sign_and_store() -> SignedAcceptance | None:
            acceptance = await signing
            if self.record_acceptance is not None and acceptance is not None:
                await self.record_acceptance(acceptance)
            return acceptance

        ledger, stored = await asyncio.gather(writer.write_many(ops), sign_and_store(), return_exceptions=True)
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
        if isinstance(stored, BaseException):  # charged, but the promise is not durable: undo it
            await writer.write(RefundOp(channel_id, charged))
            raise stored
        assert isinstance(ledger, list)
        return ledger[-1], stored

    # -- vouchers posted on their own --------------------------------------------------------------

    async def accept(self, voucher: Voucher) -> ChannelBalance:
        """`POST /v1/payments/vouchers`: verify and durably record, waking this channel's paused streams."""
        return await self.intake.accept(voucher)

    def close(self) -> None:
        self.intake.close()
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

