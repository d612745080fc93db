"""Shared by the encrypted-model tests: a two-shard copy of the demo model and its bundle."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from eth_account import Account
from safetensors.torch import load_file, save_file

from dcml.client.attestation.verify import Policy
from dcml.client.chain.model_registry import model_id
from dcml.client.demo.kit.nodes import simulated_measurement
from dcml.client.publisher.broker_state import AuditLog
from dcml.client.publisher.bundle import SignedManifest, encrypt_model, generate_key
from dcml.client.publisher.key_broker import KeyBroker, ModelEntry
from dcml.node.tee.simulated import SimulatedProvider

DEMO = Path(__file__).resolve().parent.parent / "models" / "demo"
MODEL_ID = model_id("demo-sharded")
PUBLISHER = Account.from_key("0x" + "42" * 32)
PROVIDER = SimulatedProvider()
SIM = simulated_measurement(PROVIDER)  # what a simulated node measures as, for the broker's allow-list


def sharded_demo(dst: Path) -> Path:
    """models/demo split into two safetensors shards plus the HF index (a multi-file model)."""
    dst.mkdir(parents=True)
    for p in DEMO.iterdir():
        if p.suffix != ".safetensors":
            shutil.copy(p, dst / p.name)
    tensors = load_file(DEMO / "model.safetensors")
    names = sorted(tensors)
    half = len(names) // 2
    weight_map = {}
    for i, part in enumerate((names[:half], names[half:]), start=1):
        shard = f"model-0000{i}-of-00002.safetensors"
        save_file({n: tensors[n].contiguous() for n in part}, dst / shard, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, shard))
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return dst


def make_bundle(tmp: Path, chunk_size: int = 1 << 16) -> tuple[Path, Path, bytes, SignedManifest]:
    clear = sharded_demo(tmp / "clear")
    key = generate_key()
    signed = encrypt_model(clear, tmp / "bundle", model_id=MODEL_ID, model_name="demo-sharded",
                           publisher=PUBLISHER, model_key=key, chunk_size=chunk_size)
    return clear, tmp / "bundle", key, signed


def sim_broker(key: bytes, audit: Path) -> KeyBroker:
    """A key broker releasing MODEL_ID's `key` to simulated enclaves only (SIM allow-listed), auditing to `audit`."""
    entry = ModelEntry(model_id=MODEL_ID, key=key, allowed_measurements=frozenset({SIM}))
    return KeyBroker(models={MODEL_ID: entry}, policy=Policy(), audit=AuditLog(audit), allow_simulated=True)
