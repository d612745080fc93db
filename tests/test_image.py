"""The CVM image (docker/image/build.py): two clean builds give one digest, a changed source file another, and the
built root filesystem runs the node: a paid, attested (simulated TEE), verified answer against anvil.

"Clean" here: fresh output directories, the project wheel and the dependencies layer rebuilt each time; the
Debian root filesystems and the locked downloads come from build/image/cache (keyed by their inputs), as does
the dependencies layer of the third build, whose only change is one source file. `make image-check` rebuilds
everything but the Debian stages and the downloads.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from eth_account import Account
from web3 import Web3

from dcml.client.chain.contracts import contract
from dcml.client.chain.deployment import Deployment
from dcml.client.chain.devnet import free_port
from dcml.client.chain.tx import send
from dcml.client.sdk.client import ChatResult, Client

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "build" / "image" / "cache"
PRICE_IN, PRICE_OUT = 10**12, 3 * 10**12

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="building the image needs root (mmdebstrap, chroot)"),
]


def _build(src: Path, out: Path, *, fresh: bool) -> dict:
    missing = [t for t in ("mmdebstrap", "umoci", "chroot") if shutil.which(t) is None]
    assert not missing, f"{missing} not installed: run `make image-deps`"
    cmd = [sys.executable, str(ROOT / "docker" / "image" / "build.py"), "--src", str(src), "--out", str(out),
           "--cache", str(CACHE), *(["--fresh"] if fresh else [])]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, f"image build failed:\n{done.stderr[-4000:]}"
    printed = done.stdout.strip()
    record = json.loads((out / "build-record.json").read_text())
    assert printed == record["digest"] == (out / "digest").read_text().strip()
    return record


@pytest.fixture(scope="module")
def builds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, dict]]:
    tmp = tmp_path_factory.mktemp("image")
    a = _build(ROOT, tmp / "a", fresh=False)  # its dependencies layer may come from an earlier build...
    b = _build(ROOT, tmp / "b", fresh=True)  # ...this one rebuilds it
    # A copy of the sources with one file changed (a comment: nothing else differs).
    src = tmp / "src"
    tracked = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z", "--", "pyproject.toml", "README.md", "node",
                              "client", "configs", "docker/image"], check=True, capture_output=True).stdout.decode()
    for name in filter(None, tracked.split("\0")):
        if (ROOT / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    with (src / "node" / "__init__.py").open("a") as f:
        f.write("# a deliberate change\n")
    c = _build(src, tmp / "c", fresh=False)
    return {"a": (tmp / "a", a), "b": (tmp / "b", b), "c": (tmp / "c", c)}


def test_two_clean_builds_give_the_same_digest(builds) -> None:
    (_, a), (_, b) = builds["a"], builds["b"]
    print(f"image digest {a['digest']}")
    assert a["digest"] == b["digest"]
    assert a["layers"] == b["layers"]
    assert a["wheels"] == b["wheels"] and a["project_wheel"] == b["project_wheel"]
    # The record names what went in.
    assert a["debian"]["packages"]["python3"] and a["debian"]["suite"] == "bookworm"
    assert any(w.startswith("torch-2.13.0+cpu") for w in a["wheels"])
    assert any(w.startswith("fastecdsa-") and w.endswith(".whl") for w in a["wheels"])  # built from its sdist


def test_a_changed_source_file_changes_the_digest_and_only_the_project_layer(builds) -> None:
    (_, a), (_, c) = builds["a"], builds["c"]
    assert c["digest"] != a["digest"]
    assert c["layers"][:2] == a["layers"][:2] and c["layers"][2] != a["layers"][2]


def test_layers_are_deterministic_tarballs(builds) -> None:
    import tarfile

    out, record = builds["a"]
    blobs = out / "oci" / "blobs" / "sha256"
    project = blobs / record["layers"][2]["digest"].split(":")[1]
    with tarfile.open(project) as tar:
        members = tar.getmembers()
    names = [m.name for m in members]
    assert names == sorted(names)
    assert {(m.mtime, m.uname, m.gname) for m in members} == {(1700000000, "", "")}
    assert not [n for n in names if n.endswith(".pyc") or "__pycache__" in n]
    assert "opt/dcml/bin/dcml-node" in names and "etc/dcml/node.toml" in names


# --- the node, from inside the built root filesystem ---------------------------------------------------------


@pytest.fixture(scope="module")
def rootfs(builds, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """The image unpacked by umoci (checking every blob's digest) and its OCI config."""
    out, _ = builds["a"]
    dest = tmp_path_factory.mktemp("unpacked") / "rootfs"
    subprocess.run(["umoci", "raw", "unpack", "--image", f"{out / 'oci'}:cpu", str(dest)], check=True)
    index = json.loads((out / "oci" / "index.json").read_text())
    blob = out / "oci" / "blobs" / "sha256"
    manifest = json.loads((blob / index["manifests"][0]["digest"].split(":")[1]).read_text())
    config = json.loads((blob / manifest["config"]["digest"].split(":")[1]).read_text())["config"]
    return dest, config


@pytest.fixture
def node_in_image(rootfs, deployment: Deployment, w3: Web3) -> Iterator[tuple[str, subprocess.Popen]]:
    root, config = rootfs
    deployment.save(root / "etc" / "dcml" / "deployment.json")
    shutil.copytree(ROOT / "models" / "demo", root / "models" / "demo", dirs_exist_ok=True)
    port = free_port()
    (root / "etc" / "dcml" / "test.toml").write_text(f"""
[server]
port = {port}
graceful_shutdown_s = 5
[engine]
kind = "embedded"
served_model_name = "dcml-demo"
model_dir = "/models/demo"
[payments]
enabled = true
deployment = "/etc/dcml/deployment.json"
prepay_tokens = 0
credit_tokens = 4
settle_threshold = 1000000000000000000000000
[payments.prices.dcml-demo]
price_per_input_token = {PRICE_IN}
price_per_output_token = {PRICE_OUT}
""")
    env = dict(e.split("=", 1) for e in config["Env"])
    # A private mount namespace gets its own /proc (gone with the process); the chroot runs as the image's user.
    # Same network namespace: the node binds loopback, where anvil is.
    chroot = shlex.join(["chroot", f"--userspec={config['User']}:{config['User']}", str(root), "/usr/bin/env", "-C",
                         config["WorkingDir"], config["Entrypoint"][0], "run", "--config", "/etc/dcml/test.toml"])
    cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
           f"mount -t proc proc {shlex.quote(str(root / 'proc'))} && exec {chroot}"]
    proc = subprocess.Popen(cmd, env={**env, "OMP_NUM_THREADS": "2"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 240  # torch imports without bytecode on a busy machine
    try:
        while True:
            assert proc.poll() is None, "the node in the image exited during start"
            try:
                health = httpx.get(f"{url}/health", timeout=2).json()
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "the node in the image did not start"
                time.sleep(0.5)
        w3.provider.make_request("anvil_setBalance", [health["address"], hex(10**20)])  # gas to settle
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_node_in_the_image_answers_a_paid_attested_verified_request(node_in_image, deployment, w3, tmp_path):
    url, proc = node_in_image
    wallet = Account.create()
    w3.provider.make_request("anvil_setBalance", [wallet.address, hex(10**20)])
    donor = Account.from_key(deployment.accounts["client"].private_key)
    send(w3, donor, contract(w3, "TestToken", deployment.token).functions.transfer(wallet.address, 10**19),
         action="fund")
    with Client(url, wallet, deployment=deployment, allow_simulated=True, store=tmp_path / "spend.sqlite",
                deposit=10**17, w3=w3) as client:
        node = client.attest()  # the simulated TEE document, verified (allowed explicitly for this test)
        assert node.simulated and node.tee_type == "simulated"
        result = client.chat([{"role": "user", "content": "hello from the image"}], "dcml-demo", max_tokens=6)
        assert isinstance(result, ChatResult) and result.receipt is not None
        receipt = result.receipt.receipt
        assert result.receipt.signer.lower() == node.signing_address.lower()
        assert result.cost == receipt.input_tokens * PRICE_IN + receipt.output_tokens * PRICE_OUT > 0
        assert client.violations() == []
        (channel,) = client.channels()
        proc.send_signal(signal.SIGTERM)  # the node settles what it holds on the way out
        assert proc.wait(timeout=60) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once drained
        assert client.channel_state(channel.channel_id).settled == result.cost


def test_the_shipped_composes_pin_the_digest_this_checkout_builds(builds) -> None:
    """What clients allow-list (the compose hash) names this source: a rebuild gives the pinned digest."""
    _, a = builds["a"]
    for path in sorted((ROOT / "docker").glob("app-compose.*.json")):
        compose = json.loads(path.read_text())["docker_compose_file"]
        pinned = compose.split("/dcml-node@", 1)[1].split()[0]
        assert pinned == a["digest"], (
            f"{path.name} pins {pinned} but this checkout builds {a['digest']}: after changing the node, its "
            "dependencies, or once the Debian archive moved on, run `make compose` and commit docker/ and "
            "configs/policy.toml (rebuilding an older release: docker/image/build.py --mirror "
            "<snapshot.debian.org URL>)")
