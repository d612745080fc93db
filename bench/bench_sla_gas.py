"""Gas of the SLA court, measured from real transaction receipts on anvil (the devnet's own deployment).

    .venv/bin/python bench/bench_sla_gas.py [--json]

Operations: publishing terms (first version, then a new version), a broken-terms claim, opening a
no-response dispute, answering it, finalizing an unanswered one, and verifying one receipt on-chain
(`receiptSigner`, the EIP-712 hash plus ecrecover, sent as a transaction so the figure includes the
21,000 base and its calldata). Baseline measured in the same run: `PaymentChannels.settle`, the escrow's
one-signature check that also moves value, and a plain ETH transfer.
"""

from __future__ import annotations

import argparse
import json

from eth_account import Account
from web3 import Web3

from dcml.client.chain.channel import ChannelClient
from dcml.client.chain.devnet import Devnet
from dcml.client.chain.sla import SLACourtClient, Terms, receipt_tuple
from dcml.client.chain.tx import send, send_eth
from dcml.client.wire.receipts import Acceptance, Receipt, model_id_for, request_hash, sign_acceptance, sign_receipt
from dcml.node.identity import EnclaveIdentity
from dcml.node.network.registration import ensure_registered
from dcml.node.tee.simulated import SimulatedProvider

MODEL = model_id_for("bench-sla")
TERMS = Terms(max_ttft_ms=2000, min_tokens_per_sec=10, max_duration_ms=60_000, response_window=600,
              breach_cost_bps=20_000, breach_fixed=10**16, no_response_compensation=5 * 10**16)


def _travel(w3: Web3, seconds: int) -> None:
    w3.provider.make_request("evm_increaseTime", [seconds])
    w3.provider.make_request("evm_mine", [])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    gas: dict[str, int] = {}
    with Devnet(close_grace_period=60) as net:
        dep = net.deployment
        w3 = Web3(Web3.HTTPProvider(dep.rpc_url))
        operator = Account.from_key(dep.accounts["node"].private_key)
        payer = Account.from_key(dep.accounts["client"].private_key)
        node = EnclaveIdentity.generate()
        assert dep.node_registry and dep.sla_court, "the devnet deploys NodeRegistry and SLACourt"
        ensure_registered(w3, dep.node_registry, node, SimulatedProvider(), operator, endpoint="http://bench",
                          peer_id=bytes.fromhex("002408011220") + b"\x11" * 32, stake=10**20, node_version="bench")
        court = SLACourtClient(w3, dep.sla_court)
        f = court.contract.functions

        def measured(label: str, account, fn, value: int = 0) -> None:
            gas[label] = send(w3, account, fn, value=value, action=label)["gasUsed"]

        measured("publishTerms (first)", operator, f.publishTerms(node.address, bytes.fromhex(MODEL[2:]),
                                                                    TERMS.as_tuple()))
        _travel(w3, 2 * 3600)  # acceptances are judged at deadline - 1 h: let the terms be in force by then
        measured("publishTerms (new version)", operator, f.publishTerms(
            node.address, bytes.fromhex(MODEL[2:]), TERMS.model_copy(update={"max_ttft_ms": 1500}).as_tuple()))

        channels = ChannelClient(w3, dep, payer)
        session = Account.create()
        cid = channels.open(node.address, 10**18, session_key=session.address, model_id=bytes.fromhex(MODEL[2:]))
        params = channels.book.params(cid)
        now = w3.eth.get_block("latest")["timestamp"]

        def receipt(body: bytes, ttft_ms: int) -> Receipt:
            return Receipt(receiptId=request_hash(b"r" + body), requestHash=request_hash(body),
                           responseHash=request_hash(b"answer"), channelId="0x" + cid.hex(), modelId=MODEL,
                           inputTokens=12, outputTokens=40, cost=10**15, cumulativeSpent=10**15,
                           acceptedAt=now - 3600, ttftMs=ttft_ms, durationMs=4000)

        slow = sign_receipt(receipt(b"slow", 9000), node.account, court.domain)
        sig = bytes.fromhex(slow.signature[2:])
        gas["receiptSigner (verify one receipt, as a tx)"] = f.receiptSigner(
            receipt_tuple(slow.receipt), sig).estimate_gas({"from": payer.address})
        assert f.receiptSigner(receipt_tuple(slow.receipt), sig).call() == node.address
        measured("claimBreach", payer, f.claimBreach(node.address, params.as_struct(), receipt_tuple(slow.receipt),
                                                      sig))

        def open_dispute(body: bytes) -> bytes:
            signed = sign_acceptance(Acceptance(requestHash=request_hash(body), channelId="0x" + cid.hex(),
                                                acceptedAt=now - 120, deadline=now - 60), node.account,
                                     court.domain)
            a = signed.acceptance
            fn = f.openNoResponse(node.address, bytes.fromhex(MODEL[2:]), params.as_struct(),
                                  (bytes.fromhex(a.request_hash[2:]), cid, a.accepted_at, a.deadline),
                                  bytes.fromhex(signed.signature[2:]))
            measured("openNoResponse", payer, fn, value=court.dispute_bond())
            return court.dispute_id(node.address, a.request_hash)

        answered = open_dispute(b"answered")
        ok = sign_receipt(receipt(b"answered", 500), node.account, court.domain)
        measured("answer", operator, f.answer(answered, receipt_tuple(ok.receipt), bytes.fromhex(ok.signature[2:])))
        silent = open_dispute(b"silent")
        _travel(w3, TERMS.response_window + 1)
        measured("finalize", payer, f.finalize(silent))

        # Baselines in the same run: one voucher checked and settled by the escrow; a bare transfer.
        voucher = channels.sign_voucher(session, cid, 10**15)
        escrow = channels.escrow
        measured("baseline: PaymentChannels.settle", node_payee(w3, node), escrow.functions.settle(
            params.as_struct(), voucher.cumulative_amount, voucher.signature_bytes))
        gas["baseline: ETH transfer"] = send_eth(w3, payer, operator.address, 1)["gasUsed"]

    if args.json:
        print(json.dumps(gas))
        return
    print(f"{'operation':<46}{'gas':>9}")
    for label, used in gas.items():
        print(f"{label:<46}{used:>9,}")


def node_payee(w3: Web3, node: EnclaveIdentity):
    """The enclave key is the channel's payee; give it gas money (anvil cheat) to settle."""
    w3.provider.make_request("anvil_setBalance", [node.address, hex(10**19)])
    return node.account


if __name__ == "__main__":
    main()
