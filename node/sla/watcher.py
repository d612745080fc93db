"""Answers no-response disputes against this node: Proof of Response, automated.

`SlaWatcher` polls the SLA court for `NoResponseDisputeOpened` events naming this node, and for each
dispute still open posts the stored receipt whose ``requestHash`` matches (`SLACourt.answer`), well
inside the response window. A dispute with no stored receipt is logged and left alone (the node never
answered that request, so it cannot refute it). Runs in a background thread; `start()` / `stop()`.

A restarted node starts scanning at `first_block_since(w3, now - DISPUTE_LOOKBACK_S)`: a dispute stays
answerable for at most the court's longest response window, so that range holds every dispute it can
still answer, including those opened while it was down (answered ones are skipped by their status).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from eth_account.signers.local import LocalAccount
from eth_utils import to_checksum_address
from web3 import Web3

from dcml.client.chain.sla import DisputeStatus, SLACourtClient, SLAError
from dcml.client.wire.receipts import SignedReceipt

log = logging.getLogger(__name__)

ReceiptLookup = Callable[[str, str], "SignedReceipt | None"]
MAX_RESPONSE_WINDOW_S = 7 * 86400  # SLACourt.MAX_RESPONSE_WINDOW
DISPUTE_LOOKBACK_S = MAX_RESPONSE_WINDOW_S + 3600  # plus an hour of slack (clock skew, late blocks)


def first_block_since(w3: Web3, timestamp: int, *, low: int = 0) -> int:
    """The first block at or after `low` whose timestamp is >= `timestamp` (binary search, ~log2(n) reads);
    the head + 1 if none is."""
    high = w3.eth.block_number + 1
    while low < high:
        mid = (low + high) // 2
        if w3.eth.get_block(mid)["timestamp"] >= timestamp:
            high = mid
        else:
            low = mid + 1
    return low


class SlaWatcher:
    """Polls `court_address` every `interval_s` and answers open disputes against `node_address`.

    `receipt_lookup(request_hash, channel_id)` (0x-prefixed lowercase hex) returns the stored signed receipt
    for that request on that channel, or None.
    `sender_account` pays the gas of `answer` and receives the disputer's bond.
    """

    def __init__(self, w3: Web3, court_address: str, node_address: str, receipt_lookup: ReceiptLookup,
                 sender_account: LocalAccount, *, interval_s: float = 10.0, from_block: int | None = None,
                 max_block_range: int = 5000) -> None:
        self.court = SLACourtClient(w3, court_address)
        self.w3 = w3
        self.node = to_checksum_address(node_address)
        self.lookup = receipt_lookup
        self.sender = sender_account
        self.interval_s = interval_s
        self.max_block_range = max_block_range  # blocks per eth_getLogs call (providers cap the range)
        self._next_block = from_block
        self._done: set[bytes] = set()  # disputes answered, or no longer open
        # Open disputes not answerable yet (the receipt is still being produced, or a transaction failed):
        # tried again on every poll until answered, closed, or past their window.
        self._retry: set[bytes] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.answered: list[bytes] = []  # dispute ids this watcher answered, in order

    @property
    def open_disputes(self) -> frozenset[bytes]:
        """Open disputes not answered yet (no receipt yet, or the answer failed): the status page shows them."""
        return frozenset(self._retry)

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="sla-watcher", daemon=True)
        self._thread.start()
        log.info("SLA watcher started for node %s on court %s (every %ss)", self.node, self.court.address,
                 self.interval_s)

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        log.info("SLA watcher stopped")

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.poll_once()
            except Exception:
                log.exception("SLA watcher poll failed; retrying in %ss", self.interval_s)
            self._stop.wait(self.interval_s)

    def poll_once(self) -> int:
        """One pass: fetch new dispute events for this node and answer the open ones. Returns answers sent."""
        head = self.w3.eth.block_number
        start = 0 if self._next_block is None else self._next_block
        event = self.court.contract.events.NoResponseDisputeOpened()
        sent = sum(self._handle(dispute_id) for dispute_id in list(self._retry))
        while start <= head and not self._stop.is_set():
            end = min(head, start + self.max_block_range - 1)
            for entry in event.get_logs(from_block=start, to_block=end, argument_filters={"node": self.node}):
                dispute_id = bytes(entry["args"]["disputeId"])
                if dispute_id in self._done or dispute_id in self._retry or entry["args"]["node"] != self.node:
                    continue
                sent += self._handle(dispute_id)
            self._next_block = start = end + 1
        return sent

    def _later(self, dispute_id: bytes, answer_by: int) -> int:
        """Try again on the next poll, while the window is open."""
        if self.w3.eth.get_block("latest")["timestamp"] > answer_by:
            self._retry.discard(dispute_id)
            self._done.add(dispute_id)
        else:
            self._retry.add(dispute_id)
        return 0

    def _handle(self, dispute_id: bytes) -> int:
        dispute = self.court.dispute(dispute_id)
        if dispute.status != DisputeStatus.OPEN:
            self._retry.discard(dispute_id)
            self._done.add(dispute_id)
            return 0
        request = "0x" + dispute.request_hash.hex()
        signed = self.lookup(request, "0x" + dispute.channel_id.hex())
        if signed is None:  # never answered, or the answer is still streaming: its receipt may yet come
            if dispute_id not in self._retry:
                log.warning("SLA dispute %s: no stored receipt for request %s yet; watching until the window "
                            "closes at %d", dispute_id.hex(), request, dispute.answer_by)
            return self._later(dispute_id, dispute.answer_by)
        try:
            tx = self.court.answer(self.sender, dispute_id, signed)
        except SLAError as exc:
            log.error("SLA dispute %s: answer refused: %s", dispute_id.hex(), exc.reason)
            if exc.reason in ("DisputeNotOpen", "WindowClosed", "ReceiptMismatch", "WrongSigner"):
                self._retry.discard(dispute_id)
                self._done.add(dispute_id)
                return 0
            return self._later(dispute_id, dispute.answer_by)  # e.g. a transaction that did not go through
        self._retry.discard(dispute_id)
        self._done.add(dispute_id)
        self.answered.append(dispute_id)
        log.info("SLA dispute %s answered with receipt %s for request %s (tx %s, gas %d)", dispute_id.hex(),
                 signed.receipt.receipt_id, request, tx["transactionHash"].hex(), tx["gasUsed"])
        return 1
