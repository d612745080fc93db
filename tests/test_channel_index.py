"""Channel state from the escrow's events (issue 17), with a real node on a real anvil: a TopUp, a CloseRequested
and a finalisation (the channel closed by a transaction the node did not send) each land while a paid stream is
in flight and are seen by the node from the logs; a node that missed events while down catches up from its
persisted cursor before it admits anything; a cold miss costs one batched read, not an RPC per channel."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from web3 import Web3

from dcml.client.chain.deployment import Deployment
from dcml.client.demo.kit.nodes import MODEL, PaidNode, funded_wallet, paid_settings, serve_node
from dcml.client.demo.kit.raw_payer import RawPayer, _data, _event_name
from dcml.client.wire.x402 import NEED_VOUCHER_EVENT, PAYMENT_SIGNATURE, PAYMENT_TIMEOUT_EVENT
from dcml.node.identity import EnclaveIdentity
from dcml.node.payments.chain import ChannelChain

ADMIT = 10**14  # the admission voucher: the prompt and the first few output tokens


def start_node(w3: Web3, deployment_file: Path, data_dir: Path, identity: EnclaveIdentity) -> PaidNode:
    return serve_node(w3, paid_settings(deployment_file, data_dir, prepay_tokens=0, credit_tokens=4,
                                        voucher_timeout_s=2.0), identity=identity)


@pytest.fixture(scope="module")
def node(w3: Web3, deployment_file: Path, tmp_path_factory: pytest.TempPathFactory):
    paid = start_node(w3, deployment_file, tmp_path_factory.mktemp("node"), EnclaveIdentity.generate())
    yield paid
    paid.server.stop()


def chain_of(node: PaidNode) -> ChannelChain:
    return node.app.state.node.gate.payments.chain


def wait_for(what: Callable[[], bool], why: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not what():
        assert time.monotonic() < deadline, why
        time.sleep(0.05)


def paid_stream(payer: RawPayer, max_tokens: int, on_need: Callable[[int], None]) -> dict:
    """One paid stream that pays every payment-need-voucher; `on_need(n)` runs before the n-th voucher is posted
    (while the stream is in flight, paused for it). Returns each voucher's (status, code) and the outcome."""
    body = json.dumps({"model": MODEL, "prompt": "index test", "max_tokens": max_tokens, "stream": True,
                       "stream_options": {"include_usage": True}}).encode()
    headers = {"content-type": "application/json",
               PAYMENT_SIGNATURE: payer.voucher(payer.cumulative + ADMIT).to_header()}
    out: dict = {"vouchers": [], "timed_out": False, "raw": b""}
    with payer.http.stream("POST", f"{payer.node_url}/v1/completions", content=body, headers=headers) as r:
        assert r.status_code == 200, r.read()
        buf = b""
        for piece in r.iter_bytes():
            buf += piece
            out["raw"] += piece
            while b"\n\n" in buf:
                block, buf = buf.split(b"\n\n", 1)
                event = _event_name(block)
                if event == NEED_VOUCHER_EVENT:
                    on_need(len(out["vouchers"]))
                    resp = payer.post_voucher(int(json.loads(_data(block))["requiredCumulative"]))
                    code = None if resp.status_code == 200 else resp.json()["error"]["code"]
                    out["vouchers"].append((resp.status_code, code))
                elif event == PAYMENT_TIMEOUT_EVENT:
                    out["timed_out"] = True
    return out


def test_top_up_during_a_stream_is_seen_from_its_event(node: PaidNode, w3: Web3, deployment: Deployment) -> None:
    deposit = 2 * 10**14  # about 30 output tokens past the admission: the stream needs more than the deposit
    payer = RawPayer(w3, deployment, funded_wallet(w3, deployment), node.url, node.identity.address, deposit=deposit)
    chain, cid = chain_of(node), payer.channel_id

    def on_need(n: int) -> None:
        if n == 0:
            payer.channels.top_up(cid, 10**15)
            # The poller reads the ToppedUp log: no voucher had to ask for a fresh read.
            wait_for(lambda: chain.index.get(cid).deposit == deposit + 10**15, "the top-up never reached the index")

    out = paid_stream(payer, 200, on_need)
    assert not out["timed_out"] and out["vouchers"] and all(s == 200 for s, _ in out["vouchers"]), out["vouchers"]
    assert payer.cumulative > deposit  # vouchers above the old deposit were accepted mid-stream
    assert node.ledger.get("0x" + cid.hex()).accepted == payer.cumulative


def test_close_requested_during_a_stream_is_settled_and_refused(node: PaidNode, w3: Web3,
                                                                 deployment: Deployment) -> None:
    payer = RawPayer(w3, deployment, funded_wallet(w3, deployment), node.url, node.identity.address, deposit=10**16)
    chain, cid, hex_id = chain_of(node), payer.channel_id, "0x" + payer.channel_id.hex()

    def on_need(n: int) -> None:
        if n == 0:
            payer.channels.request_close(cid)
            wait_for(lambda: chain.index.get(cid).close_requested_at > 0, "the close request never reached the index")
            # The settlement worker closes it (everything accepted settled, the rest refunded) from the index.
            wait_for(lambda: node.ledger.get(hex_id).finalized, "the worker did not close the channel")

    out = paid_stream(payer, 200, on_need)
    assert out["vouchers"][0] == (402, "channel_finalized")  # the stream's next voucher is refused
    assert out["timed_out"]  # and the stream ends instead of serving unpaid output
    on_chain = payer.channels.get(cid)
    assert on_chain.finalized and on_chain.settled == node.ledger.get(hex_id).accepted == ADMIT
    assert chain.index.get(cid).finalized


def test_finalisation_by_another_transaction_during_a_stream(node: PaidNode, w3: Web3,
                                                             deployment: Deployment) -> None:
    """The channel is closed on-chain by a transaction this node's process did not send (an operator's tool, a
    second instance): only its ChannelClosed log tells the node."""
    payer = RawPayer(w3, deployment, funded_wallet(w3, deployment), node.url, node.identity.address, deposit=10**16)
    chain, cid, hex_id = chain_of(node), payer.channel_id, "0x" + payer.channel_id.hex()
    outsider = ChannelChain(w3, deployment)

    def on_need(n: int) -> None:
        if n == 0:
            held = node.ledger.get(hex_id)
            outsider.close(node.identity.account, cid, held.accepted, bytes.fromhex(held.signature[2:]))
            wait_for(lambda: chain.index.get(cid).finalized, "the ChannelClosed log never reached the index")

    out = paid_stream(payer, 200, on_need)
    assert out["vouchers"][0] == (402, "channel_finalized") and out["timed_out"]
    wait_for(lambda: node.ledger.get(hex_id).finalized, "the ledger never learnt the channel is finalized")
    assert payer.channels.get(cid).settled == node.ledger.get(hex_id).settled == ADMIT


def test_node_that_missed_events_while_down_catches_up_at_start(w3: Web3, deployment: Deployment,
                                                               deployment_file: Path, tmp_path: Path) -> None:
    identity, data = EnclaveIdentity.generate(), tmp_path / "node"
    first = start_node(w3, deployment_file, data, identity)
    x = RawPayer(w3, deployment, funded_wallet(w3, deployment), first.url, identity.address, deposit=10**16)
    assert x.ask("before the restart", max_tokens=4).status == 200
    depth = chain_of(first).index.depth
    for _ in range(depth + 1):  # the opening becomes final: folded into the persisted state and cursor
        w3.provider.make_request("evm_mine", [])
    chain_of(first).sync()
    first.server.stop()
    db = sqlite3.connect(data / "channel_index.sqlite")
    cursor = int(db.execute("SELECT value FROM meta WHERE key='cursor'").fetchone()[0])
    assert db.execute("SELECT COUNT(*) FROM channels WHERE id=?", (x.channel_id,)).fetchone()[0] == 1
    db.close()

    # While the node is down: a top-up and a close request on X, and a new channel Y.
    x.channels.top_up(x.channel_id, 10**15)
    x.channels.request_close(x.channel_id)
    y = RawPayer(w3, deployment, funded_wallet(w3, deployment), first.url, identity.address, deposit=10**16)

    second = start_node(w3, deployment_file, data, identity)
    try:
        index = chain_of(second).index
        assert index.resumed_from == cursor + 1  # from the persisted cursor, not from the deployment block
        state = index.get(x.channel_id)  # caught up before the server took its first request
        assert state.deposit == 10**16 + 10**15 and state.close_requested_at > 0
        assert index.get(y.channel_id) is not None and index.get(y.channel_id).deposit == 10**16
        hex_x = "0x" + x.channel_id.hex()
        wait_for(lambda: second.ledger.get(hex_x).finalized, "the missed close request was not acted on")
        assert x.channels.get(x.channel_id).settled == second.ledger.get(hex_x).accepted > 0
        y.node_url = second.url
        assert y.ask("after the restart", max_tokens=4).status == 200
    finally:
        second.server.stop()


def test_first_contacts_arriving_together_share_one_batched_read(w3: Web3, deployment: Deployment,
                                                                   node_account, channels, tmp_path: Path) -> None:
    """20 channels opened after the index's last sync, read by 20 threads at once: their getChannel reads go out
    in a few JSON-RPC batches (not 20 requests) and the index syncs a few times, not 20."""
    chain = ChannelChain(w3, deployment, payee=node_account.address, store=tmp_path / "index.sqlite")
    chain.sync()
    keys = [channels.open(node_account.address, 10**15, session_key=node_account.address) for _ in range(20)]
    reads, syncs = chain.batched_reads, chain.index.syncs
    gate = threading.Barrier(20)
    states = {}

    def read(cid: bytes) -> None:
        gate.wait()
        states[cid] = chain.channel(cid)

    threads = [threading.Thread(target=read, args=(cid,)) for cid in keys]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(states[cid].deposit == 10**15 and states[cid].payee == node_account.address for cid in keys)
    # (a few, not one: misses that arrive while a read is on the wire go in the next; slack for a loaded machine)
    assert chain.batched_reads - reads <= 5 and chain.index.syncs - syncs <= 5
    chain.stop()


def test_settlement_rounds_look_only_at_what_changed(w3: Web3, deployment: Deployment, node_account, channels,
                                                     tmp_path: Path) -> None:
    """After a full round, a round looks at the channels the ledger wrote or the index saw change since, and
    at nothing else: a close request (no ledger write) and a voucher past the threshold are both acted on."""
    from eth_account import Account

    from dcml.client.demo.kit.payments import node_payments

    node = node_payments(w3, deployment, node_account, tmp_path, threshold=5000)
    keys = [Account.create() for _ in range(3)]
    ids = [channels.open(node_account.address, 10**15, session_key=k.address) for k in keys]
    for cid, key in zip(ids, keys, strict=True):
        node.verifier.accept(channels.sign_voucher(key, cid, 1000))
    node.worker.write_overlap_s = 0.0  # (the overlap covers commits racing a round; none here)
    for _ in range(node.chain.index.depth + 1):  # the openings leave the index's unfinal tail
        w3.provider.make_request("evm_mine", [])
    assert node.worker.run_once() == []  # the first round is a full one: nothing due
    assert node.worker._candidates(full=False) == []  # nothing changed since: no channel is even looked at
    channels.request_close(ids[0])  # an on-chain change only: the ledger is not written
    node.verifier.accept(channels.sign_voucher(keys[1], ids[1], 6000))  # a ledger change: now past the threshold
    node.chain.sync()  # (what the node's poller does every index_poll_s)
    actions = {a.channel_id: a.action for a in node.worker.run_once()}
    assert actions == {"0x" + ids[0].hex(): "close", "0x" + ids[1].hex(): "settle"}
    assert channels.get(ids[0]).finalized and channels.get(ids[1]).settled == 6000
    assert channels.get(ids[2]).settled == 0
    node.chain.stop()


def test_reorganisations_within_and_beyond_the_depth(w3: Web3, deployment: Deployment, node_account, channels,
                                                    session_key, tmp_path: Path) -> None:
    """A reorganisation inside the unfinal tail is simply what the next sync reads; one that takes back a block the
    index made final (the cursor's hash changed) rebuilds the index, persisted store included."""
    chain = ChannelChain(w3, deployment, payee=node_account.address, store=tmp_path / "index.sqlite")
    chain.sync()
    kept = channels.open(node_account.address, 10**15, session_key=session_key.address)
    snapshot = w3.provider.make_request("evm_snapshot", [])["result"]
    shallow = channels.open(node_account.address, 10**15, session_key=session_key.address)
    chain.sync()
    assert chain.index.get(shallow) is not None
    assert w3.provider.make_request("evm_revert", [snapshot])["result"] is True
    w3.provider.make_request("evm_mine", [])
    chain.sync()
    assert chain.index.get(shallow) is None and chain.index.get(kept) is not None and chain.index.resets == 0

    snapshot = w3.provider.make_request("evm_snapshot", [])["result"]
    deep = channels.open(node_account.address, 10**15, session_key=session_key.address)
    for _ in range(chain.index.depth + 2):
        w3.provider.make_request("evm_mine", [])
    chain.sync()
    assert chain.index.cursor >= w3.eth.block_number - chain.index.depth and chain.index.get(deep) is not None
    assert w3.provider.make_request("evm_revert", [snapshot])["result"] is True
    for _ in range(chain.index.depth + 4):  # the head passes the old cursor again, on other blocks
        w3.provider.make_request("evm_mine", [])
    chain.sync()
    assert chain.index.resets == 1 and chain.index.get(deep) is None and chain.index.get(kept) is not None
    chain.stop()
    reopened = ChannelChain(w3, deployment, payee=node_account.address, store=tmp_path / "index.sqlite")
    assert reopened.index.get(deep) is None and reopened.index.get(kept) is not None  # the store was rebuilt too
    reopened.stop()
