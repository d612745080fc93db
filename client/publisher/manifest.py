"""Bundle manifests (format `dcml-bundle/2`, see bundle.py's doc): the signed file list, its EIP-712
signature, the checks on file names, the weights hash and the key commitment."""

from __future__ import annotations

import hashlib
import hmac
import json
from enum import StrEnum
from pathlib import Path
from typing import Any

import blake3
from eth_account.signers.local import LocalAccount
from eth_utils import to_checksum_address
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from dcml.client.wire import eip712
from dcml.client.wire.errors import DcmlError
from dcml.client.wire.hexutil import from_hex, to_hex

FORMAT = "dcml-bundle/2"  # /2: BLAKE3 file and weights hashes (/1 had SHA-256; refused, re-seal)
MANIFEST_FILE = "manifest.json"
SEALED_SUFFIX = ".dcml"
KEY_LEN = 32
MAX_CHUNK_SIZE = 64 << 20

MANIFEST_DOMAIN = {"name": "dcml-model-bundle", "version": "2"}
MANIFEST_HASH_DOMAIN = b"dcml-manifest-v2"
WEIGHTS_HASH_DOMAIN = b"dcml-weights-v2"
MANIFEST = eip712.struct("BundleManifest", [("modelId", "bytes32"), ("manifestHash", "bytes32"),
                                           ("weightsHash", "bytes32")])
MANIFEST_EIP712_DOMAIN = eip712.Domain(MANIFEST_DOMAIN["name"], MANIFEST_DOMAIN["version"])  # no chain: portable
MANIFEST_TYPES = {"EIP712Domain": MANIFEST_EIP712_DOMAIN.struct.types(), "BundleManifest": MANIFEST.types()}



class BundleReason(StrEnum):
    MALFORMED = "malformed"
    WRONG_MODEL = "wrong_model"
    WRONG_FILE = "wrong_file"
    TAMPERED = "tampered"
    TRUNCATED = "truncated"
    HASH_MISMATCH = "hash_mismatch"
    BAD_SIGNATURE = "bad_signature"
    WRONG_KEY = "wrong_key"


class BundleError(DcmlError):
    """A bundle or sealed file failed a check; `reason` is machine-readable, the message says what to do."""

    reason_in_str = True
    reason: BundleReason

    def __init__(self, reason: BundleReason, message: str) -> None:
        super().__init__(message, reason=reason)



# --- manifest -----------------------------------------------------------------------------------


class SealedInfo(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    path: str  # relative path of the sealed file in the bundle
    size: int = Field(ge=0)
    blake3: str  # hex BLAKE3-256 of the whole sealed file (header included)


class FileEntry(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str  # relative path of the clear file (what the engine sees)
    size: int = Field(ge=0)
    blake3: str  # hex BLAKE3-256 of the clear bytes
    sealed: SealedInfo | None = None  # None: shipped in clear (config, tokenizer)


class Manifest(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    format: str = FORMAT
    model_id: str  # 0x + 64 hex
    model_name: str
    publisher: str  # checksummed address that signs the manifest
    chunk_size: int = Field(gt=0, le=MAX_CHUNK_SIZE)
    created_at: int
    key_commitment: str  # HMAC-SHA256(model_key, b"dcml-bundle-v1 key commitment" || model_id)
    weights_hash: str
    files: list[FileEntry]

    @model_validator(mode="before")
    @classmethod
    def _known_format(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("format", FORMAT) != FORMAT:
            raise ValueError(_format_message(data.get("format")))
        return data

    def canonical(self) -> bytes:
        return json.dumps(self.model_dump(), sort_keys=True, separators=(",", ":")).encode()

    def digest(self) -> bytes:
        return hashlib.sha256(MANIFEST_HASH_DOMAIN + self.canonical()).digest()

    @property
    def model_id_bytes(self) -> bytes:
        return bytes.fromhex(self.model_id.removeprefix("0x"))

    def file(self, name: str) -> FileEntry:
        for f in self.files:
            if f.name == name:
                return f
        raise BundleError(BundleReason.MALFORMED, f"{name} is not in the manifest")

    @property
    def sealed_files(self) -> list[FileEntry]:
        return [f for f in self.files if f.sealed is not None]


def _format_message(found: object) -> str:
    return (f"bundle format {found!r} is not {FORMAT!r} (BLAKE3 hashes): this dcml no longer reads bundles "
            "with SHA-256 manifests; re-seal the model with `dcml model encrypt`, or open it with the dcml "
            "release that made it")


class SignedManifest(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    manifest: Manifest
    signature: str

    @property
    def manifest_hash(self) -> bytes:
        return self.manifest.digest()


def _message(m: Manifest) -> dict[str, Any]:
    return {"modelId": m.model_id_bytes, "manifestHash": m.digest(), "weightsHash": from_hex(m.weights_hash)}


def manifest_typed_data(m: Manifest) -> dict[str, Any]:
    """The signed struct as typed-data JSON (for a wallet or ethers to sign the same manifest)."""
    return MANIFEST_EIP712_DOMAIN.typed_data(MANIFEST, _message(m))


def manifest_signing_digest(m: Manifest) -> bytes:
    return MANIFEST_EIP712_DOMAIN.digest(MANIFEST.hash_message(_message(m)))


def sign_manifest(manifest: Manifest, publisher: LocalAccount) -> SignedManifest:
    if to_checksum_address(manifest.publisher) != publisher.address:
        raise ValueError(f"manifest names publisher {manifest.publisher}, but {publisher.address} is signing")
    return SignedManifest(manifest=manifest, signature=to_hex(eip712.sign(manifest_signing_digest(manifest),
                                                                           publisher)))


def verify_manifest(signed: SignedManifest, *, publisher: str | None = None,
                    manifest_hash: bytes | None = None) -> Manifest:
    """Check the publisher's signature (and, when given, the expected publisher and on-chain hash)."""
    m = signed.manifest
    if m.format != FORMAT:
        raise BundleError(BundleReason.MALFORMED, _format_message(m.format))
    try:
        signer = to_checksum_address(eip712.recover(manifest_signing_digest(m), signed.signature))
    except eip712.SignatureError as exc:
        raise BundleError(BundleReason.BAD_SIGNATURE, f"manifest signature is malformed ({exc})") from exc
    if signer != to_checksum_address(m.publisher):
        raise BundleError(BundleReason.BAD_SIGNATURE,
                          f"manifest is signed by {signer}, not by its stated publisher {m.publisher}: "
                          "the manifest was altered; fetch the bundle again from the publisher")
    if publisher is not None and signer != to_checksum_address(publisher):
        raise BundleError(BundleReason.BAD_SIGNATURE,
                          f"manifest publisher {signer} is not the expected publisher {publisher} "
                          "(the one ModelRegistry names for this model)")
    if manifest_hash is not None and not hmac.compare_digest(m.digest(), manifest_hash):
        raise BundleError(BundleReason.HASH_MISMATCH,
                          f"manifest hash {m.digest().hex()} is not the published one {manifest_hash.hex()}: "
                          "the bundle is another release than the registry's")
    check_names(m)
    return m


_NAME_MAX = 255  # per component, as on Linux filesystems
_PATH_MAX = 1024


def _bad_name(name: str) -> str | None:
    """Why `name` cannot be a bundle file name, or None."""
    if not name or len(name.encode()) > _PATH_MAX:
        return "empty or too long"
    if "\\" in name or "\0" in name or any(ord(c) < 0x20 for c in name):
        return "backslash or control character"
    if name.startswith("/"):
        return "absolute path"
    for part in name.split("/"):
        if part in ("", ".", ".."):
            return "empty, '.' or '..' component"
        if part.startswith("."):
            return "hidden component"
        if len(part.encode()) > _NAME_MAX:
            return "component too long"
    return None


def check_names(manifest: Manifest) -> None:
    """Refuse a manifest whose file names could escape the bundle or its output directory (see module doc)."""
    seen: set[str] = {MANIFEST_FILE}
    for entry in manifest.files:
        paths = [entry.name] + ([entry.sealed.path] if entry.sealed is not None else [])
        for path in paths:
            why = _bad_name(path)
            if why is not None:
                raise BundleError(BundleReason.MALFORMED, f"manifest file name {path!r} is refused ({why}): a "
                                  "bundle holds only relative paths inside its own directory")
            if path in seen:
                raise BundleError(BundleReason.MALFORMED, f"manifest names {path!r} twice")
            seen.add(path)
        if entry.sealed is not None and entry.sealed.path != entry.name + SEALED_SUFFIX:
            raise BundleError(BundleReason.MALFORMED, f"sealed file {entry.sealed.path!r} must be "
                              f"{entry.name + SEALED_SUFFIX!r}: the manifest's layout allows nothing else")


def safe_join(root: str | Path, name: str) -> Path:
    """`root / name` for a checked bundle name, refusing any result outside `root` once resolved."""
    why = _bad_name(name)
    if why is not None:
        raise BundleError(BundleReason.MALFORMED, f"file name {name!r} is refused ({why})")
    base = Path(root).resolve()
    path = (base / name).resolve()
    if not path.is_relative_to(base):
        raise BundleError(BundleReason.MALFORMED, f"{name!r} resolves to {path}, outside {base} (a symlink?)")
    return path


def load_manifest(bundle_dir: str | Path) -> SignedManifest:
    path = Path(bundle_dir) / MANIFEST_FILE
    try:
        raw = path.read_bytes()
    except FileNotFoundError as exc:
        raise BundleError(BundleReason.MALFORMED, f"{path} missing: is {bundle_dir} a dcml bundle?") from exc
    try:
        fmt = json.loads(raw)["manifest"]["format"]
    except (ValueError, KeyError, TypeError):
        fmt = FORMAT  # let the full validation below say what is wrong
    if fmt != FORMAT:
        raise BundleError(BundleReason.MALFORMED, f"{path}: {_format_message(fmt)}")
    try:
        return SignedManifest.model_validate_json(raw)
    except ValidationError as exc:
        raise BundleError(BundleReason.MALFORMED, f"{path} is not a valid manifest: {exc}") from exc


def weights_hash(entries: list[FileEntry]) -> bytes:
    h = blake3.blake3(WEIGHTS_HASH_DOMAIN)
    for e in sorted((e for e in entries if e.sealed is not None), key=lambda e: e.name):
        h.update(e.name.encode() + b"\0" + bytes.fromhex(e.blake3))
    return h.digest()


def blake3_hex(data: bytes) -> str:
    return blake3.blake3(data).hexdigest()


def key_commitment(model_key: bytes, model_id: bytes) -> str:
    return hmac.new(model_key, b"dcml-bundle-v1 key commitment" + model_id, hashlib.sha256).hexdigest()


def check_key(manifest: Manifest, model_key: bytes) -> None:
    if len(model_key) != KEY_LEN or not hmac.compare_digest(
            key_commitment(model_key, manifest.model_id_bytes), manifest.key_commitment):
        raise BundleError(BundleReason.WRONG_KEY,
                          "this key does not open the bundle (key commitment differs): ask the model's key "
                          "broker again, or check that the bundle and broker are for the same release")

