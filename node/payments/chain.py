"""The node's view of channels on-chain: state from the escrow's events (`channel_index`), read from memory,
and the payee's settle/close/claim transactions."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path

from eth_abi import decode as abi_decode
from eth_account.signers.local import LocalAccount
from eth_utils import function_abi_to_4byte_selector
from web3 import Web3
from web3.logs import DISCARD
from web3.types import TxReceipt

from dcml.client.chain.channel import ChannelBook, ChannelState, UnknownChannel, batch_voucher
from dcml.client.chain.contracts import contract
from dcml.client.chain.deployment import Deployment
from dcml.client.chain.tx import send
from dcml.node.payments.channel_index import ChannelIndex, Poller, rpc_batch

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
    """A thin reader over the channel index: a read is a dict lookup. Only a channel the index does not have yet
    costs RPCs: the ids that miss together are read in ONE batched `getChannel` request (a never-opened id stops
    there, and is remembered for `negative_ttl`), then one shared index sync picks up the openings.

    Without a running poller (`start`), a read syncs the index first when its last sync is older than `ttl`."""

    def __init__(self, w3: Web3, deployment: Deployment, *, ttl: float = 5.0, confirmations: int = 1,
                 payee: str | None = None, store: Path | None = None) -> None:
        self.w3 = w3
        self.deployment = deployment
        self.escrow = contract(w3, "PaymentChannels", deployment.payment_channels)
        self.book = ChannelBook(self.escrow, deployment)
        self.ttl = ttl
        self.grace_period = deployment.close_grace_period
        self.confirmations = confirmations
        self._code: dict[str, bool] = {}
        self._new_signers: set[str] = set()  # session signers of newly indexed channels, whose code is unknown
        self.index = ChannelIndex(w3, self.escrow, deployment, payee=payee, confirmations=confirmations, store=store,
                                  on_open=self._opened)
        self.index.after_sync = self._fetch_codes
        self._poller: Poller | None = None
        self._changed: dict[bytes, float] = {}  # channels this node's own transactions changed, and when
        self._lock = threading.Lock()
        # Channels that exist but that the index does not hold (another payee's): briefly cached, so that a
        # stranger's vouchers do not make a sync each.
        self._foreign: dict[bytes, tuple[float, ChannelState]] = {}
        # Ids a stranger sent that have no channel, with when that was read: junk vouchers cost one cached
        # dict lookup, not an RPC each (and never a log scan).
        self._unknown: dict[bytes, float] = {}
        self.negative_ttl = 5.0
        self._misses: dict[bytes, Future] = {}  # cold misses waiting for the next batched read
        self._misses_lock = threading.Lock()
        self._reading = threading.Lock()  # one batched read at a time; the next one takes all that queued meanwhile
        self.batched_reads = 0

    # -- the index ---------------------------------------------------------------------------------

    def start(self, interval: float = 1.0) -> None:
        """Keep the index current in the background (the node does; scripts and tests may rely on `ttl`)."""
        if self._poller is None:
            self._poller = Poller(self.index, interval)
            self._poller.start()

    def stop(self) -> None:
        if self._poller is not None:
            self._poller.stop()
            self._poller = None
        self.index.close()

    def _opened(self, channel_id: bytes, params) -> None:
        self.book.add(channel_id, params)
        if params.authorized_signer not in self._code:
            self._new_signers.add(params.authorized_signer)

    def _fetch_codes(self) -> None:
        """Whether each new channel's session signer is a contract (the gate asks at admission): one batch for
        all the signers a sync found, instead of an eth_getCode per first contact."""
        while self._new_signers:
            signers = [self._new_signers.pop() for _ in range(min(500, len(self._new_signers)))]
            codes = rpc_batch(self.w3, [("eth_getCode", [signer, "latest"]) for signer in signers])
            for signer, code in zip(signers, codes, strict=True):
                self._code[signer] = code not in ("0x", "", None)

    def sync(self, *, max_age: float = 0.0) -> None:
        """Bring the index to the head unless its last sync is younger than `max_age` seconds."""
        self.index.sync(time.monotonic() - max_age)

    def confirmed(self, channel_id: bytes) -> bool:
        """Whether the channel's opening is at least `confirmations` blocks deep (1: mined), from the index: a
        channel not deep enough at the last synced head makes one (shared) sync before it is refused. A channel
        the index does not hold is another payee's (refused for that) or gone (it reads as deposit 0)."""
        if self.confirmations <= 1:
            return True
        deep = self.index.confirmed(channel_id)
        if deep is False:
            self.index.sync()
            deep = self.index.confirmed(channel_id)
        return deep is not False

    def local(self, channel_id: bytes) -> ChannelState | None:
        """The channel as `channel` would return it, when that needs no chain read (the index holds it and no
        sync is due); else None. For the event loop: the admission's common case without a thread hop."""
        if self._poller is None:
            return None  # without the poller every read checks the index's age: leave it to `channel`
        changed = self._changed.get(channel_id)
        if changed is not None and self.index.synced_at < changed:
            return None
        return self.index.get(channel_id)

    def confirmed_local(self, channel_id: bytes) -> bool:
        """`confirmed` when the index already says so (no sync)."""
        return self.confirmations <= 1 or self.index.confirmed(channel_id) is True

    def channel(self, channel_id: bytes, *, fresh: bool = False) -> ChannelState:
        """Raises UnknownChannel for an id never opened on this escrow. `fresh`: sync the index first."""
        now = time.monotonic()
        if fresh:
            self.index.sync(now)
        else:
            changed = self._changed.get(channel_id)  # after this node's own transaction on it: read what it did
            since = float("-inf") if changed is None else changed
            if self._poller is None and self.index.get(channel_id) is not None:
                since = max(since, now - self.ttl)  # (an id the index lacks takes the cold path: no log scan)
            if self.index.synced_at < since:
                self.index.sync(since)
            if changed is not None and self.index.synced_at >= changed:
                self._changed.pop(channel_id, None)
        state = self.index.get(channel_id)
        if state is not None:
            return state
        hit = self._foreign.get(channel_id)
        if hit and not fresh and now - hit[0] < self.ttl:
            return hit[1]
        return self._cold(channel_id, now)

    def _cold(self, channel_id: bytes, now: float) -> ChannelState:
        seen = self._unknown.get(channel_id)
        if seen is not None and now - seen < self.negative_ttl:
            raise UnknownChannel(f"channel 0x{channel_id.hex()} was never opened on escrow {self.escrow.address}")
        raw = self._read_batched(channel_id)
        if raw["deposit"] == 0:  # a channel exists iff its deposit is not 0
            if self.book.known(channel_id):  # it did once: its opening was reorganised away
                return ChannelState(channel_id, self.book.params(channel_id), 0, 0, 0, False)
            with self._lock:
                if len(self._unknown) >= 100_000:  # bounded: a flood of distinct ids cannot grow memory
                    self._unknown.clear()
                self._unknown[channel_id] = now
            raise UnknownChannel(f"channel 0x{channel_id.hex()} was never opened on escrow {self.escrow.address}")
        state = self.index.get(channel_id)  # a sync since this miss began may have brought it
        if state is None:
            self.index.sync(now)  # opened since the last sync: one sync for every miss of this moment
            state = self.index.get(channel_id)
        if state is not None:
            return state
        # Not ours (the index holds only channels paying this node): terms from its opening, once.
        state = ChannelState(channel_id, self.book.params(channel_id), raw["deposit"], raw["settled"],
                             raw["closeRequestedAt"], raw["finalized"])
        with self._lock:
            if len(self._foreign) >= 10_000:
                self._foreign.clear()
            self._foreign[channel_id] = (now, state)
        return state

    def _read_batched(self, channel_id: bytes) -> dict:
        """`getChannel` for this id, in one JSON-RPC batch with every other id that missed meanwhile."""
        with self._misses_lock:
            fut = self._misses.get(channel_id)
            if fut is None:
                fut = self._misses[channel_id] = Future()
        with self._reading:
            if not fut.done():
                with self._misses_lock:
                    pending, self._misses = self._misses, {}
                try:
                    results = self._get_channels(list(pending))
                except BaseException as exc:
                    for f in pending.values():
                        f.set_exception(exc)
                else:
                    for cid, f in pending.items():
                        f.set_result(results[cid])
        return fut.result()

    def _get_channels(self, ids: list[bytes]) -> dict[bytes, dict]:
        """`getChannel` of each id: eth_calls in one JSON-RPC batch, decoded by the ABI's component names."""
        components = self.escrow.get_function_by_name("getChannel").abi["outputs"][0]["components"]
        struct = "(" + ",".join(c["type"] for c in components) + ")"
        selector = function_abi_to_4byte_selector(self.escrow.get_function_by_name("getChannel").abi)
        to = self.escrow.address
        answers = rpc_batch(self.w3, [("eth_call", [{"to": to, "data": "0x" + (selector + cid).hex()}, "latest"])
                                      for cid in ids])
        self.batched_reads += 1
        return {cid: dict(zip((c["name"] for c in components), abi_decode([struct], bytes.fromhex(a[2:]))[0],
                              strict=True))
                for cid, a in zip(ids, answers, strict=True)}

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
        return self._changing([channel_id], lambda: send(self.w3, payee, fn, action="settle"))

    def settle_batch(self, payee: LocalAccount, vouchers: list[tuple[bytes, int, bytes]]
                     ) -> tuple[TxReceipt, dict[bytes, bytes]]:
        """`settleBatch` for (channel id, cumulative, 65-byte signature) of channels sharing token and model
        terms, in one transaction. Returns the receipt and the skipped channels with the selector of the error
        a single settle would have raised (the others settled)."""
        first = self.book.params(vouchers[0][0])
        items = [batch_voucher(self.book.params(cid), cumulative, sig) for cid, cumulative, sig in vouchers]
        fn = self.escrow.functions.settleBatch(Web3.to_checksum_address(first.token), first.model_id,
                                               Web3.to_checksum_address(first.publisher), first.publisher_bps, items)
        receipt = self._changing([cid for cid, _, _ in vouchers],
                                 lambda: send(self.w3, payee, fn, action="settle batch"))
        skipped = {bytes(e["args"]["channelId"]): bytes(e["args"]["reason"])
                   for e in self.escrow.events.SettlementSkipped().process_receipt(receipt, errors=DISCARD)}
        return receipt, skipped

    def close(self, payee: LocalAccount, channel_id: bytes, cumulative: int, signature: bytes) -> TxReceipt:
        fn = self.escrow.functions.close(self.book.params(channel_id).as_struct(), cumulative, signature)
        return self._changing([channel_id], lambda: send(self.w3, payee, fn, action="close"))

    def _changing(self, channel_ids: list[bytes], tx: Callable[[], TxReceipt]) -> TxReceipt:
        """Run a transaction that changes these channels; the next read of each syncs the index first (stale
        either way)."""
        try:
            return tx()
        finally:
            with self._lock:
                for channel_id in channel_ids:
                    self._changed[channel_id] = time.monotonic()
                    self._foreign.pop(channel_id, None)

    def earnings(self, token: str, account: str) -> int:
        fn = self.escrow.functions.earnings(Web3.to_checksum_address(token), Web3.to_checksum_address(account))
        return fn.call()

    def claim(self, payee: LocalAccount, token: str) -> TxReceipt:
        fn = self.escrow.functions.claimEarnings(Web3.to_checksum_address(token))
        return send(self.w3, payee, fn, action="claim earnings")
