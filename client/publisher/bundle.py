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

The parts live beside this module: `manifest` (the manifest, its signature and checks) and `sealed` (the
sealed file format); this one seals and opens whole bundles, and every name is importable from here.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from eth_account.signers.local import LocalAccount

from dcml.client.publisher.manifest import (
    FORMAT,
    KEY_LEN,
    MANIFEST,
    MANIFEST_DOMAIN,
    MANIFEST_EIP712_DOMAIN,
    MANIFEST_FILE,
    MANIFEST_TYPES,
    SEALED_SUFFIX,
    BundleError,
    BundleReason,
    FileEntry,
    Manifest,
    SealedInfo,
    SignedManifest,
    blake3_hex,
    check_key,
    check_names,
    key_commitment,
    load_manifest,
    manifest_signing_digest,
    manifest_typed_data,
    safe_join,
    sign_manifest,
    verify_manifest,
    weights_hash,
)
from dcml.client.publisher.sealed import (
    DEFAULT_CHUNK_SIZE,
    TAG_LEN,
    Progress,
    SealedHeader,
    decrypt_to_file,
    decrypt_to_memory,
    open_sealed,
    seal_file,
    sealed_size,
)

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx")


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
            assert entry.sealed is not None  # seal_file always describes the sealed file
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


__all__ = [  # callers import the bundle's names from here, wherever they are defined
    "DEFAULT_CHUNK_SIZE", "FORMAT", "KEY_LEN", "MANIFEST", "MANIFEST_DOMAIN", "MANIFEST_EIP712_DOMAIN",
    "MANIFEST_FILE", "MANIFEST_TYPES", "SEALED_SUFFIX", "TAG_LEN", "WEIGHT_SUFFIXES", "BundleError", "BundleReason",
    "FileEntry", "Manifest", "Progress", "SealedHeader", "SealedInfo", "SignedManifest", "blake3_hex", "check_key",
    "check_names", "decrypt_model", "decrypt_to_file", "decrypt_to_memory", "encrypt_model", "generate_key",
    "is_weight_file", "key_commitment", "load_manifest", "manifest_signing_digest", "manifest_typed_data",
    "model_size", "open_sealed", "read_clear_files", "safe_join", "seal_file", "sealed_size", "sign_manifest",
    "verify_clear_files", "verify_manifest", "weights_hash", "write_clear_files",
]
