"""Vouchers posted on their own (`POST /v1/payments/vouchers`, `node.api.voucher_route`): verified from memory on
the event loop (on the intake's threads when the chain must be read), group-committed with the admissions'
charges, and waking the streams paused for funds.

A voucher below the accepted one, posted after a receipt, releases the unused part of a reservation:
settlement then takes it (`ledger.ReleaseOp`), so what is settled equals the receipts.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

from anyio import to_thread

from dcml.client.chain.channel import ChannelState
from dcml.client.wire.voucher import Voucher
from dcml.node.config import PaymentsConfig
from dcml.node.payments.ledger import ChannelBalance, LedgerConflict, LedgerWriter, ReleaseOp, SettledOp, VoucherOp
from dcml.node.payments.metering import Funds
from dcml.node.payments.service import Payments
from dcml.node.payments.verifier import NeedsChain, VoucherRejected


class VoucherIntake:
    def __init__(self, payments: Payments, config: PaymentsConfig, writer: LedgerWriter, funds: Funds) -> None:
        self.payments, self.config, self.writer, self.funds = payments, config, writer, funds
        # Its own few threads: vouchers posted by strangers (chain reads for unknown channels) never take the
        # threads paid admissions verify on.
        self._threads = ThreadPoolExecutor(max_workers=8, thread_name_prefix="voucher-intake")

    async def accept(self, voucher: Voucher) -> ChannelBalance:
        """Verify and durably record `voucher`; returns once it is committed (only then may it be acknowledged)."""
        loop = asyncio.get_running_loop()
        if voucher.cumulative_amount < self.payments.ledger.accepted(voucher.channel_id):
            return await self._release(voucher)
        try:  # the common case: every check from memory, on the loop (~60 µs: less than a thread hop costs it)
            state = self.payments.verifier.verify(voucher, local=True)
        except NeedsChain:  # a channel or signer the node must read from the chain
            state = await loop.run_in_executor(self._threads, self.payments.verifier.verify, voucher)
        settle_first = await self.contract_signer(state)
        if settle_first:
            await self.settle_first(voucher)
        balance = await self._write(VoucherOp(voucher.channel_id, voucher.cumulative_amount, voucher.signature))
        self.funds.notify(voucher.channel_id)
        if settle_first:
            await self.writer.write(SettledOp(voucher.channel_id, voucher.cumulative_amount))
        return balance

    async def _release(self, voucher: Voucher) -> ChannelBalance:
        """A voucher below the accepted one, signed by the payer after a receipt: settlement takes it instead
        (`ReleaseOp`), so a reservation no answer used (a non-streamed max_tokens) is never settled."""
        await asyncio.get_running_loop().run_in_executor(self._threads, lambda: self.payments.verifier.verify(
            voucher, allow_lower=True))
        return await self._write(ReleaseOp(voucher.channel_id, voucher.cumulative_amount, voucher.signature))

    async def _write(self, op: VoucherOp | ReleaseOp) -> ChannelBalance:
        try:
            return await self.writer.write(op)
        except LedgerConflict as exc:  # a concurrent voucher for the channel got there first
            raise VoucherRejected(exc.reason, str(exc)) from None

    # -- contract (ERC-1271) signers ----------------------------------------------------------

    async def contract_signer(self, state: ChannelState) -> bool:
        """Whether the channel's signer is a contract, whose vouchers must then be settled before they count
        (`contract_signers = "settle_first"`); refused (VoucherRejected) under the default "refuse". A contract can
        revoke its signatures after being served, and a voucher that no longer verifies on-chain cannot be
        settled."""
        chain, signer = self.payments.chain, state.authorized_signer
        known = chain.known_contract(signer)  # cached: no thread hop on the admission path
        if not (known if known is not None else await to_thread.run_sync(chain.is_contract, signer)):
            return False
        if self.config.contract_signers == "refuse":
            raise VoucherRejected("contract_signer", f"channel signer {signer} is a contract (ERC-1271); this node "
                                  "serves only channels whose session signer is a key: open one with an EOA session "
                                  "key")
        return True

    async def settle_first(self, voucher: Voucher) -> None:
        try:
            await to_thread.run_sync(self.payments.worker.settle_now, voucher.channel_id, voucher.cumulative_amount,
                                    voucher.signature)
        except Exception as exc:  # a revoked or refusing contract signer: the voucher is worth nothing
            raise VoucherRejected("signer_refused", f"the channel's contract signer did not let this voucher settle "
                                  f"on-chain ({type(exc).__name__}); it is not counted") from None

    def close(self) -> None:
        self._threads.shutdown(wait=True)
