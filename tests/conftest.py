"""Shared fixtures: a real anvil with the contracts deployed (and its deployment file), accounts on it, free ports,
node processes stopped at teardown, and ONE vLLM. Helpers that are not fixtures live in dcml.client.demo.kit (shared
with the demos and bench/) or in tests/*_helpers.py; no test module imports another.

Markers: a test whose fixtures reach no chain, node process or vLLM is marked `unit` here at collection
(`pytest -m unit` runs them alone, in seconds); a module that starts processes or anvil on its own says so with
`pytestmark = pytest.mark.integration`."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from eth_account import Account
from eth_account.signers.local import LocalAccount
from web3 import Web3

from dcml.client.chain.channel import ChannelClient
from dcml.client.chain.deployment import Deployment
from dcml.client.chain.devnet import Devnet, free_port
from dcml.client.demo.kit.nodes import NodeProcess

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
def deployment_file(deployment: Deployment, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The deployment as a JSON file, for node configs (`[payments] deployment`)."""
    path = tmp_path_factory.mktemp("deployment") / "deployment.json"
    deployment.save(path)
    return path


@pytest.fixture
def port() -> int:
    return free_port()


@pytest.fixture
def node_process(tmp_path: Path) -> Iterator[Callable[..., NodeProcess]]:
    """Start `dcml-node run --config PATH` processes (log in tmp_path); each is stopped at teardown."""
    started: list[NodeProcess] = []

    def start(config: Path, port: int, **kw) -> NodeProcess:
        started.append(NodeProcess(config, port, tmp_path / f"node{len(started)}.log", **kw))
        return started[-1]

    yield start
    for node in started:
        node.stop()


@pytest.fixture(scope="session")
def w3(deployment: Deployment) -> Web3:
    return Web3(Web3.HTTPProvider(deployment.rpc_url, request_kwargs={"timeout": 30}))


def account(deployment: Deployment, role: str) -> LocalAccount:  # not a fixture: the roles below are
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

    from dcml.client.chain.devnet import free_port
    from dcml.node.engine.vllm_server import DEFAULT_PYTHON, VLLMServer

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


# A test is an integration test when it uses one of these fixtures (directly or through another fixture) or
# lives in a module below, which starts anvil, node processes, a browser, npm, a torch model or a virtualenv on its
# own; every other test is a unit test (`pytest -m unit`: in-process, no chain, seconds).
INTEGRATION_FIXTURES = frozenset({"devnet", "vllm", "node_process"})
INTEGRATION_MODULES = frozenset({
    "test_api_embedded", "test_api_shutdown", "test_bundle_attacks", "test_compose_hash", "test_demo",
    "test_demo_gateway", "test_disputes_client", "test_engine_embedded", "test_fuzz_openapi", "test_gateway",
    "test_image", "test_install", "test_js_wire", "test_model_source", "test_network", "test_node_registry",
    "test_node_sla", "test_p2p_overlay", "test_settlement", "test_sla_court", "test_sla_e2e", "test_sla_watcher",
    "test_status_page", "test_vllm",
})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        module = item.module.__name__.rpartition(".")[2] if isinstance(item, pytest.Function) else ""
        if (item.get_closest_marker("integration") or module in INTEGRATION_MODULES
                or not INTEGRATION_FIXTURES.isdisjoint(getattr(item, "fixturenames", ()))):
            item.add_marker(pytest.mark.integration)
        else:
            item.add_marker(pytest.mark.unit)
