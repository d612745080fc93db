"""The node's channels kept current from the escrow's events (issue 17), so that admission reads memory.

`sync` follows PaymentChannels' logs in block ranges (eth_getLogs): `ChannelOpened` for channels paying this
node (filtered on the indexed payee), then `ToppedUp`, `CloseRequested`, `CloseCancelled`, `Settled`,
`ChannelClosed` and `Withdrawn` for the channels it knows. Every event carries absolute figures (the new deposit,
the cumulative settled, when a close becomes possible), so a channel's state is a fold of its logs.

Reorganisations: blocks more than `depth` (at least the confirmations setting) below the head are final; they are
folded into the persisted state and the cursor, whose block hash is kept. The newer blocks are read again at every
sync into an overlay that replaces the previous one, so a reorganisation within `depth` blocks is simply what the
next sync reads. A deeper one (the cursor's block hash changed, or the head fell below it, as with anvil's
`evm_revert`) rebuilds the index from the deployment's start block.

Every round trip after the head's block number is one JSON-RPC batch (the logs of both filters and the block
hashes); a restarted node catches up from its persisted cursor before it admits anything.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import sqlite3
import threading
import time
from collections import ChainMap
from collections.abc import Callable, MutableMapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from eth_utils import event_abi_to_log_topic
from web3 import Web3
from web3.contract import Contract

from dcml.client.chain.channel import ChannelParams, ChannelState
from dcml.client.chain.deployment import Deployment
from dcml.client.wire.keccak import keccak

log = logging.getLogger("dcml.channel_index")

_CHANGES = ("ToppedUp", "CloseRequested", "CloseCancelled", "Settled", "ChannelClosed", "Withdrawn")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS channels (
    id BLOB PRIMARY KEY, payer TEXT, payee TEXT, token TEXT, salt BLOB, signer TEXT, model_id BLOB,
    publisher TEXT, bps INTEGER, opened_block INTEGER, deposit TEXT, settled TEXT, close_requested_at INTEGER,
    finalized INTEGER);
"""


def rpc_batch(w3: Web3, calls: list[tuple[str, Any]]) -> list:
    """The results of several JSON-RPC calls sent in ONE batch request through the Web3's provider. Raw on purpose:
    web3's `batch_requests` formats each call and result in Python (about 0.6 ms each, 120 ms for 200 channels)."""
    if not calls:
        return []
    answers: Any = w3.provider.make_batch_request(calls)  # type: ignore[attr-defined]  # HTTPProvider has it
    if isinstance(answers, dict):  # the whole batch was refused
        raise RuntimeError(f"JSON-RPC batch failed: {answers.get('error')}")
    answers = sorted(answers, key=lambda a: a.get("id", 0))
    for answer in answers:
        if "error" in answer:
            raise RuntimeError(f"JSON-RPC error in a batch: {answer['error']}")
    return [a["result"] for a in answers]


def _hex(value: str) -> bytes:
    return bytes.fromhex(value[2:])


def _log(raw: dict) -> dict:
    return {"blockNumber": int(raw["blockNumber"], 16), "logIndex": int(raw["logIndex"], 16),
            "blockHash": _hex(raw["blockHash"]), "topics": [_hex(t) for t in raw["topics"]], "data": _hex(raw["data"])}


@functools.lru_cache(maxsize=65_536)
def _checksum(raw: bytes) -> str:
    """EIP-55 of 20 bytes (web3's validating `to_checksum_address` costs ~10x more, per address of the catch-up)."""
    low = raw.hex()
    mask = keccak(low.encode()).hex()
    return "0x" + "".join(c.upper() if int(m, 16) >= 8 else c for c, m in zip(low, mask, strict=False))


def _word(kind: str, word: bytes):
    """One 32-byte ABI word of a static type."""
    if kind == "address":
        return _checksum(word[12:])
    if kind.startswith("uint"):
        return int.from_bytes(word, "big")
    if kind == "bool":
        return word[-1] != 0
    if kind == "bytes32":
        return word
    raise ValueError(f"unexpected event field type {kind}")


class ChannelIndex:
    """Channel states by id, from the logs. Reads (`get`, `confirmed`) touch memory only; `sync` talks to the
    chain and is shared by concurrent callers."""

    def __init__(self, w3: Web3, escrow: Contract, deployment: Deployment, *, payee: str | None = None,
                 confirmations: int = 1, store: Path | None = None, chunk: int = 5_000, min_depth: int = 8,
                 on_open: Callable[[bytes, ChannelParams], None] | None = None) -> None:
        self.w3 = w3
        self.escrow = escrow
        self.start_block = deployment.start_block
        self.grace_period = deployment.close_grace_period
        self.chain_id = deployment.chain_id
        self.payee = Web3.to_checksum_address(payee) if payee else None
        self.confirmations = confirmations
        self.depth = max(confirmations, min_depth)  # blocks below the head that may still be reorganised
        self.chunk = chunk  # blocks per eth_getLogs (public RPCs cap the range)
        self.on_open = on_open
        self.after_sync: Callable[[], None] | None = None  # run after each successful sync (inside its lock)
        self._events: dict[bytes, tuple[str, Any]] = {}  # topic0 -> (name, abi)
        for name in ("ChannelOpened", *_CHANGES):
            abi = escrow.events[name]().abi
            self._events[event_abi_to_log_topic(abi)] = (name, abi)
        self._opened_topic = next(t for t, (n, _) in self._events.items() if n == "ChannelOpened")
        # Decoded logs of the unfinal tail, which every sync reads again: decoded once.
        self._decoded: dict[tuple[bytes, int], tuple[str, dict]] = {}
        self._final: dict[bytes, ChannelState] = {}
        self._final_opened: dict[bytes, int] = {}  # block of each final opening
        self._overlay: dict[bytes, ChannelState] = {}  # the unfinal blocks' view, replaced whole by each sync
        self._overlay_opened: dict[bytes, int] = {}
        self.cursor = self.start_block - 1  # last final block folded in
        self._cursor_hash: bytes | None = None
        self.head = -1  # the chain head at the last sync
        self.synced_at = float("-inf")  # monotonic start of the last successful sync
        self.syncs = 0
        self.resets = 0  # rebuilds after a deep reorganisation: a reader of `take_touched` must then look at all
        self._touched: set[bytes] = set()  # ids whose state changed since the last `take_touched`
        self.resumed_from: int | None = None  # the first block this process read (the persisted cursor + 1)
        self.round_trips = 0  # HTTP round trips to the RPC (a batch counts once): what the benches print
        self._sync_lock = threading.Lock()
        self._db: sqlite3.Connection | None = None
        if store is not None:
            self._open_store(Path(store))

    # -- reads (memory only) ---------------------------------------------------------------------

    def get(self, channel_id: bytes) -> ChannelState | None:
        found = self._overlay.get(channel_id)
        return found if found is not None else self._final.get(channel_id)

    def confirmed(self, channel_id: bytes) -> bool | None:
        """Whether the channel's opening is `confirmations` deep at the last synced head (None: not indexed)."""
        block = self._overlay_opened.get(channel_id, self._final_opened.get(channel_id))
        if block is None:
            return None
        return block <= self.head - self.confirmations + 1

    def take_touched(self) -> set[bytes]:
        """The ids whose state changed (or may have: the unfinal tail's) since the last call; for the settlement
        worker, which then looks only at those and at what the ledger changed."""
        touched, self._touched = self._touched, set()
        return touched

    def __len__(self) -> int:
        return len(ChainMap(self._overlay, self._final))

    def age(self) -> float:
        return time.monotonic() - self.synced_at

    # -- sync --------------------------------------------------------------------------------------

    def sync(self, since: float | None = None) -> None:
        """Bring the index to the chain head. Returns once a sync that started at or after `since` (default: now)
        finished: concurrent callers share one."""
        since = time.monotonic() if since is None else since
        with self._sync_lock:
            if self.synced_at >= since:
                return
            started = time.monotonic()
            self._sync()
            if self.after_sync is not None:
                self.after_sync()
            self.synced_at = started
            self.syncs += 1

    def _sync(self) -> None:
        if self.resumed_from is None:
            self.resumed_from = self.cursor + 1
        head = self.w3.eth.block_number
        self.round_trips += 1
        if head < self.cursor:
            self._reset(f"the chain head {head} is below the index's cursor {self.cursor}")
        final_to = max(head - self.depth, self.cursor)
        start, verify = self.cursor + 1, self.cursor >= self.start_block
        while True:
            upto = min(final_to, start + self.chunk - 1)  # final blocks of this round trip
            last = upto == final_to
            to = head if last else upto  # the last one also reads the unfinal tail
            logs, upto_hash, cursor_hash = self._fetch(start, to, upto, self.cursor if verify else None)
            if verify and cursor_hash != self._cursor_hash:
                self._reset(f"block {self.cursor} is not the one indexed (a reorganisation deeper than "
                            f"{self.depth} blocks)")
                return self._sync()
            verify = False
            final = [entry for entry in logs if entry["blockNumber"] <= upto]
            if upto >= start:
                changed = self._fold(self._final, self._final_opened, final)
                self._touched |= changed
                self.cursor, self._cursor_hash = upto, upto_hash
                self._persist(changed)
            if last:
                overlay: dict[bytes, ChannelState] = {}
                opened: dict[bytes, int] = {}
                tail = [entry for entry in logs if entry["blockNumber"] > upto]
                self._touched |= self._fold(ChainMap(overlay, self._final), ChainMap(opened, self._final_opened), tail)
                self._touched |= self._overlay.keys() - overlay.keys()  # changes a reorganisation took back
                keep = {(e["blockHash"], e["logIndex"]) for e in tail}  # the next sync reads these again
                self._decoded = {k: v for k, v in self._decoded.items() if k in keep}
                self._overlay, self._overlay_opened, self.head = overlay, opened, head
                return None
            start = upto + 1

    def _fetch(self, start: int, to: int, upto: int, verify: int | None) -> tuple[list, bytes | None, bytes | None]:
        """One batch: both filters' logs over [start, to], the hash of block `upto` (the new cursor) and of block
        `verify` (the old cursor, to detect a deep reorganisation). Logs sorted in chain order."""
        address = self.escrow.address
        changes = ["0x" + t.hex() for t, (n, _) in self._events.items() if n != "ChannelOpened"]
        payee_topic = None if self.payee is None else "0x" + "00" * 12 + self.payee[2:].lower()
        span = {"address": address, "fromBlock": hex(start), "toBlock": hex(to)}
        calls = [("eth_getLogs", [{**span, "topics": ["0x" + self._opened_topic.hex(), None, None, payee_topic]}]),
                 ("eth_getLogs", [{**span, "topics": [changes]}])]
        if upto >= start:
            calls.append(("eth_getBlockByNumber", [hex(upto), False]))
        if verify is not None:
            calls.append(("eth_getBlockByNumber", [hex(verify), False]))
        opened, other, *blocks = rpc_batch(self.w3, calls)
        self.round_trips += 1
        upto_hash = _hex(blocks.pop(0)["hash"]) if upto >= start else self._cursor_hash
        cursor_hash = _hex(blocks[0]["hash"]) if verify is not None and blocks[0] else None
        logs = sorted((_log(e) for e in [*opened, *other] if not e.get("removed")),
                      key=lambda e: (e["blockNumber"], e["logIndex"]))
        return logs, upto_hash, cursor_hash

    def _fold(self, states: MutableMapping[bytes, ChannelState], opened_at: MutableMapping[bytes, int],
              logs: list) -> set[bytes]:
        """Apply logs in chain order; returns the ids changed. Events of channels not indexed (another payee's)
        are skipped."""
        changed: set[bytes] = set()
        for entry in logs:
            name, a = self._decode(entry)
            cid = bytes(a["channelId"])
            if name == "ChannelOpened":
                params = ChannelParams(a["payer"], a["payee"], a["token"], bytes(a["salt"]), a["authorizedSigner"],
                                       bytes(a["modelId"]), a["publisher"], a["publisherBps"])
                if self._channel_id(params) != cid:
                    continue  # not what the escrow would have emitted: a lying RPC
                states[cid] = ChannelState(cid, params, a["deposit"], 0, 0, False)
                opened_at[cid] = entry["blockNumber"]
                if self.on_open is not None:
                    self.on_open(cid, params)
                changed.add(cid)
                continue
            state = states.get(cid)
            if state is None:
                continue
            if name == "ToppedUp":
                state = replace(state, deposit=a["newDeposit"])
            elif name == "CloseRequested":
                state = replace(state, close_requested_at=a["closableAt"] - self.grace_period)
            elif name == "CloseCancelled":
                state = replace(state, close_requested_at=0)
            elif name == "Settled":
                state = replace(state, settled=a["cumulativeAmount"])
            elif name == "ChannelClosed":
                state = replace(state, settled=a["settled"], finalized=True)
            else:  # Withdrawn
                state = replace(state, finalized=True)
            states[cid] = state
            changed.add(cid)
        return changed

    def _decode(self, entry) -> tuple[str, dict]:
        """(event name, args) of a log, by its ABI (eth_abi directly: web3's `process_log` is ~10x slower)."""
        key = (entry["blockHash"], entry["logIndex"])
        hit = self._decoded.get(key)
        if hit is not None:
            return hit
        name, abi = self._events[entry["topics"][0]]
        indexed = [i for i in abi["inputs"] if i["indexed"]]
        plain = [i for i in abi["inputs"] if not i["indexed"]]
        data = entry["data"]
        if len(data) != 32 * len(plain):
            raise ValueError(f"malformed {name} log: {len(data)} bytes of data")
        # Every field of these events is a static type: one 32-byte word each, in order.
        args = {i["name"]: _word(i["type"], data[32 * k:32 * k + 32]) for k, i in enumerate(plain)}
        for i, topic in zip(indexed, entry["topics"][1:], strict=True):
            args[i["name"]] = _word(i["type"], topic)
        self._decoded[key] = (name, args)
        return name, args

    def _channel_id(self, p: ChannelParams) -> bytes:
        """`ChannelParams.channel_id` (keccak of the abi-encoded terms, escrow and chain id), with the words laid out
        directly: every field is static, and eth_abi's encoder costs more than the rest of an opening's fold."""
        def addr(a: str) -> bytes:
            return bytes(12) + bytes.fromhex(a[2:])

        words = [addr(p.payer), addr(p.payee), addr(p.token), p.salt, addr(p.authorized_signer), p.model_id,
                 addr(p.publisher), p.publisher_bps.to_bytes(32, "big"), addr(self.escrow.address),
                 self.chain_id.to_bytes(32, "big")]
        return keccak(b"".join(words))

    def _reset(self, why: str) -> None:
        log.warning("channel index rebuilt from block %d: %s", self.start_block, why)
        self.resets += 1
        self._final, self._final_opened, self._overlay, self._overlay_opened = {}, {}, {}, {}
        self.cursor, self._cursor_hash = self.start_block - 1, None
        if self._db is not None:
            with self._txn():
                self._db.execute("DELETE FROM channels")
                self._db.execute("DELETE FROM meta WHERE key IN ('cursor', 'cursor_hash')")

    # -- persistence -------------------------------------------------------------------------------

    def _open_store(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # rebuildable from the chain: a lost tail is re-read
        self._db.executescript(_SCHEMA)
        # The index is rebuildable from the chain: a store for another escrow, chain or payee starts over.
        key = f"{self.escrow.address.lower()}:{self.chain_id}:{(self.payee or '*').lower()}:{self.start_block}"
        meta = dict(self._db.execute("SELECT key, value FROM meta").fetchall())
        if meta.get("key") != key:
            with self._txn():
                self._db.execute("DELETE FROM channels")
                self._db.execute("DELETE FROM meta")
                self._db.execute("INSERT INTO meta VALUES ('key', ?)", (key,))
            return
        if "cursor" in meta:
            self.cursor, self._cursor_hash = int(meta["cursor"]), bytes.fromhex(meta["cursor_hash"])
        for row in self._db.execute("SELECT * FROM channels"):
            cid, payer, payee, token, salt, signer, model_id, publisher, bps, block, dep, settled, close, fin = row
            params = ChannelParams(payer, payee, token, bytes(salt), signer, bytes(model_id), publisher, bps)
            self._final[bytes(cid)] = ChannelState(bytes(cid), params, int(dep), int(settled), close, bool(fin))
            self._final_opened[bytes(cid)] = block
            if self.on_open is not None:
                self.on_open(bytes(cid), params)

    @contextlib.contextmanager
    def _txn(self):
        """One transaction (the connection is in autocommit mode, where `with conn:` would commit each statement)."""
        assert self._db is not None
        self._db.execute("BEGIN")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def _persist(self, changed: set[bytes]) -> None:
        """The changed final channels and the new cursor, in one transaction (a crash keeps both or neither)."""
        if self._db is None:
            return
        rows = []
        for cid in changed:
            s, p = self._final[cid], self._final[cid].params
            rows.append((cid, p.payer, p.payee, p.token, p.salt, p.authorized_signer, p.model_id, p.publisher,
                         p.publisher_bps, self._final_opened[cid], str(s.deposit), str(s.settled),
                         s.close_requested_at, int(s.finalized)))
        with self._txn():
            self._db.executemany("INSERT OR REPLACE INTO channels VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)", rows)
            self._db.execute("INSERT OR REPLACE INTO meta VALUES ('cursor', ?)", (str(self.cursor),))
            self._db.execute("INSERT OR REPLACE INTO meta VALUES ('cursor_hash', ?)",
                             ((self._cursor_hash or b"").hex(),))

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None


class Poller:
    """Keeps an index current in a background thread; a failed sync is logged and retried next time."""

    def __init__(self, index: ChannelIndex, interval: float) -> None:
        self.index = index
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="channel-index", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.index.sync()
            except Exception as exc:  # the next poll retries; reads keep the last synced state
                log.warning("channel index sync failed: %s: %s", type(exc).__name__, str(exc)[:300])

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
