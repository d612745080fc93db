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

Manifest (format ``dcml-bundle/2``): canonical JSON (sorted keys, no whitespace) of `Manifest`;
``manifest_hash = sha256(b"dcml-manifest-v2" || canonical JSON)`` is what the publisher signs (EIP-712
domain version "2", see `MANIFEST_TYPES`; no chain id, so a bundle is chain-independent) and what
`ModelRegistry` stores. Every file entry carries ``blake3`` = plain BLAKE3-256 of the clear bytes, and
every sealed entry ``sealed.blake3`` = plain BLAKE3-256 of the whole sealed file (header included), so
``b3sum`` checks either. ``weights_hash = BLAKE3(b"dcml-weights-v2" || for each sealed file sorted by
name: name || 0x00 || blake3(clear file))``: a public commitment to the clear weights that anyone
holding them can recompute. BLAKE3 (SIMD, multi-threaded on large inputs) keeps hashing off the
critical path: sealing and opening run near AES-GCM speed, where SHA-256 held them to ~1 GB/s.
Version-1 manifests (SHA-256 fields ``sha256``) are refused with `BundleReason.MALFORMED`: re-seal.

File names are checked when a manifest is verified (`check_names`), because a valid signature says only
who published the bundle, not that its names are harmless: each name is a relative POSIX path of plain
components (no absolute path, no ``.``/``..``, no backslash, NUL or empty component, no leading dot),
unique, and a sealed file lives exactly at ``name + ".dcml"``. Every write and read of a bundle file goes
through `safe_join`, which also checks the resolved path stays under its directory (symlinks included).
"""

from __future__ import annotations

import ctypes
import hashlib
import hmac
import json
import os
import struct
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, BinaryIO

import blake3
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from eth_account import Account
from eth_account.messages import encode_typed_data
from eth_account.signers.local import LocalAccount
from eth_utils import to_checksum_address
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from dcml.client.wire.errors import DcmlError

FORMAT = "dcml-bundle/2"  # /2: BLAKE3 file and weights hashes (/1 had SHA-256; refused, re-seal)
MANIFEST_FILE = "manifest.json"
SEALED_SUFFIX = ".dcml"
MAGIC = b"DCMLSEAL"
VERSION = 1
KEY_LEN = 32
TAG_LEN = 16
NONCE_PREFIX_LEN = 7
DEFAULT_CHUNK_SIZE = 1 << 20  # 1 MiB: per-chunk Python overhead is negligible and memory stays small
IO_BLOCK = 8 << 20  # bytes read/hashed/written per call (whole chunks): fewer, larger BLAKE3 updates
MAX_CHUNK_SIZE = 64 << 20
_FIXED_HEADER = struct.Struct(">8sBI7s32sH")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx")

MANIFEST_DOMAIN = {"name": "dcml-model-bundle", "version": "2"}
MANIFEST_HASH_DOMAIN = b"dcml-manifest-v2"
WEIGHTS_HASH_DOMAIN = b"dcml-weights-v2"
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
        raise BundleError(BundleReason.MALFORMED, _format_message(m.format))
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


def _hasher() -> blake3.blake3:
    """BLAKE3 for bulk data: updates of IO_BLOCK bytes use every core (and release the GIL)."""
    return blake3.blake3(max_threads=blake3.blake3.AUTO)


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


Progress = Callable[[int], None]  # called with the number of clear bytes just processed


def _read_full(f: BinaryIO, view: memoryview) -> int:
    """Fill `view` from `f`; fewer bytes only at end of file."""
    n = 0
    while n < len(view):
        got = f.readinto(view[n:])
        if not got:
            break
        n += got
    return n


def _write_all(f: BinaryIO, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[f.write(view):]


def _at_eof() -> bool:
    return True


def _blocks(f: BinaryIO, size: int) -> Iterator[tuple[memoryview, Callable[[], bool]]]:
    """(block, is_last) of `size` bytes (the last may be shorter or empty; there is always one), read
    with `readinto` into two alternating buffers; a block stays valid until the next one is asked for.
    The next block is read on a worker thread (GIL-free) while the caller works on this one; `is_last()`
    waits for that read (it tells whether anything follows), so call it only for the block's last chunk."""
    bufs = (memoryview(bytearray(size)), memoryview(bytearray(size)))
    with ThreadPoolExecutor(1, thread_name_prefix="dcml-read") as pool:
        n, i = _read_full(f, bufs[0]), 0
        while True:
            current = bufs[i][:n]
            if n < size:
                yield current, _at_eof
                return
            i ^= 1
            ahead = pool.submit(_read_full, f, bufs[i])
            yield current, lambda ahead=ahead: ahead.result() == 0
            n = ahead.result()
            if n == 0:
                return


def _chunks_per_block(chunk_size: int) -> int:
    return max(1, IO_BLOCK // chunk_size)


def seal_file(src: str | Path, dst: str | Path, model_key: bytes, *, model_id: bytes, name: str,
              chunk_size: int = DEFAULT_CHUNK_SIZE, progress: Progress | None = None) -> FileEntry:
    """Seal `src` into `dst` in constant memory; return its manifest entry (clear and sealed hashes).

    Whole chunks are read, hashed, encrypted (into one reused buffer) and written IO_BLOCK at a time."""
    if len(model_key) != KEY_LEN or len(model_id) != 32:
        raise ValueError("model key and model id must be 32 bytes each")
    if not 0 < chunk_size <= MAX_CHUNK_SIZE:
        raise ValueError(f"chunk size must be in 1..{MAX_CHUNK_SIZE}")
    header = SealedHeader(chunk_size, os.urandom(NONCE_PREFIX_LEN), model_id, name)
    header_bytes = header.encode()
    cipher = _FileCipher(model_key, header_bytes, header.nonce_prefix)
    encrypt_into, aad = cipher.aead.encrypt_into, cipher.aad
    k = _chunks_per_block(chunk_size)
    outs = [memoryview(bytearray(k * (chunk_size + TAG_LEN))) for _ in range(2)]
    pending: list[tuple[Future, Future] | None] = [None, None]  # per output buffer: its hash and write
    clear_hash, sealed_hash = _hasher(), _hasher()
    size = counter = 0
    tmp = Path(str(dst) + ".part")
    # The main thread only runs AES-GCM (which holds the GIL); BLAKE3 (clear block, then sealed block, in
    # order) runs on a hash worker and writes on a write worker, both GIL-free, so they overlap the
    # encryption; the reader works a block ahead (`_blocks`). Two output buffers alternate: constant memory.
    hashing = ThreadPoolExecutor(1, thread_name_prefix="dcml-hash")
    writing = ThreadPoolExecutor(1, thread_name_prefix="dcml-write")
    try:
        with open(src, "rb", buffering=0) as fin, open(tmp, "wb", buffering=0) as fout:
            try:
                sealed_hash.update(header_bytes)
                _write_all(fout, header_bytes)
                for i, (block, last_block) in enumerate(_blocks(fin, k * chunk_size)):
                    clear_done = hashing.submit(clear_hash.update, block)
                    out, slot = outs[i & 1], i & 1
                    if pending[slot] is not None:
                        for fut in pending[slot]:
                            fut.result()  # that buffer is hashed and written: free again
                    chunks = max(1, -(-len(block) // chunk_size))
                    o = 0
                    for j in range(chunks):
                        piece = block[j * chunk_size:(j + 1) * chunk_size]
                        end = o + len(piece) + TAG_LEN
                        encrypt_into(cipher.nonce(counter, j == chunks - 1 and last_block()), piece, aad,
                                     out[o:end])
                        o, counter = end, counter + 1
                    pending[slot] = (hashing.submit(sealed_hash.update, out[:o]),
                                     writing.submit(_write_all, fout, out[:o]))
                    clear_done.result()  # the reader refills `block` once we ask for the next one
                    size += len(block)
                    if progress:
                        progress(len(block))
                for futs in pending:
                    for fut in futs or ():
                        fut.result()
            finally:
                hashing.shutdown(cancel_futures=True)
                writing.shutdown(cancel_futures=True)  # before the file closes
        tmp.replace(dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    rel = Path(dst).name
    return FileEntry(name=name, size=size, blake3=clear_hash.hexdigest(),
                     sealed=SealedInfo(path=rel, size=Path(dst).stat().st_size, blake3=sealed_hash.hexdigest()))


def open_sealed(path: str | Path, model_key: bytes, *, model_id: bytes, name: str,
                entry: FileEntry | None = None) -> Iterator[memoryview]:
    """Yield the clear pieces of a sealed file, checking every chunk as it goes.

    A piece is only valid until the next one is asked for (buffers are reused). The clear hash (against
    `entry`) is only checked after the last piece: consume the whole iterator before trusting or
    publishing what it produced (`decrypt_to_memory` / `decrypt_to_file` do).
    """
    return _open_sealed(path, model_key, model_id=model_id, name=name, entry=entry, dest=None)


def _open_sealed(path: str | Path, model_key: bytes, *, model_id: bytes, name: str, entry: FileEntry | None,
                 dest: memoryview | None) -> Iterator[memoryview]:
    """`open_sealed`; with `dest`, chunks are decrypted straight into it (no copy) and the yielded pieces
    are consecutive slices of it."""
    label = f"{name} ({path})"
    with open(path, "rb", buffering=0) as f:
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
        decrypt_into, aad = cipher.aead.decrypt_into, cipher.aad
        clear_hash = _hasher() if entry is not None else None
        chunk_size = header.chunk_size
        block = chunk_size + TAG_LEN
        k = _chunks_per_block(chunk_size)
        buf = memoryview(bytearray(k * chunk_size)) if dest is None else None
        size = counter = 0
        # With `dest`, BLAKE3 runs on a worker over finished slices of `dest` (stable memory) while the next
        # block is decrypted; into the reused `buf`, it must finish before the piece is handed out.
        overlap = clear_hash is not None and dest is not None
        hashing = ThreadPoolExecutor(1, thread_name_prefix="dcml-hash") if overlap else None
        try:
            for sealed, last_block in _blocks(f, k * block):
                chunks = max(1, -(-len(sealed) // block))
                start = size
                for j in range(chunks):
                    ct = sealed[j * block:(j + 1) * block]
                    if len(ct) < TAG_LEN:
                        raise BundleError(BundleReason.TRUNCATED, f"{label}: chunk {counter} is cut short")
                    n = len(ct) - TAG_LEN
                    if dest is None:
                        target = buf[size - start:size - start + n]
                    elif size + n > len(dest):
                        raise BundleError(BundleReason.HASH_MISMATCH, f"{name} is longer than the manifest says")
                    else:
                        target = dest[size:size + n]
                    last = j == chunks - 1 and last_block()
                    try:
                        decrypt_into(cipher.nonce(counter, last), ct, aad, target)
                    except InvalidTag:
                        raise _diagnose(cipher, ct, counter, last, label) from None
                    size, counter = size + n, counter + 1
                out = buf[:size - start] if dest is None else dest[start:size]
                if hashing is not None:
                    hashing.submit(clear_hash.update, out)
                elif clear_hash is not None:
                    clear_hash.update(out)
                yield out
            if entry is not None:
                if hashing is not None:
                    hashing.shutdown()  # waits for every update, in order
                digest = clear_hash.hexdigest()
                if size != entry.size or digest != entry.blake3:
                    raise BundleError(BundleReason.HASH_MISMATCH, f"{label} opened to {size} bytes with blake3 "
                                      f"{digest}, the manifest says {entry.size} bytes, {entry.blake3}")
        finally:
            if hashing is not None:
                hashing.shutdown(cancel_futures=True)


def _diagnose(cipher: _FileCipher, ct: bytes | memoryview, counter: int, last: bool, label: str) -> BundleError:
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


try:  # CPython: with a NULL source the buffer is left uninitialized (big ones come untouched from mmap)
    _new_bytearray = ctypes.PYFUNCTYPE(ctypes.py_object, ctypes.c_void_p, ctypes.c_ssize_t)(
        ("PyByteArray_FromStringAndSize", ctypes.pythonapi))
except (AttributeError, TypeError):  # not CPython
    _new_bytearray = None


def _uninitialized_bytearray(n: int) -> bytearray:
    """A bytearray of `n` bytes, not zeroed: `bytearray(n)` memsets it, touching every page once before
    decryption touches it again (~40 % of decrypt_to_memory's time on 256 MiB). The caller must
    overwrite all of it (or zero it) before anyone sees it."""
    if _new_bytearray is None or n < IO_BLOCK:
        return bytearray(n)
    out = _new_bytearray(None, n)
    assert type(out) is bytearray and len(out) == n
    return out


def decrypt_to_memory(bundle_dir: str | Path, manifest: Manifest, entry: FileEntry, model_key: bytes,
                      progress: Progress | None = None) -> bytearray:
    """Open one sealed file into a fresh buffer (its clear hash checked). Nothing touches disk.

    Chunks are decrypted straight into the result and hashed there: no intermediate copies."""
    assert entry.sealed is not None
    out = _uninitialized_bytearray(entry.size)
    try:
        for piece in _open_sealed(safe_join(bundle_dir, entry.sealed.path), model_key, model_id=manifest.model_id_bytes,
                                  name=entry.name, entry=entry, dest=memoryview(out)):
            if progress:
                progress(len(piece))
    except BaseException:
        zeros = bytes(min(len(out), IO_BLOCK))  # don't leave partial clear weights lying around in freed memory
        for i in range(0, len(out), IO_BLOCK):
            out[i:i + IO_BLOCK] = zeros[:len(out) - i]
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
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "wb", buffering=0) as f:
            for piece in open_sealed(safe_join(bundle_dir, entry.sealed.path), model_key,
                                     model_id=manifest.model_id_bytes, name=entry.name, entry=entry):
                _write_all(f, piece)
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
            entries.append(FileEntry(name=name, size=len(data), blake3=blake3_hex(data)))
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


def read_clear_files(bundle_dir: str | Path, manifest: Manifest) -> dict[str, bytes]:
    """The clear files (config, tokenizer, templates) as verified bytes, each read once: hand these bytes,
    not the directory, to whatever loads them, so a file swapped after the check (or one the manifest does
    not list) is never used."""
    out: dict[str, bytes] = {}
    for entry in manifest.files:
        if entry.sealed is not None:
            continue
        path = safe_join(bundle_dir, entry.name)
        try:
            data = path.read_bytes()
        except FileNotFoundError as exc:
            raise BundleError(BundleReason.TRUNCATED, f"{path} is missing from the bundle") from exc
        if blake3_hex(data) != entry.blake3:
            raise BundleError(BundleReason.HASH_MISMATCH, f"{path} differs from the manifest: the bundle was "
                              "altered; fetch it again")
        out[entry.name] = data
    return out


def verify_clear_files(bundle_dir: str | Path, manifest: Manifest) -> None:
    """Check the clear files (config, tokenizer) against the manifest: they steer the model too."""
    read_clear_files(bundle_dir, manifest)


def write_clear_files(files: dict[str, bytes], out_dir: str | Path) -> None:
    """Write verified clear files under `out_dir` (checked names only, never outside it)."""
    for name, data in files.items():
        dst = safe_join(out_dir, name)
        dst.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)


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
