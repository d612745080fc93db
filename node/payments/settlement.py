"""Turns accepted vouchers into on-chain money: settles past a threshold, always before a requested
close's grace period ends, and at shutdown.

Stateless beyond the ledger and the chain: after a restart it reads both and carries on. What is due comes from
the ledger and the channel index (`channel_index`, state from the escrow's events): no RPC per open channel. The
chain is authoritative for what is settled, so a settle that landed just before a crash is never sent twice.

Due settles of ECDSA vouchers go out together: one `settleBatch` transaction per BATCH_SIZE channels that
share token and model terms (a contract signer's voucher is settled alone). The ledger is updated from
the receipt, channel by channel; a voucher the contract skipped stays unsettled and is retried like a
failed settle. A crash between the transaction and the ledger is read back from the chain next round.

One channel cannot block the others: whatever one raises (a reverted transaction, an opening reorganised
away, an RPC error) is logged with its reason and that channel alone is retried with exponential backoff,
while the round goes on; a shutdown flush tries every channel, backoff or not.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from dataclasses import dataclass

from eth_account.signers.local import LocalAccount

from dcml.client.wire.errors import PaymentError, PaymentReason
from dcml.node.payments.chain import ChannelChain, UnknownChannel
from dcml.node.payments.ledger import ChannelBalance, Ledger

log = logging.getLogger("dcml.settlement")

BATCH_SIZE = 50  # vouchers per settleBatch transaction (~15k gas each, well inside a block)


class ChannelGone(PaymentError):
    """The ledger holds vouchers for a channel the chain does not have (its opening was reorganised away)."""

    reason = PaymentReason.UNKNOWN_CHANNEL


def _reason(exc: BaseException) -> str:
    """One line saying why, for the log (no traceback: a failing channel is retried, not a crash)."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:500]


@dataclass(frozen=True)
class SettlementAction:
    channel_id: str
    action: str  # "settle" | "close"
    cumulative: int
    tx_hash: str


@dataclass(frozen=True)
class _DueSettle:
    """A settle `_handle` found due, sent with the round's batch."""

    channel_id: str
    cumulative: int
    signature: bytes


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
        # Per channel: consecutive failures and when to try again (monotonic). The cap keeps a requested close
        # retried well inside its grace period.
        self._failures: dict[str, tuple[int, float]] = {}
        self.max_backoff = max(60.0, interval)
        # Rounds look only at what changed since the last one (ledger writes, index changes, failing channels); every
        # `full_scan_every` rounds, at a flush and after an index rebuild they look at every open channel.
        self.full_scan_every = 60
        self._scanned_at: float | None = None  # unix time the last round's ledger read started
        self._rounds = 0
        self._resets = 0
        self.write_overlap_s = 5.0  # a ledger write stamped just before a round's read may commit just after it

    # -- one pass --------------------------------------------------------------------------------

    def run_once(self, *, flush: bool = False) -> list[SettlementAction]:
        """Look at every open channel once; `flush` settles whatever is unsettled (shutdown)."""
        done: list[SettlementAction] = []
        due: list[_DueSettle] = []
        with self._round:
            # Channel state comes from the index (kept current from the escrow's events), not one read per open
            # channel: a round costs one index sync at most, however many channels are open.
            self.chain.sync(max_age=0.0 if flush else self.interval)
            tokens: set[str] = set()
            for balance in self._candidates(full=flush):
                cid = balance.channel_id
                _, retry_at = self._failures.get(cid, (0, 0.0))
                if not flush and time.monotonic() < retry_at:
                    continue
                try:
                    action = self._handle(balance, flush=flush)
                    if isinstance(action, _DueSettle):
                        due.append(action)
                        continue
                    if action:
                        tokens.add(self.chain.book.params(bytes.fromhex(cid[2:])).token)
                except Exception as exc:  # this channel only: leave it in the ledger, nothing is marked settled
                    self._failed(cid, _reason(exc))
                    continue
                self._failures.pop(cid, None)
                if action:
                    done.append(action)
            done += self._settle_batches(due, tokens)
            if self.auto_claim:
                for token in tokens:
                    self._claim(token)
        return done

    def _candidates(self, *, full: bool) -> list[ChannelBalance]:
        """The open channels that may be due: every one on a full round; otherwise those the ledger wrote since the
        last round (a new voucher, a release, a settle), those whose on-chain state changed (the index: a close
        request, a settle or close by anyone, a top-up) and those failing. A channel in none of these was not due
        last round and nothing that decides it has changed."""
        index = self.chain.index
        touched = index.take_touched()
        started = time.time()
        full = (full or self._scanned_at is None or self._rounds % self.full_scan_every == 0
                or index.resets != self._resets)
        self._rounds += 1
        self._resets = index.resets
        if full or self._scanned_at is None:
            balances = self.ledger.open_channels()
        else:
            since = self._scanned_at - self.write_overlap_s
            found = {b.channel_id: b for b in self.ledger.open_channels(changed_since=since)}
            for cid in {"0x" + raw.hex() for raw in touched} | self._failures.keys():
                if cid not in found and (balance := self.ledger.get(cid)) is not None and not balance.finalized:
                    found[cid] = balance
            balances = list(found.values())
        self._scanned_at = started
        return balances

    def _failed(self, cid: str, reason: str) -> None:
        """Back this channel off (only it): its vouchers stay in the ledger, nothing is marked settled."""
        failures, _ = self._failures.get(cid, (0, 0.0))
        delay = min(self.interval * 2**failures, self.max_backoff)
        self._failures[cid] = (failures + 1, time.monotonic() + delay)
        log.error("settlement of %s failed (%d in a row; retrying in %.0f s): %s", cid, failures + 1, delay, reason)

    def _settle_batches(self, due: list[_DueSettle], tokens: set[str]) -> list[SettlementAction]:
        """One settleBatch per BATCH_SIZE due settles sharing token and model terms; the ledger follows the receipt."""
        groups: dict[tuple, list[_DueSettle]] = defaultdict(list)
        for d in due:
            p = self.chain.book.params(bytes.fromhex(d.channel_id[2:]))
            groups[(p.token, p.model_id, p.publisher, p.publisher_bps)].append(d)
        done: list[SettlementAction] = []
        for (token, *_), items in groups.items():
            for i in range(0, len(items), BATCH_SIZE):
                chunk = items[i:i + BATCH_SIZE]
                try:
                    receipt, skipped = self.chain.settle_batch(
                        self.payee, [(bytes.fromhex(d.channel_id[2:]), d.cumulative, d.signature) for d in chunk])
                except Exception as exc:  # nothing of this chunk settled: each channel backs off alone
                    for d in chunk:
                        self._failed(d.channel_id, _reason(exc))
                    continue
                tokens.add(token)
                for d in chunk:
                    reason = skipped.get(bytes.fromhex(d.channel_id[2:]))
                    if reason is not None:
                        self._failed(d.channel_id, f"settleBatch skipped it (error selector 0x{reason.hex()})")
                        continue
                    self.ledger.set_settled(d.channel_id, d.cumulative)
                    self._failures.pop(d.channel_id, None)
                    log.info("settled %s up to %d (batch of %d)", d.channel_id, d.cumulative, len(chunk))
                    tx = receipt["transactionHash"].hex()
                    done.append(SettlementAction(d.channel_id, "settle", d.cumulative, tx))
        return done

    def settle_now(self, channel_id: str, cumulative: int, signature: str) -> None:
        """Settle one voucher on-chain now (before it is counted: a contract signer's channel), between rounds:
        the payee's transactions go one at a time. Raises what the chain raised (it was not settled)."""
        with self._round:
            self.chain.settle(self.payee, bytes.fromhex(channel_id[2:]), cumulative, bytes.fromhex(signature[2:]))

    def failing(self) -> dict[str, int]:
        """Channels whose settlement is failing now, with their consecutive failures."""
        return {cid: n for cid, (n, _) in self._failures.items()}

    def _handle(self, balance: ChannelBalance, *, flush: bool) -> SettlementAction | _DueSettle | None:
        channel_id = bytes.fromhex(balance.channel_id[2:])
        try:
            state = self.chain.channel(channel_id)  # memory: the index was synced at the start of the round
        except UnknownChannel as exc:
            raise ChannelGone(f"channel {balance.channel_id} is not on the chain (its opening was reorganised "
                              "away)") from exc
        if state.settled > balance.settled or state.finalized:  # landed before a crash, or closed on-chain
            self.ledger.set_settled(balance.channel_id, state.settled, finalized=state.finalized)
        if state.deposit == 0 and not state.finalized:  # a channel exists iff its deposit is not 0
            raise ChannelGone(f"channel {balance.channel_id} is not on the chain (its opening was reorganised "
                              f"away); {balance.accepted - balance.settled} accepted stays unsettled in the ledger")
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
            if len(signature) == 65 and signature[64] in (27, 28):  # an ECDSA voucher: with the round's batch
                return _DueSettle(balance.channel_id, target, signature)
            receipt = self.chain.settle(self.payee, channel_id, target, signature)
            self.ledger.set_settled(balance.channel_id, target)
            log.info("settled %s up to %d (+%d)", balance.channel_id, target, unsettled)
            return SettlementAction(balance.channel_id, "settle", target, receipt["transactionHash"].hex())
        return None

    def _claim(self, token: str) -> None:
        try:
            if self.chain.earnings(token, self.payee.address) > 0:
                self.chain.claim(self.payee, token)
        except Exception as exc:  # earnings stay claimable; the next settling round claims them
            log.error("claiming earnings in %s failed: %s", token, _reason(exc))

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
