"""Shared fixtures: a real anvil with the contracts deployed, started and stopped by the tests."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from eth_account import Account
from eth_account.signers.local import LocalAccount
from web3 import Web3

from client.channel import ChannelClient
from client.deployment import Deployment
from node.devnet import Devnet

# The local CPU is shared by the tests, anvil and the node processes they start.
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def devnet() -> Iterator[Devnet]:
    with Devnet(close_grace_period=900) as net:
        yield net


@pytest.fixture(scope="session")
def deployment(devnet: Devnet) -> Deployment:
    assert devnet.deployment is not None
    return devnet.deployment


@pytest.fixture(scope="session")
def w3(deployment: Deployment) -> Web3:
    return Web3(Web3.HTTPProvider(deployment.rpc_url, request_kwargs={"timeout": 30}))


def account(deployment: Deployment, role: str) -> LocalAccount:
    return Account.from_key(deployment.accounts[role].private_key)


@pytest.fixture(scope="session")
def payer(deployment: Deployment) -> LocalAccount:
    return account(deployment, "client")


@pytest.fixture(scope="session")
def node_account(deployment: Deployment) -> LocalAccount:
    return account(deployment, "node")


@pytest.fixture(scope="session")
def publisher(deployment: Deployment) -> LocalAccount:
    return account(deployment, "publisher")


@pytest.fixture
def session_key() -> LocalAccount:
    return Account.create()


@pytest.fixture
def channels(w3: Web3, deployment: Deployment, payer: LocalAccount) -> ChannelClient:
    return ChannelClient(w3, deployment, payer)


@pytest.fixture(scope="session")
def vllm(tmp_path_factory):
    """ONE real vLLM (CPU build, `make vllm-venv`) serving models/demo as dcml-demo for the whole session; ready
    after about a minute. DCML_SKIP_VLLM=1 skips its tests on a machine without .venv-vllm (never on CI)."""
    from pathlib import Path

    from node.devnet import free_port
    from node.engine.vllm_server import DEFAULT_PYTHON, VLLMServer

    if not DEFAULT_PYTHON.exists():
        if os.environ.get("DCML_SKIP_VLLM") == "1":
            pytest.skip("DCML_SKIP_VLLM=1 and no .venv-vllm")
        pytest.fail("vLLM's virtualenv is missing: run `make vllm-venv` (make test builds it)")
    demo = Path(__file__).resolve().parent.parent / "models" / "demo"
    # A tool-call parser, so that a named tool_choice gives tool_calls (the demo model has no tool format of its own:
    # vLLM constrains the arguments to the tool's JSON schema); requests without tools are unaffected. HoldBack lets a
    # test hold an answer back inside vLLM (tests/vllm_hold.py); it passes every other request untouched.
    root = demo.parent.parent
    server = VLLMServer(demo, "dcml-demo", port=free_port(), log_path=tmp_path_factory.mktemp("vllm") / "vllm.log",
                        extra_args=["--enable-auto-tool-choice", "--tool-call-parser", "pythonic",
                                    "--middleware", "tests.vllm_hold.HoldBack"],
                        env={"PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))})
    server.start()
    try:
        server.wait_ready(600)
        yield server
    finally:
        server.stop()
