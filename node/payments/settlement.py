"""Turns accepted vouchers into on-chain money: settles past a threshold, always before a requested
close's grace period ends, and at shutdown.

Stateless beyond the ledger and the chain: after a restart it reads both and carries on. The chain is
authoritative for what is settled, so a settle that landed just before a crash is never sent twice.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

from eth_account.signers.local import LocalAccount

from client.tx import TransactionFailed
from node.payments.chain import ChannelChain
from node.payments.ledger import ChannelBalance, Ledger

log = logging.getLogger("dcml.settlement")


@dataclass(frozen=True)
class SettlementAction:
    channel_id: str
    action: str  # "settle" | "close"
    cumulative: int
    tx_hash: str


class SettlementWorker:
    def __init__(
        self,
        chain: ChannelChain,
        ledger: Ledger,
        payee: LocalAccount,
        *,
        threshold: int,
        interval: float = 2.0,
        auto_claim: bool = True,
        min_value: int = 0,
    ) -> None:
        self.chain = chain
        self.ledger = ledger
        self.payee = payee
        self.threshold = threshold
        # Dust: no settle or close transaction for less than this (its gas would cost more than it brings in),
        # not even at shutdown; the voucher stays in the ledger until more is owed or the channel closes.
        self.min_value = min_value
        self.interval = interval
        self.auto_claim = auto_claim
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._round = threading.Lock()  # one round at a time (the loop and a shutdown flush)

    # -- one pass --------------------------------------------------------------------------------

    def run_once(self, *, flush: bool = False) -> list[SettlementAction]:
        """Look at every open channel once; `flush` settles whatever is unsettled (shutdown)."""
        done: list[SettlementAction] = []
        with self._round:
            tokens: set[str] = set()
            for balance in self.ledger.open_channels():
                try:
                    action = self._handle(balance, flush=flush)
                except TransactionFailed as exc:
                    # Leave it in the ledger: the next round retries; nothing is marked settled.
                    log.error("settlement of %s failed: %s", balance.channel_id, exc)
                    continue
                if action:
                    done.append(action)
                    tokens.add(self.chain.book.params(bytes.fromhex(balance.channel_id[2:])).token)
            if self.auto_claim:
                for token in tokens:
                    self._claim(token)
        return done

    def _handle(self, balance: ChannelBalance, *, flush: bool) -> SettlementAction | None:
        channel_id = bytes.fromhex(balance.channel_id[2:])
        state = self.chain.channel(channel_id, fresh=True)
        if state.settled > balance.settled or state.finalized:  # landed before a crash, or closed on-chain
            self.ledger.set_settled(balance.channel_id, state.settled, finalized=state.finalized)
        target, sig_hex = balance.settle_target  # what was served, when the payer released a reservation
        if state.finalized:
            if target > state.settled:
                log.error("channel %s finalized with %d accepted but unsettled", balance.channel_id,
                          target - state.settled)
            return None
        signature = bytes.fromhex(sig_hex[2:]) if sig_hex else b""
        unsettled = target - state.settled
        dust = 0 < unsettled < self.min_value  # not worth its gas: left to the payer's withdraw at close
        if state.close_requested_at and not dust:
            # The payer wants out: settle everything and refund the rest now, well inside the grace period.
            receipt = self.chain.close(self.payee, channel_id, max(target, state.settled), signature)
            self.ledger.set_settled(balance.channel_id, max(target, state.settled), finalized=True)
            log.info("closed %s at %d on the payer's request", balance.channel_id, target)
            return SettlementAction(balance.channel_id, "close", target, receipt["transactionHash"].hex())
        if unsettled > 0 and not dust and (flush or unsettled >= self.threshold):
            receipt = self.chain.settle(self.payee, channel_id, target, signature)
            self.ledger.set_settled(balance.channel_id, target)
            log.info("settled %s up to %d (+%d)", balance.channel_id, target, unsettled)
            return SettlementAction(balance.channel_id, "settle", target, receipt["transactionHash"].hex())
        return None

    def _claim(self, token: str) -> None:
        if self.chain.earnings(token, self.payee.address) > 0:
            try:
                self.chain.claim(self.payee, token)
            except TransactionFailed as exc:
                log.error("claiming earnings in %s failed: %s", token, exc)

    # -- background loop -------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="settlement", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.run_once()
            except Exception:  # the loop must survive an RPC hiccup; the ledger keeps everything
                log.exception("settlement round failed; retrying next round")

    def stop(self, *, flush: bool = True) -> list[SettlementAction]:
        """Stop the loop and (by default) settle everything still unsettled."""
        self._stop.set()
        if self._thread:
            self._thread.join()
        return self.run_once(flush=True) if flush else []
