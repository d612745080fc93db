"""The node's view of channels on-chain: terms (cached for good), state (cached briefly), and the
payee's settle/close/claim transactions."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from eth_account.signers.local import LocalAccount
from web3 import Web3
from web3.logs import DISCARD
from web3.types import TxReceipt

from client.channel import ChannelBook, ChannelState, UnknownChannel, batch_voucher, read_state
from client.contracts import contract
from client.deployment import Deployment
from client.tx import send

ERC1271_MAGIC = bytes.fromhex("1626ba7e")
_ERC1271_ABI = [
    {
        "type": "function",
        "name": "isValidSignature",
        "stateMutability": "view",
        "inputs": [{"name": "hash", "type": "bytes32"}, {"name": "signature", "type": "bytes"}],
        "outputs": [{"name": "", "type": "bytes4"}],
    }
]

__all__ = ["ChannelChain", "UnknownChannel"]


class ChannelChain:
    """Channel state is cached for `ttl` seconds: it changes only by on-chain transactions, which the
    settlement worker re-reads every round and this class forgets after sending its own."""

    def __init__(self, w3: Web3, deployment: Deployment, *, ttl: float = 5.0, confirmations: int = 1) -> None:
        self.w3 = w3
        self.deployment = deployment
        self.escrow = contract(w3, "PaymentChannels", deployment.payment_channels)
        self.book = ChannelBook(self.escrow, deployment)
        self.ttl = ttl
        self.grace_period = deployment.close_grace_period
        self._cache: dict[bytes, tuple[float, ChannelState]] = {}
        self._lock = threading.Lock()
        self._code: dict[str, bool] = {}
        # Ids a stranger sent that have no channel, with when that was read: junk vouchers cost one cached
        # dict lookup, not an RPC each (and never a log scan).
        self._unknown: dict[bytes, float] = {}
        self.negative_ttl = 5.0
        self.confirmations = confirmations
        self._confirmed: set[bytes] = set()  # openings seen at least `confirmations` deep

    def confirmed(self, channel_id: bytes) -> bool:
        """Whether the channel's opening is at least `confirmations` blocks deep (1: mined). Only openings
        inside the last confirmations-1 blocks are looked for (a bounded log query), and a channel once deep
        enough is not asked about again. A channel the chain no longer has reads as deposit 0 (`channel`)."""
        if self.confirmations <= 1 or channel_id in self._confirmed:
            return True
        latest = self.w3.eth.block_number
        recent = self.escrow.events.ChannelOpened.get_logs(
            from_block=max(self.deployment.start_block, latest - self.confirmations + 2), to_block=latest,
            argument_filters={"channelId": channel_id})
        if recent:
            return False
        self._confirmed.add(channel_id)
        return True

    def channel(self, channel_id: bytes, *, fresh: bool = False) -> ChannelState:
        """Raises UnknownChannel for an id never opened on this escrow."""
        now = time.monotonic()
        if not fresh:
            hit = self._cache.get(channel_id)
            if hit and now - hit[0] < self.ttl:
                return hit[1]
        if not self.book.known(channel_id):
            self._check_exists(channel_id, now)
        state = read_state(self.escrow, channel_id, self.book.params(channel_id))
        with self._lock:
            self._cache[channel_id] = (now, state)
        return state

    def _check_exists(self, channel_id: bytes, now: float) -> None:
        """Before the terms are looked up in the opening's logs: one indexed read (`getChannel`, a mapping
        lookup) says whether the id was ever opened; a negative answer is cached for `negative_ttl`."""
        seen = self._unknown.get(channel_id)
        if seen is not None and now - seen < self.negative_ttl:
            raise UnknownChannel(f"channel 0x{channel_id.hex()} was never opened on escrow {self.escrow.address}")
        deposit = self.escrow.functions.getChannel(channel_id).call()[0]  # a channel exists iff deposit != 0
        if deposit == 0:
            with self._lock:
                if len(self._unknown) >= 100_000:  # bounded: a flood of distinct ids cannot grow memory
                    self._unknown.clear()
                self._unknown[channel_id] = now
            raise UnknownChannel(f"channel 0x{channel_id.hex()} was never opened on escrow {self.escrow.address}")

    def is_contract(self, address: str) -> bool:
        if address not in self._code:
            self._code[address] = len(self.w3.eth.get_code(Web3.to_checksum_address(address))) > 0
        return self._code[address]

    def known_contract(self, address: str) -> bool | None:
        """`is_contract` if already looked up, else None (no RPC)."""
        return self._code.get(address)

    def erc1271_valid(self, signer: str, digest: bytes, signature: bytes) -> bool:
        wallet = self.w3.eth.contract(address=Web3.to_checksum_address(signer), abi=_ERC1271_ABI)
        try:
            return bytes(wallet.functions.isValidSignature(digest, signature).call()) == ERC1271_MAGIC
        except Exception:  # a reverting or non-conforming wallet is simply not a valid signer
            return False

    def chain_time(self) -> int:
        return int(self.w3.eth.get_block("latest")["timestamp"])

    # -- payee transactions ----------------------------------------------------------------------

    def settle(self, payee: LocalAccount, channel_id: bytes, cumulative: int, signature: bytes) -> TxReceipt:
        fn = self.escrow.functions.settle(self.book.params(channel_id).as_struct(), cumulative, signature)
        return self._changing(channel_id, lambda: send(self.w3, payee, fn, action="settle"))

    def settle_batch(self, payee: LocalAccount, vouchers: list[tuple[bytes, int, bytes]]
                     ) -> tuple[TxReceipt, dict[bytes, bytes]]:
        """`settleBatch` for (channel id, cumulative, 65-byte signature) of channels sharing token and model
        terms, in one transaction. Returns the receipt and the skipped channels with the selector of the error
        a single settle would have raised (the others settled)."""
        first = self.book.params(vouchers[0][0])
        items = [batch_voucher(self.book.params(cid), cumulative, sig) for cid, cumulative, sig in vouchers]
        fn = self.escrow.functions.settleBatch(Web3.to_checksum_address(first.token), first.model_id,
                                               Web3.to_checksum_address(first.publisher), first.publisher_bps, items)
        try:
            receipt = send(self.w3, payee, fn, action="settle batch")
        finally:
            with self._lock:
                for cid, _, _ in vouchers:
                    self._cache.pop(cid, None)
        skipped = {bytes(e["args"]["channelId"]): bytes(e["args"]["reason"])
                   for e in self.escrow.events.SettlementSkipped().process_receipt(receipt, errors=DISCARD)}
        return receipt, skipped

    def close(self, payee: LocalAccount, channel_id: bytes, cumulative: int, signature: bytes) -> TxReceipt:
        fn = self.escrow.functions.close(self.book.params(channel_id).as_struct(), cumulative, signature)
        return self._changing(channel_id, lambda: send(self.w3, payee, fn, action="close"))

    def _changing(self, channel_id: bytes, tx: Callable[[], TxReceipt]) -> TxReceipt:
        """Run a transaction that changes a channel, then drop its cached state (stale either way)."""
        try:
            return tx()
        finally:
            with self._lock:
                self._cache.pop(channel_id, None)

    def earnings(self, token: str, account: str) -> int:
        fn = self.escrow.functions.earnings(Web3.to_checksum_address(token), Web3.to_checksum_address(account))
        return fn.call()

    def claim(self, payee: LocalAccount, token: str) -> TxReceipt:
        fn = self.escrow.functions.claimEarnings(Web3.to_checksum_address(token))
        return send(self.w3, payee, fn, action="claim earnings")
