"""Checks a voucher before the node counts it as money: signature, channel, amount, state.

The hot path touches no network once the channel is cached: the EIP-712 domain separator is
precomputed, so a verification is two keccaks, one ECDSA recovery and a ledger lookup.
"""

from __future__ import annotations

from pydantic import ValidationError

from dcml.client.chain.channel import ChannelState
from dcml.client.wire.errors import DcmlError, PaymentError
from dcml.client.wire.voucher import MalformedVoucher, Voucher, VoucherDomain, recover_digest_signer
from dcml.node.payments.chain import ChannelChain, UnknownChannel
from dcml.node.payments.ledger import ChannelBalance, Ledger, LedgerConflict


class NeedsChain(DcmlError):
    """`verify(..., local=True)` would have to read the chain: call it again without `local`, off the loop."""

    reason = "needs_chain"


class VoucherRejected(PaymentError):
    """A voucher the node will not count; `reason` is a stable code, the message says what to do."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message, reason=reason)


def parse_voucher(data: object) -> Voucher:
    """A wire object (dict) to a Voucher, or VoucherRejected('malformed') naming the bad field."""
    try:
        return Voucher.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "voucher"
        raise VoucherRejected("malformed", f"malformed voucher: {where}: {first.get('msg')}") from exc
    except MalformedVoucher as exc:
        raise VoucherRejected("malformed", f"malformed voucher: {exc}") from exc


class VoucherVerifier:
    """Verifies vouchers for channels paying `payee` on one escrow; `accept` also persists them."""

    def __init__(
        self,
        domain: VoucherDomain,
        chain: ChannelChain,
        ledger: Ledger,
        payee: str,
        *,
        close_margin: int = 60,
    ) -> None:
        self.domain = domain
        self.chain = chain
        self.ledger = ledger
        self.payee = payee.lower()
        # A voucher arriving this close to the end of a requested close's grace period might not be
        # settled in time, so it is refused rather than counted.
        self.close_margin = close_margin

    def verify(self, voucher: Voucher, *, allow_equal: bool = False, allow_lower: bool = False,
               local: bool = False) -> ChannelState:
        """Every check, no side effect. Raises VoucherRejected. `allow_equal` admits a voucher equal to
        the one held (a client naming its channel for another request without paying more); `allow_lower` one
        below it (a release: `ledger.ReleaseOp` checks its amount)."""
        channel_id = voucher.channel_id_bytes
        amount = voucher.cumulative_amount
        if local:  # memory only (the event loop's fast path): anything else is NeedsChain
            state = self.chain.local(channel_id)
            if state is None or amount > state.deposit or state.finalized or state.close_requested_at or not (
                    self.chain.confirmed_local(channel_id)):
                raise NeedsChain
        else:
            state = self._state(voucher)
        if state.finalized:
            raise VoucherRejected("channel_finalized", f"channel {voucher.channel_id} is closed; open a new one")
        if state.deposit == 0:  # a channel exists iff its deposit is not 0: this opening was reorganised away
            raise VoucherRejected("unknown_channel", f"channel {voucher.channel_id} is not on the chain any more (its "
                                  "opening was reorganised away); open it again")
        if not self.chain.confirmed(channel_id):
            raise VoucherRejected("channel_unconfirmed", f"channel {voucher.channel_id} was opened less than "
                                  f"{self.chain.confirmations} blocks ago; retry once it has that many confirmations")
        if state.payee.lower() != self.payee:
            raise VoucherRejected("wrong_payee", f"channel {voucher.channel_id} pays {state.payee}, not this node")
        if amount > state.deposit:
            raise VoucherRejected("exceeds_deposit",
                                  f"voucher amount {amount} exceeds the channel deposit {state.deposit}; top up first")
        accepted = self.ledger.accepted(voucher.channel_id)
        if (amount < accepted and not allow_lower) or (amount == accepted and not allow_equal):
            raise VoucherRejected("not_increasing", f"voucher amount {amount} does not exceed the accepted {accepted} "
                                  "(replayed or out of order); sign a higher cumulative amount")
        self._check_signer(voucher, state, local)
        if state.close_requested_at:
            deadline = state.close_requested_at + self.chain.grace_period - self.close_margin
            if self.chain.chain_time() >= deadline:
                raise VoucherRejected("channel_closing", "the payer requested a close and its grace period is "
                                      "nearly over; this voucher could not be settled in time")
        return state

    def _state(self, voucher: Voucher) -> ChannelState:
        channel_id = voucher.channel_id_bytes
        try:
            state = self.chain.channel(channel_id)
            if voucher.cumulative_amount > state.deposit or state.finalized:
                state = self.chain.channel(channel_id, fresh=True)  # a top-up may be newer than the cache
        except UnknownChannel as exc:
            raise VoucherRejected(
                "unknown_channel",
                f"channel {voucher.channel_id} does not exist on this escrow "
                f"(chain {self.domain.chain_id}, contract {self.domain.escrow}); open it first",
            ) from exc
        return state

    def accept(self, voucher: Voucher) -> ChannelBalance:
        """Verify, then persist; returns only once the voucher is durable (safe to acknowledge)."""
        self.verify(voucher)
        return self.record(voucher)

    def record(self, voucher: Voucher) -> ChannelBalance:
        """Persist a verified voucher (durable on return)."""
        try:
            return self.ledger.record_voucher(voucher.channel_id, voucher.cumulative_amount, voucher.signature)
        except LedgerConflict as exc:  # a concurrent voucher for the same channel won the race
            raise VoucherRejected(exc.reason, str(exc)) from exc

    def _check_signer(self, voucher: Voucher, state: ChannelState, local: bool = False) -> None:
        """OpenZeppelin SignatureChecker's rule: an ECDSA signature (65 bytes, low s) by the signer, or,
        for a contract signer, whatever its ERC-1271 `isValidSignature` accepts."""
        digest = self.domain.digest(voucher.channel_id_bytes, voucher.cumulative_amount)
        try:
            if recover_digest_signer(digest, voucher.signature_bytes).lower() == state.authorized_signer.lower():
                return
            if local:  # not the key's: a contract signer's (ERC-1271) or a forgery, which the chain decides
                raise NeedsChain
        except MalformedVoucher as exc:
            if local:
                raise NeedsChain from None
            if not self.chain.is_contract(state.authorized_signer):
                raise VoucherRejected("malformed_signature", str(exc)) from exc
        if self.chain.is_contract(state.authorized_signer) and self.chain.erc1271_valid(
            state.authorized_signer, digest, voucher.signature_bytes
        ):
            return
        raise VoucherRejected(
            "bad_signature",
            f"voucher is not signed by the channel's authorized signer {state.authorized_signer} for chain "
            f"{self.domain.chain_id} and escrow {self.domain.escrow} (wrong key, channel, chain or contract)",
        )
