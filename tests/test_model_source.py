"""Node side: attest to the broker, open the bundle in RAM, answer exactly like the clear model."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from dcml.client.publisher.key_broker import create_app
from dcml.node.engine.base import GenerationRequest, SamplingParams
from dcml.node.engine.embedded import EmbeddedEngine
from dcml.node.identity import EnclaveIdentity
from dcml.node.model_source import (
    EncryptedModelSource,
    ModelSourceError,
    encrypted_embedded_engine,
    filesystem_type,
    materialize_to_tmpfs,
    require_ram_path,
)
from tests.model_helpers import MODEL_ID, PROVIDER, PUBLISHER, make_bundle, sim_broker

PROMPT = "MENENIUS:\nWhat work's, my countrymen, in hand?"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("src")
    clear, bundle_dir, key, signed = make_bundle(tmp)
    broker = sim_broker(key, tmp / "audit.sqlite")
    source = EncryptedModelSource(bundle_dir=bundle_dir, broker_url="http://testserver",
                                  publisher=PUBLISHER.address, manifest_hash=signed.manifest_hash)
    return tmp, clear, source, TestClient(create_app(broker))


def _greedy(engine: EmbeddedEngine) -> str:
    async def run() -> str:
        await engine.start()
        try:
            chunks = [c async for c in engine.stream(GenerationRequest(PROMPT, SamplingParams(max_tokens=24,
                                                                                              temperature=0)))]
        finally:
            await engine.stop()
        return "".join(c.text for c in chunks)
    return asyncio.run(run())


def test_encrypted_model_answers_like_the_clear_one_and_leaves_no_clear_weights(setup):
    tmp, clear, source, http = setup
    data_dir = tmp / "node-data"
    ident = EnclaveIdentity.load_or_create_dev_seed(data_dir)
    engine = encrypted_embedded_engine(source, ident, PROVIDER, node_version="t", http=http, device="cpu", threads=2)
    encrypted = _greedy(engine)
    assert encrypted == _greedy(EmbeddedEngine(clear, device="cpu", threads=2))
    assert encrypted.strip()

    # No file under the node's directories (data dir, bundle) holds any slice of the clear weights.
    needles = []
    for shard in sorted(clear.glob("*.safetensors")):
        blob = shard.read_bytes()
        needles += [blob[i:i + 64] for i in range(len(blob) // 2, len(blob), len(blob) // 8)]
    for root in (data_dir, source.bundle_dir):
        for path in Path(root).rglob("*"):
            if path.is_file():
                content = path.read_bytes()
                assert not any(n in content for n in needles), f"clear weights found in {path}"


def test_vllm_path_must_be_tmpfs(setup, tmp_path):
    _, clear, source, http = setup
    ident = EnclaveIdentity.generate()
    if filesystem_type(tmp_path) not in ("tmpfs", "ramfs"):
        with pytest.raises(ModelSourceError, match="not tmpfs"):
            materialize_to_tmpfs(source, ident, PROVIDER, tmp_path / "m", node_version="t", http=http)
        assert not (tmp_path / "m").exists()
    shm = Path("/dev/shm")
    if not shm.is_dir() or filesystem_type(shm) != "tmpfs":
        pytest.skip("no tmpfs at /dev/shm")
    require_ram_path(shm)
    out = materialize_to_tmpfs(source, ident, PROVIDER, shm / f"dcml-test-{MODEL_ID.hex()[:8]}",
                               node_version="t", http=http)
    try:
        for p in clear.iterdir():
            assert (out / p.name).read_bytes() == p.read_bytes()
        assert (out / "model-00001-of-00002.safetensors").stat().st_mode & 0o777 == 0o600
    finally:
        import shutil

        shutil.rmtree(out)


def test_broker_refusal_is_a_clear_node_error(setup, tmp_path):
    _, _, source, http = setup
    bad = EncryptedModelSource(bundle_dir=source.bundle_dir, broker_url="http://testserver/nowhere")
    with pytest.raises(ModelSourceError, match="refused the nonce request"):
        encrypted_embedded_engine(bad, EnclaveIdentity.generate(), PROVIDER, node_version="t", http=http)
