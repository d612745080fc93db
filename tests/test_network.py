"""The whole network path with the real chain: node daemons register in the on-chain NodeRegistry at
start (attestation against the registry's epoch) and advertise on the libp2p overlay; a client finds them
through a bootstrap peer and accepts only adverts that match the registry and a live attestation."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from dcml.client.chain.devnet import free_port
from dcml.client.chain.registry import RegistryClient
from dcml.client.sdk.discovery import ChainRegistry, Discovery
from dcml.client.wire.advert import AdvertDomain, AdvertReason
from dcml.node.identity import EnclaveIdentity
from dcml.node.network.presence import peer_id_of

REPO = Path(__file__).resolve().parents[1]


def start_node(tmp: Path, name: str, model: str, deployment_file: Path, operator_key: str, *,
               register: bool, bootstrap: str | None) -> tuple[subprocess.Popen, str, str]:
    data, port, p2p_port = tmp / name, free_port(), free_port()
    identity = EnclaveIdentity.load_or_create_dev_seed(data)  # the node process finds and uses this seed
    boot = f'bootstrap = ["{bootstrap}"]' if bootstrap else ""
    (tmp / f"{name}.toml").write_text(f"""
data_dir = "{data}"
[server]
port = {port}
[logging]
level = "warning"
[engine]
kind = "synthetic"
served_model_name = "{model}"
[payments]
deployment = "{deployment_file}"
[registry]
enabled = {str(register).lower()}
[p2p]
enabled = true
listen = "/ip4/127.0.0.1/tcp/{p2p_port}"
advert_interval_s = 2
advert_ttl_s = 6
{boot}
""")
    proc = subprocess.Popen([sys.executable, "-m", "dcml.node.cli", "run", "--config", str(tmp / f"{name}.toml")],
                            cwd=REPO, env={**os.environ, "DCML_OPERATOR_KEY": operator_key})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        assert proc.poll() is None, f"node {name} exited during start"
        try:
            httpx.get(f"{url}/health", timeout=1).raise_for_status()
            break
        except httpx.HTTPError:
            assert time.monotonic() < deadline, f"node {name} did not start"
            time.sleep(0.2)
    return proc, identity.address, f"/ip4/127.0.0.1/tcp/{p2p_port}/p2p/{peer_id_of(identity)}"


@pytest.mark.slow
def test_registered_nodes_are_found_through_the_overlay_and_the_unregistered_one_is_not(
    w3, deployment, tmp_path
) -> None:
    deployment_file = tmp_path / "deployment.json"
    deployment.save(deployment_file)
    operator = deployment.accounts["node"].private_key
    procs: list[subprocess.Popen] = []
    try:
        a, addr_a, boot = start_node(tmp_path, "a", "alpha", deployment_file, operator, register=True,
                                     bootstrap=None)
        procs.append(a)
        nodes = {"a": addr_a}
        for name, model, register in (("b", "alpha", True), ("c", "beta", True), ("d", "alpha", False)):
            proc, address, _ = start_node(tmp_path, name, model, deployment_file, operator, register=register,
                                          bootstrap=boot)
            procs.append(proc)
            nodes[name] = address

        registry = RegistryClient(w3, deployment.node_registry)
        for name in "abc":  # registered at start, with a fresh attestation
            assert registry.is_active(nodes[name])
        assert registry.node(nodes["d"]) is None

        with Discovery([boot], ChainRegistry(registry), allow_simulated=True,
                       domain=AdvertDomain(deployment.chain_id, deployment.node_registry)) as overlay:
            want = {"alpha": {nodes["a"], nodes["b"]}, "beta": {nodes["c"]}}
            found: dict[str, set[str]] = {}
            deadline = time.monotonic() + 45
            while time.monotonic() < deadline:
                found = {m: {o.address for o in overlay.discover(m)} for m in want}
                unregistered = any(i.node == nodes["d"] and i.reason == AdvertReason.UNREGISTERED
                                   for i in overlay.ignored)
                if found == want and unregistered:
                    break
                time.sleep(0.5)
            assert found == want
            assert unregistered, [(i.node, i.reason) for i in overlay.ignored]
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
