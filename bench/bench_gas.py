"""Gas of every channel operation, measured from real transaction receipts on anvil.

    .venv/bin/python bench/bench_gas.py [--json]

Goals: settle <= 50k, close <= 65k, open <= 90k, NodeRegistry.register <= 250k (an ERC-20 stake, a
1,216-byte HPKE key in calldata and in the event, its hash stored), settleBatch <= 15k per channel over 50
channels (beside the single settle of the same run). "open (ERC-20)" is an open into an escrow that
already holds the token; the escrow's very first deposit of a token also creates its token balance (+17k,
once per token, shown on its own row; likewise the registry's first stake). Public anchors (references/payments.md (c)):
µRaiden cooperative close 71,182; Nitro happy exit 111,514; Raiden settle 108,569; Raiden open 111,094.
"""

from __future__ import annotations

import argparse
import json
import os

from eth_account import Account
from web3 import Web3
from web3.logs import DISCARD

from dcml.client.chain.channel import ETH, ChannelClient, ChannelParams, batch_voucher
from dcml.client.chain.contracts import contract
from dcml.client.chain.devnet import Devnet
from dcml.client.chain.model_registry import register_model
from dcml.client.chain.tx import send
from dcml.node.identity import EnclaveIdentity
from dcml.node.network.registration import ensure_registered
from dcml.node.tee.simulated import SimulatedProvider

BATCH = 50
GOALS = {"open (ERC-20)": 90_000, "open (ETH)": 90_000, "settle (next)": 50_000, "close": 65_000,
         f"settleBatch /ch ({BATCH})": 15_000, "register": 250_000}
ANCHORS = {"register (1st)": "the registry's first stake deposit also creates its token balance (once)",
           "open (ERC-20)": "Raiden openChannel 111,094; µRaiden createChannel 120,090",
           "settle (next)": "Raiden settleChannel 108,569",
           "close": "µRaiden cooperativeClose 71,182; Nitro happy exit 111,514"}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    gas: dict[str, int] = {}
    with Devnet(close_grace_period=60) as net:
        dep = net.deployment
        w3 = Web3(Web3.HTTPProvider(dep.rpc_url))
        payer = Account.from_key(dep.accounts["client"].private_key)
        payee = Account.from_key(dep.accounts["node"].private_key)
        publisher = Account.from_key(dep.accounts["publisher"].private_key)
        session = Account.create()
        model = bytes(Web3.keccak(text="bench-model"))
        register_model(w3, dep, publisher, model, 250)
        escrow = contract(w3, "PaymentChannels", dep.payment_channels)
        client = ChannelClient(w3, dep, payer)
        client._approve(dep.token, 10**24)  # approval is the token's cost, not the channel's

        def measured(label: str, account, fn, value: int = 0):
            receipt = send(w3, account, fn, value=value, action=label)
            gas[label] = receipt["gasUsed"]
            return receipt

        def opened(receipt) -> bytes:
            args_ = escrow.events.ChannelOpened().process_receipt(receipt, errors=DISCARD)[0]["args"]
            cid_ = bytes(args_["channelId"])
            client.book.add(cid_, ChannelParams(args_["payer"], args_["payee"], args_["token"], bytes(args_["salt"]),
                                                args_["authorizedSigner"], bytes(args_["modelId"]),
                                                args_["publisher"], args_["publisherBps"]))
            return cid_

        def params(cid_: bytes) -> tuple:
            return client.book.params(cid_).as_struct()

        opened(measured("open (ERC-20, 1st)", payer, escrow.functions.open(
            payee.address, dep.token, 10**18, b"\0" * 32, session.address, model, 250)))
        cid = opened(measured("open (ERC-20)", payer, escrow.functions.open(
            payee.address, dep.token, 10**20, b"\1" * 32, session.address, model, 250)))
        opened(measured("open (ETH)", payer, escrow.functions.open(
            payee.address, ETH, 10**18, b"\2" * 32, session.address, model, 250), value=10**18))
        measured("topUp", payer, escrow.functions.topUp(params(cid), 10**18))
        v1 = client.sign_voucher(session, cid, 10**18)
        measured("settle (first)", payee, escrow.functions.settle(params(cid), v1.cumulative_amount,
                                                                  v1.signature_bytes))
        v2 = client.sign_voucher(session, cid, 2 * 10**18)
        measured("settle (next)", payee, escrow.functions.settle(params(cid), v2.cumulative_amount,
                                                                 v2.signature_bytes))
        v3 = client.sign_voucher(session, cid, 3 * 10**18)
        measured("close", payee, escrow.functions.close(params(cid), v3.cumulative_amount, v3.signature_bytes))
        cid2 = client.open(payee.address, 10**18, session_key=session.address)
        measured("requestClose", payer, escrow.functions.requestClose(params(cid2)))
        w3.provider.make_request("evm_increaseTime", [61])
        w3.provider.make_request("evm_mine", [])
        measured("withdraw", payer, escrow.functions.withdraw(params(cid2)))
        measured("claimRefund", payer, escrow.functions.claimRefund(params(cid)))
        measured("claimEarnings", payee, escrow.functions.claimEarnings(dep.token))

        # Batched settlement: BATCH channels of one payee, token and model (random salts, as clients use),
        # one voucher each, one transaction.
        batch = []
        for _ in range(BATCH):
            r = send(w3, payer, escrow.functions.open(payee.address, dep.token, 10**18, os.urandom(32),
                                                      session.address, model, 250), action="open")
            c = opened(r)
            v = client.sign_voucher(session, c, 10**15 + int.from_bytes(os.urandom(4), "big"))
            batch.append(batch_voucher(client.book.params(c), v.cumulative_amount, v.signature_bytes))
        terms = client.book.params(c)
        receipt = send(w3, payee, escrow.functions.settleBatch(dep.token, model, terms.publisher, 250, batch),
                       action="settleBatch")
        skipped = escrow.events.SettlementSkipped().process_receipt(receipt, errors=DISCARD)
        if skipped:
            raise SystemExit(f"settleBatch skipped {len(skipped)} vouchers")
        gas[f"settleBatch ({BATCH})"] = receipt["gasUsed"]
        gas[f"settleBatch /ch ({BATCH})"] = receipt["gasUsed"] // BATCH

        # NodeRegistry.register by two operators (the first also creates the registry's stake-token balance).
        for label, role in (("register (1st)", "node"), ("register", "publisher")):
            operator = Account.from_key(dep.accounts[role].private_key)
            done = ensure_registered(w3, dep.node_registry, EnclaveIdentity.generate(), SimulatedProvider(),
                                     operator, endpoint="https://node.example:8443", stake=10**20,
                                     peer_id=bytes.fromhex("002408011220") + os.urandom(32), node_version="bench")
            gas[label] = w3.eth.get_transaction_receipt(done.tx_hash)["gasUsed"]

    if args.json:
        print(json.dumps(gas))
        return
    print(f"{'operation':<22}{'gas':>10}{'goal':>9}{'':<7}public anchor / baseline")
    for label, used in gas.items():
        goal = GOALS.get(label)
        mark = "" if goal is None else ("ok" if used <= goal else "over")
        note = ANCHORS.get(label, "")
        if label.startswith("settleBatch /ch"):
            note = f"single settle in this run: {gas['settle (next)']:,} ({gas['settle (next)'] / used:.1f}x)"
        print(f"{label:<22}{used:>10,}{(f'{goal:,}' if goal else '-'):>9}  {mark:<5}{note}")


if __name__ == "__main__":
    main()
