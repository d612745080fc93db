"""The payer: the money policy a paying transport calls (`client.sdk.exchange.Payer`) for each request.

It names the channel and the voucher a request goes with, answers a 402 (opening or topping up a channel, with
headroom while other requests share it), pays mid-stream only what this request can cost, checks the node's
signed acceptance and receipt against what was sent and received at the channel's prices, pays the credit an
answer used (or releases what it reserved and did not use) right after its receipt, and records every
violation. Receipts are checked against the node's SLA terms; a broken term becomes a claim, not an error.
"""

from __future__ import annotations

import base64
import json
import logging
import time

import httpx
from web3 import Web3

from dcml.client.chain.contracts import contract
from dcml.client.chain.sla import Broken
from dcml.client.sdk.channels import LiveChannel, PayerChannels
from dcml.client.sdk.disputes import Disputes
from dcml.client.sdk.exchange import Exchange, PaymentRejected, ReceiptViolation
from dcml.client.sdk.spend_store import StoredChannel
from dcml.client.wire.errors import DEAD_CHANNEL, PaymentReason, ReceiptReason
from dcml.client.wire.receipts import (
    Price,
    ReceiptDomain,
    ReceiptError,
    SignedAcceptance,
    SignedReceipt,
    request_hash,
    verify_acceptance,
    verify_receipt,
)
from dcml.client.wire.voucher import Voucher
from dcml.client.wire.x402 import ACCEPTANCE_HEADER, PAYMENT_RESPONSE, NeedVoucher, PaymentRequired, PaymentResponse

log = logging.getLogger("dcml.client")
# A node signs acceptances only under SLA terms in force by its clock; ours may differ by this much.
TERMS_CLOCK_MARGIN_S = 10

# Codes after which the channel we named can never admit a request: open another one.
_DEAD_CHANNEL = DEAD_CHANNEL
# Receipt checks that fail only after the signature, request hash and channel checked out: such a receipt
# still answers a no-response dispute on-chain, so its acceptance must not be disputed.
_SIGNED_FOR_THE_REQUEST = {ReceiptReason.RESPONSE_HASH_MISMATCH, ReceiptReason.COST_MISMATCH,
                           ReceiptReason.CUMULATIVE_MISMATCH, ReceiptReason.ACCEPTED_AT_SKEW}


class ChannelPayer(PayerChannels):
    """`Payer` of the paying transports, for the `Client` (which sets these attributes and `disputes`)."""

    receipt_domain: ReceiptDomain
    check_sla: bool
    seal: bool
    max_clock_skew_s: float
    w3: Web3
    _unbonding: int | None  # NodeRegistry.unbondingDelay (immutable), read once
    _answering: set[str]  # request hashes admitted whose answer is still arriving

    @property
    def disputes(self) -> Disputes:
        raise NotImplementedError

    def _sla_of(self, signed: SignedReceipt | None) -> Broken:
        claim = self.store.breach_claim(signed.receipt.receipt_id) if signed is not None else None
        return Broken(claim.broken) if claim is not None else Broken.NONE

    def _unbonding_delay(self) -> int:
        """The registry's unbonding delay (0 without a registry or on a failed read: no check)."""
        if self._unbonding is None and self.deployment.node_registry:
            try:
                self._unbonding = contract(self.w3, "NodeRegistry", self.deployment.node_registry
                                           ).functions.unbondingDelay().call()
            except Exception as exc:
                log.warning("could not read the registry's unbonding delay: %s", exc)
                return 0
        return self._unbonding or 0

    def _terms_in_force(self, node_address: str, model_id: str, at: float) -> bool:
        """Whether the node has SLA terms in force for `model_id` at our time `at`, less a margin for clocks
        (nodes sign acceptances only under terms in force). No court, or a failed chain read: assume it has."""
        if not self.deployment.sla_court:
            return False
        try:
            return self.disputes.terms_at(node_address, model_id, int(at) - TERMS_CLOCK_MARGIN_S) is not None
        except Exception as exc:
            log.warning("could not read the node's SLA terms: %s", exc)
            return True

    def _check_sla(self, exchange: Exchange) -> None:
        """The receipt against the node's terms; never fails the call: a broken term is a claim, not an error,
        and a failed chain read only skips the check."""
        signed = exchange.receipt
        if not (self.check_sla and self.deployment.sla_court and signed is not None and exchange.channel_id):
            return
        try:
            self.disputes.check_receipt(signed, node_address=self._node().signing_address, node_url=self.node_url)
        except Exception as exc:
            log.warning("SLA check of receipt %s skipped: %s", signed.receipt.receipt_id, exc)

    def prepare(self, model: str, exchange: Exchange) -> Voucher | None:
        with self._lock:
            ch = self._usable(model)
            if ch is None:
                return None
            highest = self.store.highest_voucher(ch.channel_id)
            if highest is None:
                return None
            return self._offer(exchange, Voucher(channel_id=ch.channel_id, cumulative_amount=highest[0],
                                                 signature=highest[1]))

    def _offer(self, exchange: Exchange, voucher: Voucher) -> Voucher:
        """Count a request sent with a voucher on a channel: from then on the node may charge it there, so the
        channel is not ours alone (`_ceiling`, `_headroom`). Call with the lock held."""
        channel = voucher.channel_id.lower()
        if exchange.offered != channel:
            self._unoffer(exchange)
            live = self._live.setdefault(channel, LiveChannel())
            live.offered += 1
            live.epoch += 1
            exchange.offered = channel
        return voucher

    def _unoffer(self, exchange: Exchange) -> None:
        if exchange.offered is not None:
            live = self._live.get(exchange.offered)
            if live is not None:
                live.offered = max(0, live.offered - 1)
            exchange.offered = None

    def on_payment_required(self, required: PaymentRequired, exchange: Exchange, sent: Voucher | None) -> Voucher:
        req = self._check_terms(required, self._node())
        code = required.error or PaymentReason.PAYMENT_REQUIRED
        if sent is not None and code == PaymentReason.CHANNEL_UNCONFIRMED:  # the node waits for the opening's blocks
            time.sleep(1.0)
            with self._lock:
                return self._offer(exchange, sent)
        with self._lock:
            if sent is not None and code in _DEAD_CHANNEL:
                self.store.update_channel(sent.channel_id, status="closed")
            elif sent is not None and code == PaymentReason.NOT_INCREASING:
                # A concurrent request of ours got a higher voucher to the node first: name the channel with it.
                highest = self.store.highest_voucher(sent.channel_id)
                if highest is None or highest[0] <= sent.cumulative_amount:
                    raise PaymentRejected(code, f"{required.message or 'voucher refused'} (channel {sent.channel_id})")
                return self._offer(exchange, Voucher(channel_id=sent.channel_id, cumulative_amount=highest[0],
                                                     signature=highest[1]))
            elif sent is not None and code not in (PaymentReason.INSUFFICIENT_FUNDS, PaymentReason.PAYMENT_REQUIRED):
                raise PaymentRejected(code, f"{required.message or 'voucher refused'} (channel {sent.channel_id})")
            ch = self._usable(exchange.model)
            if ch is None:
                ch = self._open(req, exchange.model, self.deposit)
            t = req.extra
            if (t.price_per_input_token, t.price_per_output_token) != (ch.price_in, ch.price_out):
                self.store.update_channel(ch.channel_id, price_in=t.price_per_input_token,
                                          price_out=t.price_per_output_token, prepay=t.prepay,
                                          credit_window=t.credit_window)
            if required.required_cumulative is not None:
                amount = required.required_cumulative + self._headroom(exchange, ch.channel_id,
                                                                       t.price_per_output_token)
            else:  # a fresh voucher names the channel; the node's next 402 gives the exact amount
                amount = max(ch.accepted, ch.spent + max(t.prepay, 1))
            if sent is not None and amount <= sent.cumulative_amount and sent.channel_id == ch.channel_id:
                raise PaymentRejected(code, f"the node asks for {amount} wei cumulative but already holds "
                                      f"{sent.cumulative_amount}: {required.message}")
            return self._offer(exchange, self._sign(self._stored(ch.channel_id), amount))

    def _headroom(self, exchange: Exchange, channel_id: str, price_out: int) -> int:
        """Extra to sign on a 402 while other requests of ours use the channel: their streams spend what the node
        asked for during our round trip, so an exact voucher would always arrive stale. The extra is this request's
        own output at most (max_tokens x price, what a non-streamed request reserves), which its answer spends:
        with every answer run to max_tokens the vouchers still equal the receipts; one that stops early leaves
        the rest paid ahead on the channel, for the next request."""
        live = self._live.get(channel_id, LiveChannel())
        if live.inflight + live.offered - (exchange.offered == channel_id) == 0:
            return 0
        try:
            body = json.loads(exchange.request_body)
            max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
        except (ValueError, AttributeError):
            return 0
        return max_tokens * price_out if isinstance(max_tokens, int) and max_tokens > 0 else 0

    def seal_key(self) -> bytes | None:
        return self._node().hpke_public_key if self.seal else None

    def on_admitted(self, headers: httpx.Headers, exchange: Exchange) -> None:
        node = self._node()
        if PAYMENT_RESPONSE not in headers:
            return  # a free node: the receipt is still checked
        pr = PaymentResponse.from_header(headers[PAYMENT_RESPONSE])
        exchange.channel_id, exchange.accepted, exchange.spent_at_admission = (pr.channel_id.lower(), pr.accepted,
                                                                               pr.spent)
        with self._lock:
            self._unoffer(exchange)
            live = self._live.setdefault(exchange.channel_id, LiveChannel())
            live.inflight += 1
            live.epoch += 1
            # Alone on the channel from here on while the epoch stays put (`_ceiling`).
            exchange.alone_epoch = live.epoch if live.inflight == 1 and not live.offered else None
        try:
            ch = self.store.channel(exchange.channel_id)
            if ch is None:
                raise ReceiptViolation("unknown_channel", f"the node charged channel {pr.channel_id}, not ours")
            value = headers.get(ACCEPTANCE_HEADER)
            if value is None:
                if not self._terms_in_force(node.signing_address, ch.model_id, exchange.started_at):
                    return  # no SLA terms in force: the node promises nothing the court could judge
                raise ReceiptViolation("missing_acceptance", "a paid request was admitted without a signed "
                                       "acceptance although the node's SLA terms are in force")
            try:
                signed = SignedAcceptance.model_validate_json(_b64(value))
                verify_acceptance(signed.acceptance, signed.signature, expected_signer=node.signing_address,
                                  domain=self.receipt_domain)
            except ReceiptError as exc:
                raise ReceiptViolation(exc.reason.value, str(exc)) from exc
            except ValueError as exc:
                raise ReceiptViolation("malformed", f"{ACCEPTANCE_HEADER} is not a signed acceptance: {exc}") from exc
            a = signed.acceptance
            if a.request_hash != request_hash(exchange.request_body):
                raise ReceiptViolation("request_hash_mismatch", "the acceptance does not commit to the body you sent")
            if a.channel_id != exchange.channel_id:
                raise ReceiptViolation("channel_mismatch", f"acceptance names channel {a.channel_id}")
            if abs(a.accepted_at - time.time()) > self.max_clock_skew_s or a.deadline < a.accepted_at:
                raise ReceiptViolation("accepted_at_skew", f"the acceptance says accepted at {a.accepted_at}, "
                                       f"deadline {a.deadline}; our clock says {int(time.time())}")
            if (unbonding := self._unbonding_delay()) and a.deadline - a.accepted_at > unbonding // 2:
                # A node exiting as it accepts could withdraw its stake before a dispute could even be opened.
                raise ReceiptViolation("deadline_too_far", f"the acceptance's deadline is {a.deadline - a.accepted_at}"
                                       f" s away, more than half the registry's {unbonding} s unbonding delay")
            # Before the answer starts: if it never comes, this is the evidence for a no-response dispute.
            self.store.record_acceptance(signed, node_address=node.signing_address, node_url=self.node_url,
                                         model_id=ch.model_id)
            exchange.request_hash = a.request_hash
            self._answering.add(a.request_hash)
        except ReceiptViolation as exc:
            self._violation(exc, exchange, evidence=headers.get(ACCEPTANCE_HEADER))
            self.on_aborted(exchange)
            raise

    def on_need_voucher(self, need: NeedVoucher, exchange: Exchange) -> Voucher:
        with self._lock:
            if need.channel_id.lower() != exchange.channel_id:
                exc = ReceiptViolation("channel_mismatch", f"the node asks for a voucher on {need.channel_id}, "
                                       f"not on this request's channel {exchange.channel_id}")
                self._violation(exc, exchange)
                raise exc
            ch = self._stored(need.channel_id)
            ceiling = self._ceiling(exchange, ch)
            if ceiling is not None and need.required_cumulative > ceiling:
                exc = ReceiptViolation("overcharge", f"the node asks for {need.required_cumulative} wei cumulative, "
                                       f"more than this request can cost ({ceiling}: spent at admission + "
                                       "max_tokens x price); not paying")
                self._violation(exc, exchange)
                raise exc
            voucher = self._sign(ch, need.required_cumulative)
            exchange.vouchers.append(voucher)
            return voucher

    def _ceiling(self, exchange: Exchange, ch: StoredChannel) -> int | None:
        """The most this request can bring the channel's spent to, when it has been alone on the channel since its
        admission and names max_tokens: what was spent at admission (its prompt included) + max_tokens x price."""
        live = self._live.get(exchange.channel_id or "", LiveChannel())
        alone = exchange.alone_epoch is not None and exchange.alone_epoch == live.epoch
        if not alone or live.inflight != 1 or live.offered or exchange.spent_at_admission is None:
            return None
        try:
            body = json.loads(exchange.request_body)
        except ValueError:
            return None
        max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
        if not isinstance(max_tokens, int):
            return None
        return exchange.spent_at_admission + max_tokens * ch.price_out

    def on_receipt(self, exchange: Exchange, signed: SignedReceipt | None, *, response_bytes: bytes | None = None,
                   sse_payloads: list[bytes] | None = None) -> Voucher | None:
        settle = self._receipt(exchange, signed, response_bytes=response_bytes, sse_payloads=sse_payloads)
        self._check_sla(exchange)  # outside the lock: a chain read (on a cache miss) holds up no other request
        return settle

    def _receipt(self, exchange: Exchange, signed: SignedReceipt | None, *, response_bytes: bytes | None,
                 sse_payloads: list[bytes] | None) -> Voucher | None:
        node = self._node()
        with self._lock:
            self._answering.discard(exchange.request_hash or "")
            live = self._live.get(exchange.channel_id or "")
            exact = live is not None and live.inflight == 1 and not live.offered and not live.uncertain
            if live is not None:
                live.inflight -= 1
            try:
                if signed is None:
                    raise ReceiptViolation("missing_receipt", "the answer came without a readable receipt; the "
                                           "node breaks Proof of Response (fetch it at /v1/receipts/{id})")
                r = signed.receipt
                ch = self.store.channel(exchange.channel_id) if exchange.channel_id else None
                if exchange.channel_id and r.channel_id != exchange.channel_id:
                    raise ReceiptViolation("channel_mismatch", f"receipt charges {r.channel_id}, not this request's "
                                           f"channel {exchange.channel_id}")
                try:
                    verify_receipt(r, signed.signature, expected_signer=node.signing_address,
                                   request_bytes=exchange.request_body, response_bytes=response_bytes,
                                   sse_payloads=sse_payloads,
                                   price=Price(ch.price_in, ch.price_out) if ch else None,
                                   previous_cumulative=ch.spent if ch and exact else None, domain=self.receipt_domain)
                except ReceiptError as exc:
                    raise ReceiptViolation(exc.reason.value, str(exc)) from exc
                if not (exchange.started_at - self.max_clock_skew_s <= r.accepted_at
                        <= time.time() + self.max_clock_skew_s):
                    raise ReceiptViolation("accepted_at_skew", f"the receipt says accepted at {r.accepted_at}; the "
                                           f"request was sent at {int(exchange.started_at)} by our clock")
                # Not provably alone on the channel: concurrent requests finish in any order, so the receipt is
                # checked against its own admission (the node's spent then can only have grown).
                floor = exchange.spent_at_admission
                if ch and not exact and floor is not None and r.cumulative_spent < floor:
                    raise ReceiptViolation("cumulative_mismatch", f"cumulativeSpent {r.cumulative_spent} went back: "
                                           f"the node said {floor} when it admitted this request")
            except ReceiptViolation as exc:
                self._violation(exc, exchange, evidence=signed.model_dump_json(by_alias=True) if signed else None)
                if signed is not None and exc.reason in _SIGNED_FOR_THE_REQUEST:
                    self.store.mark_answered(node.signing_address, signed.receipt.request_hash,
                                             signed.receipt.receipt_id)
                raise
            self.store.record_receipt(signed, node_url=self.node_url, request_body=exchange.request_body)
            self.store.mark_answered(node.signing_address, r.request_hash, r.receipt_id)
            exchange.receipt = signed
            if ch is None:
                return None
            if live is not None:
                # With nothing else in flight the store's spent is the node's again: check the next exactly.
                live.uncertain = live.inflight > 0 or live.offered > 0
            ch = self._stored(ch.channel_id)
            # Pay the credit this answer used now, as its verified receipt shows, so the node's exposure
            # between requests is zero and the next request needs no extra round trip.
            if r.cumulative_spent > ch.accepted:
                return self._sign(ch, r.cumulative_spent)
            if exact and r.cumulative_spent < ch.accepted:
                # It reserved more than it used (a non-streamed max_tokens, a prepay): re-sign down to exactly
                # the receipts, which the node settles instead (a release), so settled = receipts.
                return self._release(ch, r.cumulative_spent)
            return None

    def on_aborted(self, exchange: Exchange) -> None:
        with self._lock:
            self._unoffer(exchange)
            self._answering.discard(exchange.request_hash or "")
            live = self._live.get(exchange.channel_id or "")
            if live is not None and not exchange.finished:
                exchange.finished = True
                live.inflight = max(0, live.inflight - 1)
                live.uncertain = True  # the node charged for a receipt we never saw

    def _violation(self, exc: ReceiptViolation, exchange: Exchange, evidence: str | None = None) -> None:
        receipt_id = exchange.receipt.receipt.receipt_id if exchange.receipt else None
        self.store.record_violation(node_url=self.node_url, reason=exc.reason, message=str(exc),
                                    channel_id=exchange.channel_id, receipt_id=receipt_id, evidence=evidence)



def _b64(value: str) -> bytes:
    return base64.b64decode(value, validate=True)
