"""A paid node process killed with SIGKILL mid-stream: after a restart every voucher it acknowledged is
in its ledger, exactly once, and gets settled on-chain."""

from __future__ import annotations

import signal
import sqlite3
from pathlib import Path

import httpx
import pytest

from dcml.client.chain.devnet import free_port
from dcml.client.demo.kit.nodes import PRICE_OUT, NodeProcess, fund, paid_config, to_toml
from dcml.client.demo.kit.raw_payer import RawPayer
from dcml.client.wire.access import channel_resource


def write_config(path: Path, data_dir: Path, deployment_file: Path, port: int) -> None:
    cfg = paid_config(data_dir, port, deployment_file)
    cfg["payments"]["voucher_timeout_s"] = 10
    path.write_text(to_toml(cfg))


@pytest.mark.slow
def test_sigkill_mid_stream_then_restart_settles_every_acknowledged_voucher_once(
    w3, deployment, payer, tmp_path
) -> None:
    deployment_file = tmp_path / "deployment.json"
    deployment.save(deployment_file)
    port = free_port()
    config = tmp_path / "node.toml"
    write_config(config, tmp_path / "data", deployment_file, port)
    node = NodeProcess(config, port)
    try:
        _crash_and_recover(w3, deployment, payer, tmp_path, config, port, node)
    finally:
        if node.proc.poll() is None:
            node.proc.kill()


def _crash_and_recover(w3, deployment, payer, tmp_path, config, port, node) -> None:
    address = node.health["address"]
    fund(w3, address)
    client = RawPayer(w3, deployment, payer, node.url, address)
    paid_mid_stream = 0

    def crash_after_three() -> None:
        nonlocal paid_mid_stream
        paid_mid_stream += 1
        if paid_mid_stream == 3:
            node.proc.send_signal(signal.SIGKILL)

    client.on_paid = crash_after_three
    with pytest.raises(httpx.TransportError):
        client.ask("tell me everything", max_tokens=1000)
    assert node.proc.wait(timeout=30) == -signal.SIGKILL
    assert paid_mid_stream == 3 and len(client.acked) >= 4  # the admission voucher and three mid-stream

    node = NodeProcess(config, port)  # same data dir: same (dev-seed) identity and ledger
    try:
        _check_recovered(client, node, address, tmp_path)
    finally:
        if node.proc.poll() is None:
            node.proc.kill()


def _check_recovered(client, node, address, tmp_path) -> None:
    assert node.health["address"] == address
    channel = "0x" + client.channel_id.hex()
    held = httpx.get(f"{node.url}/v1/payments/channels/{channel}",
                     headers=client.auth(channel_resource(channel))).json()
    assert int(held["accepted"]) == max(client.acked)
    assert int(held["spent"]) <= int(held["accepted"]) + 4 * PRICE_OUT  # never served beyond the credit window
    node.proc.send_signal(signal.SIGTERM)
    node.proc.wait(timeout=60)
    assert client.channels.get(client.channel_id).settled == max(client.acked)
    rows = sqlite3.connect(tmp_path / "data" / "ledger.sqlite").execute(
        "SELECT cumulative FROM vouchers WHERE channel_id=?", (channel,)).fetchall()
    assert sorted(int(r[0]) for r in rows) == sorted(set(client.acked))  # each acknowledged voucher once
