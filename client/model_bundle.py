"""Encrypted model bundles: a Hugging Face directory whose weight files are sealed with AES-256-GCM.

Bundle layout (a directory)::

    manifest.json                  {"manifest": {...}, "signature": "0x..."}   (publisher-signed)
    config.json, tokenizer.json…   copied in clear (hashes in the manifest)
    model.safetensors.dcml         one sealed file per weight file

Sealed file = header || chunks. Header (big-endian)::

    magic "DCMLSEAL"(8) | version 1 (1) | chunk_size u32 | nonce_prefix (7, random per file)
    | model_id (32) | name_len u16 | name (utf-8, the clear file's relative path)

Chunks follow the STREAM construction (Hoang-Reyhanitabar-Rogaway-Vizár): the plaintext is cut into
`chunk_size` pieces (the last one may be shorter or empty; there is always one), each sealed as
``AES-256-GCM(file_key, nonce = prefix(7) || counter u32 || last-flag u8, aad = sha256(header))``.
``file_key = HKDF-SHA256(model_key, salt=b"dcml-bundle-v1", info=b"file key" || sha256(header))``,
so each file has its own key and the header (model id, file name, chunk size, prefix) is bound twice.
Reordered or swapped chunks fail (counter), truncation fails (last flag), a file moved under another
name or model fails (header), and a flipped bit anywhere fails (GCM tag).

Manifest: canonical JSON (sorted keys, no whitespace) of `Manifest`; ``manifest_hash =
sha256(b"dcml-manifest-v1" || canonical JSON)`` is what the publisher signs (EIP-712, see
`MANIFEST_TYPES`; no chain id, so a bundle is chain-independent) and what `ModelRegistry` stores.
``weights_hash = sha256(b"dcml-weights-v1" || for each sealed file sorted by name: name || 0x00 ||
sha256(clear file))``: a public commitment to the clear weights that anyone holding them can recompute.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import struct
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from eth_account import Account
from eth_account.messages import encode_typed_data
from eth_account.signers.local import LocalAccount
from eth_utils import to_checksum_address
from pydantic import BaseModel, ConfigDict, Field, ValidationError

FORMAT = "dcml-bundle/1"
MANIFEST_FILE = "manifest.json"
SEALED_SUFFIX = ".dcml"
MAGIC = b"DCMLSEAL"
VERSION = 1
KEY_LEN = 32
TAG_LEN = 16
NONCE_PREFIX_LEN = 7
DEFAULT_CHUNK_SIZE = 1 << 20  # 1 MiB: per-chunk Python overhead is negligible and memory stays small
MAX_CHUNK_SIZE = 64 << 20
_FIXED_HEADER = struct.Struct(">8sBI7s32sH")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx")

MANIFEST_DOMAIN = {"name": "dcml-model-bundle", "version": "1"}
MANIFEST_TYPES = {
    "EIP712Domain": [{"name": "name", "type": "string"}, {"name": "version", "type": "string"}],
    "BundleManifest": [
        {"name": "modelId", "type": "bytes32"},
        {"name": "manifestHash", "type": "bytes32"},
        {"name": "weightsHash", "type": "bytes32"},
    ],
}


class BundleReason(StrEnum):
    MALFORMED = "malformed"
    WRONG_MODEL = "wrong_model"
    WRONG_FILE = "wrong_file"
    TAMPERED = "tampered"
    TRUNCATED = "truncated"
    HASH_MISMATCH = "hash_mismatch"
    BAD_SIGNATURE = "bad_signature"
    WRONG_KEY = "wrong_key"


class BundleError(Exception):
    """A bundle or sealed file failed a check; `reason` is machine-readable, the message says what to do."""

    def __init__(self, reason: BundleReason, message: str) -> None:
        super().__init__(f"{reason.value}: {message}")
        self.reason = reason


# --- manifest -----------------------------------------------------------------------------------


class SealedInfo(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    path: str  # relative path of the sealed file in the bundle
    size: int = Field(ge=0)
    sha256: str


class FileEntry(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str  # relative path of the clear file (what the engine sees)
    size: int = Field(ge=0)
    sha256: str  # of the clear bytes
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

    def canonical(self) -> bytes:
        return json.dumps(self.model_dump(), sort_keys=True, separators=(",", ":")).encode()

    def digest(self) -> bytes:
        return hashlib.sha256(b"dcml-manifest-v1" + self.canonical()).digest()

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


class SignedManifest(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    manifest: Manifest
    signature: str

    @property
    def manifest_hash(self) -> bytes:
        return self.manifest.digest()


def _typed_data(m: Manifest) -> dict:
    return {
        "types": MANIFEST_TYPES, "primaryType": "BundleManifest", "domain": MANIFEST_DOMAIN,
        "message": {"modelId": m.model_id_bytes, "manifestHash": m.digest(),
                    "weightsHash": bytes.fromhex(m.weights_hash.removeprefix("0x"))},
    }


def sign_manifest(manifest: Manifest, publisher: LocalAccount) -> SignedManifest:
    if to_checksum_address(manifest.publisher) != publisher.address:
        raise ValueError(f"manifest names publisher {manifest.publisher}, but {publisher.address} is signing")
    sig = publisher.sign_message(encode_typed_data(full_message=_typed_data(manifest))).signature
    return SignedManifest(manifest=manifest, signature="0x" + bytes(sig).hex())


def verify_manifest(signed: SignedManifest, *, publisher: str | None = None,
                    manifest_hash: bytes | None = None) -> Manifest:
    """Check the publisher's signature (and, when given, the expected publisher and on-chain hash)."""
    m = signed.manifest
    if m.format != FORMAT:
        raise BundleError(BundleReason.MALFORMED, f"bundle format {m.format!r} is not {FORMAT!r}: upgrade dcml")
    try:
        signer = Account.recover_message(encode_typed_data(full_message=_typed_data(m)),
                                         signature=bytes.fromhex(signed.signature.removeprefix("0x")))
    except Exception as exc:  # eth_keys raises several types on malformed signatures
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
    return m


def load_manifest(bundle_dir: str | Path) -> SignedManifest:
    path = Path(bundle_dir) / MANIFEST_FILE
    try:
        return SignedManifest.model_validate_json(path.read_bytes())
    except FileNotFoundError as exc:
        raise BundleError(BundleReason.MALFORMED, f"{path} missing: is {bundle_dir} a dcml bundle?") from exc
    except ValidationError as exc:
        raise BundleError(BundleReason.MALFORMED, f"{path} is not a valid manifest: {exc}") from exc


def weights_hash(entries: list[FileEntry]) -> bytes:
    h = hashlib.sha256(b"dcml-weights-v1")
    for e in sorted((e for e in entries if e.sealed is not None), key=lambda e: e.name):
        h.update(e.name.encode() + b"\0" + bytes.fromhex(e.sha256))
    return h.digest()


def key_commitment(model_key: bytes, model_id: bytes) -> str:
    return hmac.new(model_key, b"dcml-bundle-v1 key commitment" + model_id, hashlib.sha256).hexdigest()


def check_key(manifest: Manifest, model_key: bytes) -> None:
    if len(model_key) != KEY_LEN or not hmac.compare_digest(
            key_commitment(model_key, manifest.model_id_bytes), manifest.key_commitment):
        raise BundleError(BundleReason.WRONG_KEY,
                          "this key does not open the bundle (key commitment differs): ask the model's key "
                          "broker again, or check that the bundle and broker are for the same release")


# --- the sealed file format ---------------------------------------------------------------------


@dataclass(frozen=True)
class SealedHeader:
    chunk_size: int
    nonce_prefix: bytes
    model_id: bytes
    name: str

    def encode(self) -> bytes:
        name = self.name.encode()
        return _FIXED_HEADER.pack(MAGIC, VERSION, self.chunk_size, self.nonce_prefix, self.model_id,
                                  len(name)) + name

    @classmethod
    def read(cls, f: BinaryIO) -> tuple[SealedHeader, bytes]:
        fixed = f.read(_FIXED_HEADER.size)
        if len(fixed) != _FIXED_HEADER.size:
            raise BundleError(BundleReason.TRUNCATED, "sealed file is shorter than its header")
        magic, version, chunk_size, prefix, model_id, name_len = _FIXED_HEADER.unpack(fixed)
        if magic != MAGIC or version != VERSION:
            raise BundleError(BundleReason.MALFORMED, "not a dcml sealed file (v1): wrong magic or version")
        if not 0 < chunk_size <= MAX_CHUNK_SIZE:
            raise BundleError(BundleReason.MALFORMED, f"chunk size {chunk_size} out of range")
        raw = f.read(name_len)
        try:
            name = raw.decode()
        except UnicodeDecodeError as exc:
            raise BundleError(BundleReason.MALFORMED, "file name in the header is not UTF-8") from exc
        if len(raw) != name_len:
            raise BundleError(BundleReason.TRUNCATED, "sealed file is shorter than its header")
        return cls(chunk_size, prefix, model_id, name), fixed + raw


def sealed_size(size: int, chunk_size: int, name: str) -> int:
    chunks = max(1, -(-size // chunk_size))
    return _FIXED_HEADER.size + len(name.encode()) + size + chunks * TAG_LEN


class _FileCipher:
    def __init__(self, model_key: bytes, header_bytes: bytes, nonce_prefix: bytes) -> None:
        self.aad = hashlib.sha256(header_bytes).digest()
        key = HKDF(algorithm=hashes.SHA256(), length=KEY_LEN, salt=b"dcml-bundle-v1",
                   info=b"file key" + self.aad).derive(model_key)
        self.aead = AESGCM(key)
        self.prefix = nonce_prefix

    def nonce(self, counter: int, last: bool) -> bytes:
        if counter >= 1 << 32:
            raise BundleError(BundleReason.MALFORMED, "file has more than 2^32 chunks: use a larger chunk size")
        return self.prefix + counter.to_bytes(4, "big") + (b"\1" if last else b"\0")


class _HashThread:
    """sha256 fed on a worker thread, in order; hashlib releases the GIL on large updates, so hashing
    overlaps AES-GCM (which also releases it) and file I/O. At most `depth` chunks wait."""

    def __init__(self, depth: int = 4) -> None:
        self._h = hashlib.sha256()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="sha256")
        self._pending: deque[Future] = deque()
        self._depth = depth

    def update(self, data: bytes | memoryview) -> None:
        self._pending.append(self._pool.submit(self._h.update, data))
        while len(self._pending) > self._depth:
            self._pending.popleft().result()

    def hexdigest(self) -> str:
        while self._pending:
            self._pending.popleft().result()
        self._pool.shutdown()
        return self._h.hexdigest()

    def close(self) -> None:
        self._pool.shutdown(cancel_futures=True)


Progress = Callable[[int], None]  # called with the number of clear bytes just processed


def _read_ahead(f: BinaryIO, size: int) -> Iterator[tuple[bytes, bool]]:
    """(piece, is_last) pieces of `size` bytes; always at least one (possibly empty) piece."""
    current = f.read(size)
    while True:
        nxt = f.read(size)
        yield current, not nxt
        if not nxt:
            return
        current = nxt


def seal_file(src: str | Path, dst: str | Path, model_key: bytes, *, model_id: bytes, name: str,
              chunk_size: int = DEFAULT_CHUNK_SIZE, progress: Progress | None = None) -> FileEntry:
    """Seal `src` into `dst` in constant memory; return its manifest entry (clear and sealed hashes)."""
    if len(model_key) != KEY_LEN or len(model_id) != 32:
        raise ValueError("model key and model id must be 32 bytes each")
    header = SealedHeader(chunk_size, os.urandom(NONCE_PREFIX_LEN), model_id, name)
    header_bytes = header.encode()
    cipher = _FileCipher(model_key, header_bytes, header.nonce_prefix)
    clear_hash, sealed_hash = _HashThread(), _HashThread()
    size = 0
    tmp = Path(str(dst) + ".part")
    try:
        with open(src, "rb") as fin, open(tmp, "wb") as fout:
            fout.write(header_bytes)
            sealed_hash.update(header_bytes)
            for counter, (piece, last) in enumerate(_read_ahead(fin, chunk_size)):
                clear_hash.update(piece)
                ct = cipher.aead.encrypt(cipher.nonce(counter, last), piece, cipher.aad)
                sealed_hash.update(ct)
                fout.write(ct)
                size += len(piece)
                if progress:
                    progress(len(piece))
        tmp.replace(dst)
    except BaseException:
        clear_hash.close()
        sealed_hash.close()
        tmp.unlink(missing_ok=True)
        raise
    rel = Path(dst).name
    return FileEntry(name=name, size=size, sha256=clear_hash.hexdigest(),
                     sealed=SealedInfo(path=rel, size=Path(dst).stat().st_size, sha256=sealed_hash.hexdigest()))


def open_sealed(path: str | Path, model_key: bytes, *, model_id: bytes, name: str,
                entry: FileEntry | None = None) -> Iterator[memoryview]:
    """Yield the clear pieces of a sealed file, checking every chunk as it goes.

    The clear hash (against `entry`) is only checked after the last piece: consume the whole iterator
    before trusting or publishing what it produced (`decrypt_to_memory` / `decrypt_to_file` do).
    """
    label = f"{name} ({path})"
    with open(path, "rb") as f:
        header, header_bytes = SealedHeader.read(f)
        if not hmac.compare_digest(header.model_id, model_id):
            raise BundleError(BundleReason.WRONG_MODEL, f"{label} is sealed for model 0x{header.model_id.hex()}, "
                              f"not 0x{model_id.hex()}: the bundle was relabelled or mixed with another model's")
        if header.name != name:
            raise BundleError(BundleReason.WRONG_FILE, f"{path} holds {header.name!r}, not {name!r}: files "
                              "were swapped or renamed; fetch the bundle again")
        if entry is not None and entry.sealed is not None:  # after the header: a swap says "swapped"
            actual = os.fstat(f.fileno()).st_size
            if actual < entry.sealed.size:
                raise BundleError(BundleReason.TRUNCATED, f"{label} is {actual} bytes, the manifest says "
                                  f"{entry.sealed.size}: the download was cut short; fetch it again")
        cipher = _FileCipher(model_key, header_bytes, header.nonce_prefix)
        clear_hash = _HashThread() if entry is not None else None
        block = header.chunk_size + TAG_LEN
        buf = bytearray(header.chunk_size)
        size = 0
        try:
            for counter, (ct, last) in enumerate(_read_ahead(f, block)):
                if len(ct) < TAG_LEN:
                    raise BundleError(BundleReason.TRUNCATED, f"{label}: chunk {counter} is cut short")
                n = len(ct) - TAG_LEN
                try:
                    cipher.aead.decrypt_into(cipher.nonce(counter, last), ct, cipher.aad, memoryview(buf)[:n])
                except InvalidTag:
                    raise _diagnose(cipher, ct, counter, last, label) from None
                out = memoryview(buf)[:n]
                if clear_hash is not None:
                    clear_hash.update(bytes(out))  # the worker needs its own copy: buf is reused
                size += n
                yield out
            if entry is not None:
                digest = clear_hash.hexdigest()
                if size != entry.size or digest != entry.sha256:
                    raise BundleError(BundleReason.HASH_MISMATCH, f"{label} opened to {size} bytes with sha256 "
                                      f"{digest}, the manifest says {entry.size} bytes, {entry.sha256}")
        finally:
            if clear_hash is not None:
                clear_hash.close()


def _diagnose(cipher: _FileCipher, ct: bytes, counter: int, last: bool, label: str) -> BundleError:
    """Tell truncation (a final-looking chunk that was sealed as non-final) from other tampering."""
    if last:
        try:
            cipher.aead.decrypt(cipher.nonce(counter, False), ct, cipher.aad)
            return BundleError(BundleReason.TRUNCATED, f"{label} ends after chunk {counter}, which is not its "
                               "last: the file was truncated; fetch it again")
        except InvalidTag:
            pass
    return BundleError(BundleReason.TAMPERED, f"{label}: chunk {counter} does not authenticate: the file "
                       "was altered, its chunks reordered, or the key is wrong; fetch the bundle again")


def decrypt_to_memory(bundle_dir: str | Path, manifest: Manifest, entry: FileEntry, model_key: bytes,
                      progress: Progress | None = None) -> bytearray:
    """Open one sealed file into a fresh buffer (its clear hash checked). Nothing touches disk."""
    assert entry.sealed is not None
    out = bytearray(entry.size)
    view, pos = memoryview(out), 0
    try:
        for piece in open_sealed(Path(bundle_dir) / entry.sealed.path, model_key,
                                 model_id=manifest.model_id_bytes, name=entry.name, entry=entry):
            if pos + len(piece) > len(out):
                raise BundleError(BundleReason.HASH_MISMATCH, f"{entry.name} is longer than the manifest says")
            view[pos:pos + len(piece)] = piece
            pos += len(piece)
            if progress:
                progress(len(piece))
    except BaseException:
        view[:pos] = bytes(pos)  # don't leave partial clear weights lying around in freed memory
        raise
    return out


def decrypt_to_file(bundle_dir: str | Path, manifest: Manifest, entry: FileEntry, model_key: bytes,
                    dst: str | Path, progress: Progress | None = None) -> None:
    """Open one sealed file into `dst` (mode 0600), in constant memory; `dst` appears only once verified.

    Only ever point `dst` at RAM (tmpfs inside the CVM): node/model_source.py enforces that."""
    assert entry.sealed is not None
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".part")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            for piece in open_sealed(Path(bundle_dir) / entry.sealed.path, model_key,
                                     model_id=manifest.model_id_bytes, name=entry.name, entry=entry):
                f.write(piece)
                if progress:
                    progress(len(piece))
        tmp.replace(dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# --- whole bundles ------------------------------------------------------------------------------


def is_weight_file(name: str) -> bool:
    return name.endswith(WEIGHT_SUFFIXES)


def _walk(model_dir: Path) -> list[str]:
    names = []
    for p in sorted(model_dir.rglob("*")):
        rel = p.relative_to(model_dir).as_posix()
        if any(part.startswith(".") for part in p.relative_to(model_dir).parts) or not p.is_file():
            continue  # .git, .cache, editor files
        names.append(rel)
    return names


def generate_key() -> bytes:
    return os.urandom(KEY_LEN)


def encrypt_model(model_dir: str | Path, out_dir: str | Path, *, model_id: bytes, model_name: str,
                  publisher: LocalAccount, model_key: bytes, chunk_size: int = DEFAULT_CHUNK_SIZE,
                  progress: Progress | None = None) -> SignedManifest:
    """Seal every weight file of an HF directory into `out_dir`, copy the rest, write the signed manifest.

    `progress` gets the clear bytes processed (the total is `sum of file sizes`, see `model_size`)."""
    src, out = Path(model_dir), Path(out_dir)
    names = _walk(src)
    if not any(is_weight_file(n) for n in names):
        raise BundleError(BundleReason.MALFORMED, f"{src} has no weight files ({', '.join(WEIGHT_SUFFIXES)})")
    out.mkdir(parents=True, exist_ok=True)
    if (out / MANIFEST_FILE).exists() or any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty: pick a new --out directory")
    entries = []
    for name in names:
        if is_weight_file(name):
            dst = out / (name + SEALED_SUFFIX)
            dst.parent.mkdir(parents=True, exist_ok=True)
            entry = seal_file(src / name, dst, model_key, model_id=model_id, name=name,
                              chunk_size=chunk_size, progress=progress)
            entries.append(entry.model_copy(update={"sealed": entry.sealed.model_copy(
                update={"path": name + SEALED_SUFFIX})}))
        else:
            data = (src / name).read_bytes()  # config/tokenizer files: small
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            (out / name).write_bytes(data)
            entries.append(FileEntry(name=name, size=len(data), sha256=hashlib.sha256(data).hexdigest()))
            if progress:
                progress(len(data))
    manifest = Manifest(
        model_id="0x" + model_id.hex(), model_name=model_name, publisher=publisher.address,
        chunk_size=chunk_size, created_at=int(time.time()), key_commitment=key_commitment(model_key, model_id),
        weights_hash="0x" + weights_hash(entries).hex(), files=entries,
    )
    signed = sign_manifest(manifest, publisher)
    (out / MANIFEST_FILE).write_text(signed.model_dump_json(indent=1) + "\n")
    return signed


def model_size(model_dir: str | Path) -> int:
    src = Path(model_dir)
    return sum((src / n).stat().st_size for n in _walk(src))


def verify_clear_files(bundle_dir: str | Path, manifest: Manifest) -> None:
    """Check the clear files (config, tokenizer) against the manifest: they steer the model too."""
    for entry in manifest.files:
        if entry.sealed is not None:
            continue
        path = Path(bundle_dir) / entry.name
        try:
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
        except FileNotFoundError as exc:
            raise BundleError(BundleReason.TRUNCATED, f"{path} is missing from the bundle") from exc
        if digest != entry.sha256:
            raise BundleError(BundleReason.HASH_MISMATCH, f"{path} differs from the manifest: the bundle was "
                              "altered; fetch it again")


def decrypt_model(bundle_dir: str | Path, model_key: bytes, *, publisher: str | None = None,
                  manifest_hash: bytes | None = None) -> tuple[Manifest, dict[str, bytearray]]:
    """Verify the manifest and every file, and open the weights into memory: (manifest, {name: bytes})."""
    manifest = verify_manifest(load_manifest(bundle_dir), publisher=publisher, manifest_hash=manifest_hash)
    if weights_hash(manifest.files).hex() != manifest.weights_hash.removeprefix("0x"):
        raise BundleError(BundleReason.HASH_MISMATCH, "manifest weights_hash does not match its file list")
    check_key(manifest, model_key)
    verify_clear_files(bundle_dir, manifest)
    weights: dict[str, bytearray] = {}
    try:
        for entry in manifest.sealed_files:
            weights[entry.name] = decrypt_to_memory(bundle_dir, manifest, entry, model_key)
    except BaseException:
        for buf in weights.values():
            buf[:] = bytes(len(buf))
        raise
    return manifest, weights
