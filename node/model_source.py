"""Node side of encrypted models: attest to the publisher's key broker, open the bundle, never write clear weights.

Two ways to hand the weights to an engine:
* embedded: `EncryptedEmbeddedEngine` gets a state dict built from buffers in RAM (safetensors parsed
  in place with `torch.frombuffer`, no copy); config, tokenizer and templates are loaded from a private
  directory holding exactly the manifest's clear files, written from the bytes that were verified;
* vLLM sidecar: `materialize_to_tmpfs` writes the clear HF directory into an empty tmpfs mount (RAM,
  inside the CVM's encrypted memory) and refuses any other filesystem. Point `vllm serve` at it.

Either way the engine never reads the bundle directory itself: a file the operator drops there (say a
`chat_template.jinja`) or swaps after the check is never used, because only verified bytes are copied.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import struct
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import torch
from transformers import AutoModelForCausalLM

from dcml.client.publisher.bundle import (
    BundleError,
    Manifest,
    check_key,
    decrypt_model,
    decrypt_to_file,
    load_manifest,
    read_clear_files,
    safe_join,
    verify_manifest,
    write_clear_files,
)
from dcml.client.wire.errors import DcmlError
from dcml.client.wire.key_release import decode_release, open_model_key
from dcml.node.engine.embedded import EmbeddedEngine
from dcml.node.identity import EnclaveIdentity
from dcml.node.tee.base import AttestationProvider
from dcml.node.tee.document import build_attestation_document

log = logging.getLogger(__name__)

RAM_FILESYSTEMS = frozenset({"tmpfs", "ramfs"})


class ModelSourceError(DcmlError, RuntimeError):
    """The encrypted model could not be obtained; the message says what to fix."""

    reason = "model_unavailable"


@dataclass(frozen=True)
class EncryptedModelSource:
    """`[engine.encrypted]`: where the bundle is, who releases its key, what the registry promises."""

    bundle_dir: Path
    broker_url: str
    publisher: str | None = None  # expected manifest signer (ModelRegistry.terms publisher)
    manifest_hash: bytes | None = None  # expected release (ModelRegistry.listing manifestHash)


# --- the key ------------------------------------------------------------------------------------


def fetch_model_key(broker_url: str, manifest: Manifest, identity: EnclaveIdentity, provider: AttestationProvider,
                    *, node_version: str, http: httpx.Client | None = None, timeout: float = 30.0) -> bytes:
    """Nonce -> attestation over it -> sealed key -> opened with the enclave's HPKE key -> checked."""
    base = broker_url.rstrip("/") + f"/v1/models/{manifest.model_id}"
    client = http or httpx.Client(timeout=timeout)
    try:
        r = client.get(base + "/nonce", params={"node": identity.address})
        _raise_for(r, "nonce")
        nonce = bytes.fromhex(r.json()["nonce"])
        doc = build_attestation_document(identity, provider, nonce, node_version=node_version)
        r = client.post(base + "/key", json={"nonce": nonce.hex(), "attestation": doc.model_dump(mode="json")})
        _raise_for(r, "key")
        sealed, _ = decode_release(r.json())
    except httpx.HTTPError as exc:
        raise ModelSourceError(f"key broker {broker_url} unreachable: {exc}") from exc
    finally:
        if http is None:
            client.close()
    try:
        key = open_model_key(sealed, identity.hpke_private_key, model_id=manifest.model_id_bytes, nonce=nonce)
    except ValueError as exc:
        raise ModelSourceError(str(exc)) from exc
    check_key(manifest, key)  # a broker key for another release fails here, before any decryption
    return key


def _raise_for(response: httpx.Response, step: str) -> None:
    if response.status_code == 200:
        return
    try:
        err = response.json()["error"]
        detail = f"{err['code']}: {err['message']}"
    except (ValueError, KeyError, TypeError):
        detail = response.text[:300]
    raise ModelSourceError(f"key broker refused the {step} request ({response.status_code}) {detail}")


# --- in-memory weights for the embedded engine --------------------------------------------------

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


def safetensors_from_buffer(buf: bytearray) -> dict[str, torch.Tensor]:
    """Tensors that view `buf` directly (safetensors.torch.load would want immutable bytes: a copy)."""
    (header_len,) = struct.unpack_from("<Q", buf, 0)
    header = json.loads(bytes(buf[8:8 + header_len]))
    base = 8 + header_len
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = _DTYPES.get(info["dtype"])
        if dtype is None:
            raise ModelSourceError(f"tensor {name}: dtype {info['dtype']} not supported")
        start, end = info["data_offsets"]
        count = (end - start) // torch.empty((), dtype=dtype).element_size()
        if count:
            t = torch.frombuffer(buf, dtype=dtype, offset=base + start, count=count)
        else:
            t = torch.empty(0, dtype=dtype)
        out[name] = t.reshape(info["shape"])
    return out


def state_dict_from_weights(weights: Mapping[str, bytearray]) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for name, buf in weights.items():
        if name.endswith(".safetensors"):
            state.update(safetensors_from_buffer(buf))
        elif name.endswith((".bin", ".pt", ".pth")):
            state.update(torch.load(io.BytesIO(buf), map_location="cpu", weights_only=True))
        else:
            raise ModelSourceError(f"{name}: the embedded engine loads .safetensors or .bin weights only")
    return state


class EncryptedEmbeddedEngine(EmbeddedEngine):
    """EmbeddedEngine whose weights come from memory and whose config, tokenizer and templates come from
    `clear_files` (the manifest's verified bytes, nothing else), written to a private directory it owns."""

    def __init__(self, clear_files: dict[str, bytes], state_dict: dict[str, torch.Tensor], **kwargs: Any) -> None:
        self._clear_dir = tempfile.TemporaryDirectory(prefix="dcml-model-")  # 0700, removed with the engine
        write_clear_files(clear_files, self._clear_dir.name)
        super().__init__(self._clear_dir.name, **kwargs)
        self._state_dict: dict[str, torch.Tensor] | None = state_dict

    def _load_model(self) -> torch.nn.Module:
        if self._state_dict is None:
            raise ModelSourceError("the in-memory weights were already used: open the bundle again")
        dtype = torch.float32 if self.device.type == "cpu" else (getattr(self.config, "dtype", None) or torch.float32)
        model = AutoModelForCausalLM.from_config(self.config)
        missing, unexpected = model.load_state_dict(self._state_dict, strict=False)
        tied = set(getattr(model, "_tied_weights_keys", None) or {})
        if unexpected or set(missing) - set(tied):
            raise ModelSourceError(f"weights do not fit the config: missing {sorted(set(missing) - set(tied))[:5]}, "
                                   f"unexpected {unexpected[:5]}")
        model.tie_weights()
        self._state_dict = None  # the buffers can be freed once copied into the model
        return model.to(device=self.device, dtype=dtype).eval()


def open_bundle(source: EncryptedModelSource, identity: EnclaveIdentity, provider: AttestationProvider, *,
                node_version: str, http: httpx.Client | None = None
                ) -> tuple[Manifest, dict[str, bytes], dict[str, bytearray]]:
    """Verify the manifest, get the key from the broker, open every weight file into RAM:
    (manifest, verified clear files, weights)."""
    manifest = verify_manifest(load_manifest(source.bundle_dir), publisher=source.publisher,
                               manifest_hash=source.manifest_hash)
    key = fetch_model_key(source.broker_url, manifest, identity, provider, node_version=node_version, http=http)
    manifest, weights = decrypt_model(source.bundle_dir, key, publisher=source.publisher,
                                      manifest_hash=source.manifest_hash)
    return manifest, read_clear_files(source.bundle_dir, manifest), weights


def encrypted_embedded_engine(source: EncryptedModelSource, identity: EnclaveIdentity,
                              provider: AttestationProvider, *, node_version: str,
                              http: httpx.Client | None = None, **engine_kwargs: Any) -> EncryptedEmbeddedEngine:
    """The factory `[engine.encrypted]` uses for kind = "embedded"."""
    manifest, clear, weights = open_bundle(source, identity, provider, node_version=node_version, http=http)
    engine_kwargs.setdefault("model_name", manifest.model_name)
    return EncryptedEmbeddedEngine(clear, state_dict_from_weights(weights), **engine_kwargs)


# --- tmpfs for a vLLM sidecar -------------------------------------------------------------------


def filesystem_type(path: str | Path) -> str:
    """fstype of the mount holding `path` (or its nearest existing parent), from /proc/self/mountinfo."""
    p = Path(path).absolute()
    while not p.exists():
        p = p.parent
    p = p.resolve()
    best, fstype = "", "unknown"
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            mount_point = left.split()[4].replace("\\040", " ")
            inside = str(p) == mount_point or str(p).startswith(mount_point.rstrip("/") + "/")
            if inside and len(mount_point) >= len(best):
                best, fstype = mount_point, right.split()[0]
    return fstype


def require_ram_path(path: str | Path) -> None:
    fstype = filesystem_type(path)
    if fstype not in RAM_FILESYSTEMS:
        raise ModelSourceError(f"{path} is on {fstype}, not tmpfs: clear weights must stay in RAM. Mount one "
                               "inside the CVM (mount -t tmpfs -o size=<model size>,mode=0700 tmpfs <dir>)")
    if _swap_active():
        log.warning("swap is on: tmpfs pages holding clear weights can be written to the swap device; "
                    "turn swap off in the CVM (or encrypt it)")


def _swap_active() -> bool:
    try:
        return len(Path("/proc/swaps").read_text().strip().splitlines()) > 1
    except OSError:
        return False


def materialize_to_tmpfs(source: EncryptedModelSource, identity: EnclaveIdentity, provider: AttestationProvider,
                         tmpfs_dir: str | Path, *, node_version: str, http: httpx.Client | None = None) -> Path:
    """Write the clear HF directory (for `vllm serve <dir>`) into `tmpfs_dir`, one chunk at a time.

    `tmpfs_dir` must be empty (or absent): vLLM reads every file there, so nothing but the manifest's files
    may be in it."""
    require_ram_path(tmpfs_dir)
    out = Path(tmpfs_dir)
    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    if any(out.iterdir()):
        raise ModelSourceError(f"{out} is not empty: vLLM would read whatever else is there (a chat template, "
                               "a config); give the node an empty tmpfs directory")
    manifest = verify_manifest(load_manifest(source.bundle_dir), publisher=source.publisher,
                               manifest_hash=source.manifest_hash)
    clear = read_clear_files(source.bundle_dir, manifest)
    key = fetch_model_key(source.broker_url, manifest, identity, provider, node_version=node_version, http=http)
    try:
        write_clear_files(clear, out)
        for entry in manifest.sealed_files:
            decrypt_to_file(source.bundle_dir, manifest, entry, key, safe_join(out, entry.name))
            os.chmod(safe_join(out, entry.name), 0o600)
    except (BundleError, OSError):
        shutil.rmtree(out, ignore_errors=True)  # never leave a half-verified model behind
        raise
    return out
