"""One-command local chain: start anvil, deploy every contract, fund test accounts, write the deployment.

`dcml-devnet --out .devnet/deployment.json` keeps anvil running until interrupted; tests and the demo
use `Devnet` directly and stop it themselves. The accounts are anvil's well-known development keys.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from eth_account import Account
from eth_account.signers.local import LocalAccount
from eth_typing import ChecksumAddress
from web3 import Web3
from web3.types import RPCEndpoint

from dcml.client.chain.connect import connect
from dcml.client.chain.deployment import Deployment, DevAccount
from dcml.client.chain.tx import TransactionFailed, send

REPO = Path(__file__).resolve().parents[2]
CONTRACTS = REPO / "contracts"
ANVIL_MNEMONIC = "test test test test test test test test test test test junk"
ROLES = ("deployer", "client", "node", "publisher", "client2", "node2", "client3", "node3")
FAUCET_AMOUNT = 1_000_000 * 10**18  # test tokens minted to every non-deployer account
NODE_MIN_STAKE = 100 * 10**18  # NodeRegistry: least dUSD stake per node
NODE_UNBONDING_DELAY = 3600  # NodeRegistry: seconds from requestExit to withdrawStake (days on a live chain)
SLA_DISPUTE_BOND = 10**15  # SLACourt: ETH bond for a no-response dispute
NODE_EPOCH_LENGTH = 600  # NodeRegistry: least seconds between epoch bumps (re-attestation freshness)
# x402's batch-settlement contracts live at fixed CREATE2 addresses on every chain; anvil gets our implementation
# (contracts/src/x402/, no constructor state) placed there, plus the Multicall3 subset the x402 SDK reads through.
X402_CODE = {
    "x402BatchSettlement": "0x4020074e9dF2ce1deE5A9C1b5c3f541D02a10003",
    "ERC3009DepositCollector": "0x4020806089470a89826cB9fB1f4059150b550004",
    "Multicall3Lite": "0xcA11bde05977b3631167028862bE2a173976CA11",
}


def tool(name: str) -> str:
    """forge/anvil/cast from the npm install in contracts/ (or PATH as a fallback)."""
    local = CONTRACTS / "node_modules" / ".bin" / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if not found:
        raise FileNotFoundError(f"{name} not found: run `make setup` (npm install in contracts/)")
    return found


def dev_accounts() -> dict[str, LocalAccount]:
    Account.enable_unaudited_hdwallet_features()
    return {
        role: Account.from_mnemonic(ANVIL_MNEMONIC, account_path=f"m/44'/60'/0'/0/{i}")
        for i, role in enumerate(ROLES)
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def artifact(name: str) -> dict:
    path = CONTRACTS / "out" / f"{name}.sol" / f"{name}.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} missing: build the contracts first (`make build`)")
    return json.loads(path.read_text())


def deploy_contract(w3: Web3, deployer: LocalAccount, name: str, *args: Any) -> ChecksumAddress:
    art = artifact(name)
    factory = w3.eth.contract(abi=art["abi"], bytecode=art["bytecode"]["object"])
    receipt = send(w3, deployer, factory.constructor(*args), action=f"deploy {name}")
    address = receipt["contractAddress"]
    if address is None:
        raise TransactionFailed(f"deploy {name}", "the receipt names no contract address")
    return Web3.to_checksum_address(address)


@dataclass
class Devnet:
    """A running anvil with the contracts deployed."""

    port: int = field(default_factory=free_port)
    chain_id: int = 31337
    close_grace_period: int = 900
    process: subprocess.Popen | None = None
    deployment: Deployment | None = None

    @property
    def rpc_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Deployment:
        self.process = subprocess.Popen(
            [tool("anvil"), "--port", str(self.port), "--chain-id", str(self.chain_id), "--silent",
             "--mnemonic", ANVIL_MNEMONIC, "--accounts", str(len(ROLES))],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,  # a Ctrl-C to the parent is handled by us, not delivered twice
        )
        w3 = connect(self.rpc_url)
        deadline = time.monotonic() + 30
        while True:
            if self.process.poll() is not None:
                err = self.process.stderr.read() if self.process.stderr is not None else b""
                raise RuntimeError(f"anvil exited: {err.decode(errors='replace')}")
            try:
                if w3.is_connected():
                    break
            except Exception:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"anvil did not answer on {self.rpc_url} within 30 s")
            time.sleep(0.05)
        self.deployment = deploy_all(w3, self.rpc_url, close_grace_period=self.close_grace_period)
        return self.deployment

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()

    def __enter__(self) -> Devnet:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def place_x402_contracts(w3: Web3) -> str:
    """Sets the runtime code of x402's batch-settlement contracts at their canonical addresses (anvil only)."""
    for name, address in X402_CODE.items():
        w3.provider.make_request(RPCEndpoint("anvil_setCode"), [address, artifact(name)["deployedBytecode"]["object"]])
    return X402_CODE["x402BatchSettlement"]


def deploy_all(w3: Web3, rpc_url: str, *, close_grace_period: int) -> Deployment:
    accounts = dev_accounts()
    deployer = accounts["deployer"]
    start_block = w3.eth.block_number
    registry = deploy_contract(w3, deployer, "ModelRegistry")
    channels = deploy_contract(w3, deployer, "PaymentChannels", registry, close_grace_period)
    token = deploy_contract(w3, deployer, "TestToken", "Devnet USD", "dUSD")
    node_registry = deploy_contract(w3, deployer, "NodeRegistry", token, NODE_MIN_STAKE, NODE_UNBONDING_DELAY,
                                    NODE_EPOCH_LENGTH, deployer.address)
    sla_court = deploy_contract(w3, deployer, "SLACourt", node_registry, channels, SLA_DISPUTE_BOND)
    registry_contract = w3.eth.contract(address=node_registry, abi=artifact("NodeRegistry")["abi"])
    send(w3, deployer, registry_contract.functions.setSlasher(sla_court), action="set SLA court as slasher")
    erc20 = w3.eth.contract(address=token, abi=artifact("TestToken")["abi"])
    for role, acct in accounts.items():
        if role != "deployer":
            send(w3, deployer, erc20.functions.mint(acct.address, FAUCET_AMOUNT), action=f"fund {role}")
    batch_settlement = place_x402_contracts(w3)
    return Deployment(
        chain_id=w3.eth.chain_id,
        batch_settlement=batch_settlement,
        rpc_url=rpc_url,
        payment_channels=channels,
        model_registry=registry,
        node_registry=node_registry,
        sla_court=sla_court,
        token=token,
        close_grace_period=close_grace_period,
        start_block=start_block,
        accounts={r: DevAccount(address=a.address, private_key="0x" + a.key.hex().removeprefix("0x"))
                  for r, a in accounts.items()},
    )


def main() -> None:
    parser = argparse.ArgumentParser(description="Start anvil, deploy the dcml contracts, write the deployment file.")
    parser.add_argument("--port", type=int, default=8545)
    parser.add_argument("--out", default=".devnet/deployment.json")
    parser.add_argument("--grace", type=int, default=900, help="close grace period in seconds")
    args = parser.parse_args()
    devnet = Devnet(port=args.port, close_grace_period=args.grace)
    deployment = devnet.start()
    deployment.save(args.out)
    print(f"devnet up: {devnet.rpc_url} (chain {deployment.chain_id}); deployment written to {args.out}")
    print(f"  PaymentChannels {deployment.payment_channels}\n  ModelRegistry   {deployment.model_registry}\n"
          f"  NodeRegistry    {deployment.node_registry}\n"
          f"  TestToken       {deployment.token}\nCtrl-C stops it.")
    try:
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        devnet.stop()


if __name__ == "__main__":
    main()
