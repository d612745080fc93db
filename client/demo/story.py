"""`make demo`: the whole story on one machine, printed step by step.

A local chain with the contracts; a publisher encrypts the demo model, publishes it with a royalty and
runs its key broker; a node process (embedded engine, simulated TEE: its warning is printed) attests to
the broker, gets the key sealed to its HPKE key and decrypts the weights in memory only; a client
verifies the node's attestation, opens a channel, streams a paid answer that needs mid-stream vouchers
and checks every receipt, also against the SLA terms the node published (backed by its registry stake);
the client closes the channel, the node settles on its own; balances before and after are printed and the
on-chain movements are checked against the sum of the receipts, to the wei.

`make demo ENGINE=vllm` (`python -m dcml.client.demo.story --engine vllm`) tells the same story on a real vLLM (the CPU
build in `.venv-vllm`): the node decrypts the weights into tmpfs (/dev/shm), starts vLLM on them, deletes the
clear copy once vLLM has loaded it, and serves the paid answer through vLLM.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from eth_account import Account
from rich.console import Console
from rich.table import Table
from web3 import Web3

from dcml.client.attestation.verify import ModelTrust, Policy
from dcml.client.chain.connect import connect
from dcml.client.chain.contracts import contract
from dcml.client.chain.devnet import REPO, Devnet, free_port
from dcml.client.chain.sla import Broken, SLACourtClient
from dcml.client.chain.tx import send_eth
from dcml.client.demo.kit.nodes import NodeProcess, simulated_measurement
from dcml.client.publisher.bundle import encrypt_model, generate_key
from dcml.client.publisher.cli import publish_model
from dcml.client.publisher.key_broker import AuditLog, ChainMeasurements, KeyBroker, ModelEntry
from dcml.client.publisher.key_broker import create_app as create_broker_app
from dcml.client.sdk.client import ChatStream, Client
from dcml.client.wire.receipts import model_id_for
from dcml.node.api.server import BackgroundServer

console = Console(width=120)
MODEL = "dcml-demo"
ROYALTY_BPS = 250  # 2.5 % of every payment to the model's publisher
PRICE_IN, PRICE_OUT = 10**13, 3 * 10**13  # wei of the demo token per input / output token
CREDIT_TOKENS = 8  # the node serves this far past what is paid, then asks for a voucher
PROMPT = [{"role": "user", "content": "Tell me of the king and the sea."}]
# The node's SLA terms (generous: the node benchmarks its engine at start and refuses terms it cannot meet).
MAX_TTFT_MS, MIN_TOKENS_PER_SEC = 5000, 5
STAKE = 100 * 10**18


def engine_section(engine: str, work: Path) -> str:
    if engine == "embedded":
        return f"""[engine]
kind = "embedded"
served_model_name = "{MODEL}"
"""
    return f"""[engine]                 # vLLM started by the node on the weights it decrypts into tmpfs
kind = "openai"
served_model_name = "{MODEL}"
base_url = "http://127.0.0.1:{free_port()}"
[engine.vllm]
log_file = "{work / 'vllm.log'}"
"""


def node_config(path: Path, data_dir: Path, deployment_file: Path, port: int, bundle_dir: Path,
                broker_url: str, publisher: str, engine: str = "embedded", tmpfs_dir: Path | None = None) -> None:
    tmpfs = f'tmpfs_dir = "{tmpfs_dir}"  # vLLM reads the clear weights here; deleted once it has loaded them' \
        if tmpfs_dir else ""
    path.write_text(f"""
data_dir = "{data_dir}"
[server]
port = {port}
graceful_shutdown_s = 10
[logging]
level = "warning"
{engine_section(engine, path.parent)}[engine.encrypted]  # sealed weights, key from the publisher's broker
bundle_dir = "{bundle_dir}"
broker_url = "{broker_url}"
{tmpfs}
[payments]
enabled = true
deployment = "{deployment_file}"
prepay_tokens = 0        # pay as you go: every voucher pays for tokens already served
credit_tokens = {CREDIT_TOKENS}
settle_threshold = 1000000000000000000000000
settle_interval_s = 0.5
[payments.prices.{MODEL}]
price_per_input_token = {PRICE_IN}
price_per_output_token = {PRICE_OUT}
publisher = "{publisher}"  # only channels whose royalty goes to the real publisher (model ids can be squatted)
max_royalty_bps = {ROYALTY_BPS}
[registry]               # registered with a stake (operator key from $DCML_OPERATOR_KEY)
enabled = true
stake = {STAKE}
[sla]                    # published in the SLA court, backed by the stake; disputes answered automatically
enabled = true
max_ttft_ms = {MAX_TTFT_MS}
min_tokens_per_sec = {MIN_TOKENS_PER_SEC}
breach_fixed = 1000000000000000000
no_response_compensation = 10000000000000000000
""")


@dataclass
class Broker:
    server: BackgroundServer
    audit: AuditLog

    @property
    def url(self) -> str:
        return self.server.url

    def released(self) -> int:
        return sum(1 for entry in self.audit.entries() if entry["outcome"] == "released")


def publish_encrypted_model(w3: Web3, dep, publisher, work: Path) -> Broker:
    """The publisher's side: seal the weights, publish the release on-chain, run the key broker."""
    model_id = bytes.fromhex(model_id_for(MODEL)[2:])
    key = generate_key()  # stays with the publisher's broker; nodes only ever see it sealed to their HPKE key
    signed = encrypt_model(REPO / "models" / "demo", work / "bundle", model_id=model_id, model_name=MODEL,
                           publisher=publisher, model_key=key)
    audit = AuditLog(work / "broker.sqlite")
    broker = KeyBroker(models={model_id: ModelEntry(model_id, key, bundle_dir=work / "bundle", manifest=signed)},
                       policy=Policy(), audit=audit, allow_simulated=True,  # DEVELOPMENT ONLY: simulated TEE
                       measurements=ChainMeasurements(w3, dep.model_registry))
    server = BackgroundServer(create_broker_app(broker)).start()
    publish_model(w3, dep.model_registry, publisher, signed, royalty_bps=ROYALTY_BPS, price_floor=0,
                  broker_url=server.url, measurements=[simulated_measurement()])
    console.print(f"2. the publisher sealed [cyan]{MODEL}[/] (AES-256-GCM, manifest "
                  f"0x{signed.manifest_hash.hex()[:16]}…), published it with a {ROYALTY_BPS / 100:.1f} % royalty "
                  f"and runs its key broker at {server.url}")
    return Broker(server, audit)


def start_node(config: Path, port: int, operator_key: str, timeout_s: float = 120) -> NodeProcess:
    try:  # the node's own output shows (the simulated-TEE warning is part of the story)
        return NodeProcess(config, port, env={"DCML_OPERATOR_KEY": operator_key}, timeout_s=timeout_s)
    except RuntimeError as e:
        raise SystemExit(f"{e}; see its log above") from None


def main(engine: str = "embedded") -> None:
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="dcml-demo-"))
    with Devnet(close_grace_period=900) as net:
        dep = net.deployment
        if dep is None or dep.sla_court is None:
            raise SystemExit("the local chain came up without the contracts")
        w3 = connect(dep.rpc_url)
        accounts = {role: Account.from_key(dep.accounts[role].private_key)
                    for role in ("deployer", "client", "publisher", "node")}
        token = contract(w3, "TestToken", dep.token)
        console.rule("[bold]dcml demo: attested, paid, verified inference on a local chain")
        console.print(f"1. anvil at {dep.rpc_url} (chain {dep.chain_id}); PaymentChannels {dep.payment_channels}")

        broker = publish_encrypted_model(w3, dep, accounts["publisher"], work)

        deployment_file = work / "deployment.json"
        dep.save(deployment_file)
        port = free_port()
        tmpfs_dir = Path("/dev/shm") / f"dcml-demo-{work.name}" if engine == "vllm" else None
        node_config(work / "node.toml", work / "node", deployment_file, port, work / "bundle", broker.url,
                    accounts["publisher"].address, engine, tmpfs_dir)
        if tmpfs_dir is None:
            console.print("3. starting the node (embedded engine, [yellow]simulated TEE[/]: it says so below); it "
                          "attests to the broker, decrypts the model in memory, registers with a stake and "
                          "publishes its SLA terms…")
        else:
            console.print(f"3. starting the node ([yellow]simulated TEE[/]: it says so below); it attests to the "
                          f"broker, decrypts the model into tmpfs ({tmpfs_dir}), starts vLLM on it (about a "
                          "minute on a CPU), registers with a stake and publishes its SLA terms…")
        node = start_node(work / "node.toml", port, dep.accounts["node"].private_key,
                          timeout_s=120 if tmpfs_dir is None else 900)
        url = node.url
        console.print(f"   the broker released the model key: {broker.released()} release(s) in its audit log")
        if tmpfs_dir is not None:
            if tmpfs_dir.exists():
                raise SystemExit(f"clear weights still in {tmpfs_dir} after vLLM loaded them")
            served = httpx.get(f"{url}/v1/models").json()["data"][0]
            console.print(f"   vLLM serves {served['id']} (context {served['max_model_len']} tokens, read from "
                          f"vLLM); the clear weights are gone from {tmpfs_dir}")
        node_address = httpx.get(f"{url}/health").json()["address"]
        (terms,) = SLACourtClient(w3, dep.sla_court).terms_versions(node_address, model_id_for(MODEL))
        console.print(f"   SLA terms in the court {dep.sla_court}: first token within {terms.max_ttft_ms} ms, "
                      f"at least {terms.min_tokens_per_sec} tokens/s, backed by a {STAKE / 1e18:.0f} dUSD stake")
        while time.time() <= terms.valid_from:  # the terms apply to requests accepted after they took effect
            time.sleep(0.1)
        # gas for the node's settlements: its payee is its (attested) enclave address
        send_eth(w3, accounts["deployer"], node_address, 10**18)
        people = {"client": accounts["client"].address, "node": node_address,
                  "publisher": accounts["publisher"].address, "escrow": dep.payment_channels}
        before = {who: token.functions.balanceOf(addr).call() for who, addr in people.items()}

        try:
            # The client names the model's publisher and the royalty it accepts (a squatted id is refused).
            policy = Policy(models={MODEL: ModelTrust(publisher=accounts["publisher"].address,
                                                      max_royalty_bps=ROYALTY_BPS)})
            with Client(url, accounts["client"], deployment=dep, allow_simulated=True, store=work / "client.sqlite",
                        policy=policy,
                        deposit=10**18) as client:
                verified = client.attest()
                console.print(f"4. client verified the node's attestation: key {verified.signing_address} "
                              f"(tee {verified.tee_type}; [yellow]simulated allowed for the demo only[/])")
                console.print("5. streaming a paid answer (prepay 0, credit window "
                              f"{CREDIT_TOKENS} tokens: vouchers flow while it streams):\n")
                stream = client.chat(PROMPT, MODEL, stream=True, max_tokens=96, temperature=0.8, seed=7)
                assert isinstance(stream, ChatStream)  # stream=True
                for piece in stream:
                    console.print(piece, end="", highlight=False, markup=False)
                result = stream.result
                console.print()
                if result is None or result.receipt is None or result.channel_id is None:
                    raise SystemExit("the stream ended without a verified receipt")
                channel_id = result.channel_id
                vouchers = client.store.vouchers(channel_id)
                receipts = client.receipts(channel_id)
                r = result.receipt.receipt
                console.print(f"\n   receipt verified: {r.input_tokens} input + {r.output_tokens} output tokens, "
                              f"cost {result.cost} wei; {len(vouchers)} vouchers signed, {len(receipts)} receipt(s) "
                              f"kept; SLA: first token in {r.ttft_ms} ms, "
                              + ("within the terms" if result.sla_broken == Broken.NONE
                                 else f"[red]broken ({result.sla_broken!r}): a claim is pending[/]"))
                if len(vouchers) < 2:
                    raise SystemExit("expected at least one mid-stream voucher")
                client.close_channel(channel_id)
                console.print("6. client requested close; the node's settlement worker settles and closes…")
                deadline = time.monotonic() + 60
                while not client.channel_state(channel_id).finalized:
                    if time.monotonic() > deadline:
                        raise SystemExit("the node did not close the channel within 60 s")
                    time.sleep(0.3)
                client.withdraw(channel_id)  # claims the refund credited at close
                settled = client.channel_state(channel_id).settled
                total = sum(r.cost for r in receipts)
        finally:
            node.stop(timeout_s=60)
            broker.server.stop()
        from dcml.client.chain.channel import ChannelClient

        ChannelClient(w3, dep, accounts["publisher"]).claim_earnings()
        after = {who: token.functions.balanceOf(addr).call() for who, addr in people.items()}

    royalty = settled * ROYALTY_BPS // 10_000
    expected = {"client": -total, "node": total - royalty, "publisher": royalty, "escrow": 0}
    table = Table(title="token balances (dUSD; changes in wei)")
    for col in ("account", "before", "after", "change (wei)", "expected (wei)"):
        table.add_column(col, justify="left" if col == "account" else "right")
    ok = settled == total
    for who in people:
        change = after[who] - before[who]
        ok &= change == expected[who]
        table.add_row(who, f"{before[who] / 1e18:,.6f}", f"{after[who] / 1e18:,.6f}", f"{change:+,}",
                      f"{expected[who]:+,}")
    console.print(table)
    console.print(f"sum of receipts {total:,} wei; settled on-chain {settled:,} wei")
    if not ok:
        raise SystemExit("on-chain movements do not match the receipts")
    console.print(f"[green]on-chain movements equal the sum of the receipts to the wei[/] "
                  f"({time.monotonic() - started:.1f} s)")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", choices=("embedded", "vllm"), default="embedded")
    main(parser.parse_args().engine)
