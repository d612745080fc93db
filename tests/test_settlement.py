"""The settlement worker against a real anvil and a real node process: crashes lose nothing,
requested closes are settled in time, and shutdown settles what is left."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from eth_account.signers.local import LocalAccount
from web3 import Web3

from dcml.client.chain.channel import ChannelClient
from dcml.client.chain.deployment import Deployment
from dcml.client.chain.devnet import free_port
from dcml.client.chain.tx import TransactionFailed
from dcml.client.demo.kit.payments import node_payments
from dcml.client.wire.access import auth_header, channel_resource

REPO = Path(__file__).resolve().parents[1]


_STARTED: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def _no_leftover_processes():
    yield
    while _STARTED:  # a failed assertion must not leave a node running
        proc = _STARTED.pop()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


class PaymentsProcess:
    """`python -m dcml.node.api.payments` as a separate OS process, so it can really be killed."""

    def __init__(self, deployment_file: Path, data_dir: Path, payee: LocalAccount, *, threshold: int) -> None:
        self.port = free_port()
        self.args = [sys.executable, "-m", "dcml.node.api.payments", "--deployment", str(deployment_file),
                     "--data-dir", str(data_dir), "--port", str(self.port), "--threshold", str(threshold),
                     "--interval", "0.2"]
        self.env = {**os.environ, "DCML_PAYEE_KEY": "0x" + payee.key.hex().removeprefix("0x")}
        self.proc: subprocess.Popen | None = None
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self) -> PaymentsProcess:
        self.proc = subprocess.Popen(self.args, cwd=REPO, env=self.env)
        _STARTED.append(self.proc)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, "payments process exited at start"
            try:
                httpx.get(f"{self.url}/v1/payments/channels/0x00", timeout=1)
                return self
            except httpx.TransportError:
                time.sleep(0.1)
        raise TimeoutError("payments process did not start")

    def kill(self, sig: int = signal.SIGKILL) -> int:
        assert self.proc
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=60)

    def post(self, voucher) -> httpx.Response:
        return httpx.post(f"{self.url}/v1/payments/vouchers", json=voucher.to_wire(), timeout=30)

    def balance(self, channel_id: bytes, signer: LocalAccount, payee: str) -> dict:
        """Channel state is for its payer only (`client.access`): read as the session key."""
        cid = "0x" + channel_id.hex()
        return httpx.get(f"{self.url}/v1/payments/channels/{cid}", timeout=10,
                         headers=auth_header(signer, payee, channel_resource(cid))).json()


def test_sigkill_between_vouchers_loses_nothing_and_counts_nothing_twice(
    deployment_file, tmp_path, channels: ChannelClient, node_account, session_key
) -> None:
    channel_id = channels.open(node_account.address, 10**18, session_key=session_key.address)
    node = PaymentsProcess(deployment_file, tmp_path / "node", node_account, threshold=10**30).start()
    acked = []
    for i in range(1, 41):
        voucher = channels.sign_voucher(session_key, channel_id, i * 1000)
        response = node.post(voucher)
        assert response.status_code == 200, response.text
        acked.append(voucher)
    assert node.kill() == -signal.SIGKILL

    node = PaymentsProcess(deployment_file, tmp_path / "node", node_account, threshold=1).start()
    try:
        assert node.balance(channel_id, session_key, node_account.address)["accepted"] == str(40_000)
        replay = node.post(acked[-1])  # an acknowledged voucher replayed after the crash
        assert replay.status_code == 402 and replay.json()["error"]["code"] == "not_increasing"
        deadline = time.monotonic() + 30
        while channels.get(channel_id).settled != 40_000:
            assert time.monotonic() < deadline, "the restarted worker did not settle the acknowledged vouchers"
            time.sleep(0.2)
    finally:
        node.kill(signal.SIGTERM)
    from dcml.node.payments.ledger import Ledger

    ledger = Ledger(tmp_path / "node" / "ledger.sqlite")
    assert ledger.voucher_count("0x" + channel_id.hex()) == 40  # each voucher recorded exactly once
    assert ledger.get("0x" + channel_id.hex()).settled == 40_000


def test_sigkill_mid_burst_every_acknowledged_voucher_survives(
    deployment_file, tmp_path, channels: ChannelClient, node_account, session_key
) -> None:
    """Vouchers stream in from a second process while the node is killed: every 200 is on disk."""
    channel_id = channels.open(node_account.address, 10**18, session_key=session_key.address)
    node = PaymentsProcess(deployment_file, tmp_path / "node", node_account, threshold=10**30).start()
    vouchers = [channels.sign_voucher(session_key, channel_id, i) for i in range(1, 2001)]
    last_acked = 0
    killed = False
    with httpx.Client(timeout=5) as http:
        for v in vouchers:
            if v.cumulative_amount == 150:
                node.proc.send_signal(signal.SIGKILL)  # dies while the next requests are in flight
                killed = True
            try:
                r = http.post(f"{node.url}/v1/payments/vouchers", json=v.to_wire())
            except httpx.TransportError:
                break
            if r.status_code == 200:
                last_acked = v.cumulative_amount
    assert killed and node.proc.wait(timeout=30) == -signal.SIGKILL
    from dcml.node.payments.ledger import Ledger

    ledger = Ledger(tmp_path / "node" / "ledger.sqlite")
    assert ledger.accepted("0x" + channel_id.hex()) >= last_acked >= 149


def test_graceful_shutdown_settles_what_is_unsettled(
    deployment_file, tmp_path, channels: ChannelClient, node_account, session_key
) -> None:
    channel_id = channels.open(node_account.address, 10**18, session_key=session_key.address)
    node = PaymentsProcess(deployment_file, tmp_path / "node", node_account, threshold=10**30).start()
    assert node.post(channels.sign_voucher(session_key, channel_id, 4242)).status_code == 200
    assert channels.get(channel_id).settled == 0  # under the threshold: nothing settled yet
    assert node.kill(signal.SIGTERM) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal after a clean stop
    assert channels.get(channel_id).settled == 4242


def test_requested_close_is_settled_before_the_grace_period_ends(
    w3: Web3, deployment: Deployment, channels: ChannelClient, node_account, session_key, tmp_path
) -> None:
    node = node_payments(w3, deployment, node_account, tmp_path, threshold=10**30, interval=0.2)
    channel_id = channels.open(node_account.address, 10**18, session_key=session_key.address)
    node.verifier.accept(channels.sign_voucher(session_key, channel_id, 5555))
    node.worker.start()
    try:
        channels.request_close(channel_id)
        requested_at = channels.get(channel_id).close_requested_at
        deadline = time.monotonic() + 20
        while not channels.get(channel_id).finalized:
            assert time.monotonic() < deadline, "worker did not act on the requested close"
            time.sleep(0.1)
    finally:
        node.worker.stop(flush=False)
    state = channels.get(channel_id)
    assert state.settled == 5555
    assert w3.eth.get_block("latest")["timestamp"] < requested_at + deployment.close_grace_period
    with pytest.raises(TransactionFailed, match=r"ChannelFinalized"):
        channels.withdraw(channel_id)  # nothing left for the payer to withdraw: the refund was credited


def test_worker_resumes_from_chain_truth_after_a_settle_it_did_not_record(
    w3: Web3, deployment: Deployment, channels: ChannelClient, node_account, session_key, tmp_path
) -> None:
    """A crash after the settle landed but before the ledger noted it: no second settle is attempted."""
    node = node_payments(w3, deployment, node_account, tmp_path, threshold=1)
    channel_id = channels.open(node_account.address, 10**18, session_key=session_key.address)
    v = channels.sign_voucher(session_key, channel_id, 9000)
    node.verifier.accept(v)
    node.chain.settle(node_account, channel_id, 9000, v.signature_bytes)  # "landed", ledger not updated
    assert node.ledger.get("0x" + channel_id.hex()).settled == 0
    assert node.worker.run_once() == []
    assert node.ledger.get("0x" + channel_id.hex()).settled == 9000
