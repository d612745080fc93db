"""The sealed file format of a bundle (see bundle.py's doc): a header, then AES-256-GCM chunks in the STREAM
construction, sealed and opened in constant memory with reading, hashing and writing overlapped."""

from __future__ import annotations

import ctypes
import functools
import hashlib
import hmac
import io
import os
import struct
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import blake3
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from dcml.client.publisher.manifest import (
    KEY_LEN,
    MAX_CHUNK_SIZE,
    BundleError,
    BundleReason,
    FileEntry,
    Manifest,
    SealedInfo,
    safe_join,
)

MAGIC = b"DCMLSEAL"
VERSION = 1
TAG_LEN = 16
NONCE_PREFIX_LEN = 7
DEFAULT_CHUNK_SIZE = 1 << 20  # 1 MiB: per-chunk Python overhead is negligible and memory stays small
IO_BLOCK = 8 << 20  # bytes read/hashed/written per call (whole chunks): fewer, larger BLAKE3 updates
_FIXED_HEADER = struct.Struct(">8sBI7s32sH")


def _hasher() -> blake3.blake3:
    """BLAKE3 for bulk data: updates of IO_BLOCK bytes use every core (and release the GIL)."""
    return blake3.blake3(max_threads=blake3.blake3.AUTO)


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


def _read_full(f: io.RawIOBase, view: memoryview) -> int:
    """Fill `view` from `f`; fewer bytes only at end of file."""
    n = 0
    while n < len(view):
        got = f.readinto(view[n:])  # None only for a non-blocking file, which bundle files never are
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


def _read_nothing(read: Future[int]) -> bool:
    return read.result() == 0


def _blocks(f: io.RawIOBase, size: int) -> Iterator[tuple[memoryview, Callable[[], bool]]]:
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
            yield current, functools.partial(_read_nothing, ahead)
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
                    for fut in pending[slot] or ():
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
        # Without `dest`, one buffer is reused for each block (its pieces restart at offset 0).
        view = memoryview(bytearray(k * chunk_size)) if dest is None else dest
        size = counter = 0
        # With `dest`, BLAKE3 runs on a worker over finished slices of `dest` (stable memory) while the next
        # block is decrypted; into the reused `buf`, it must finish before the piece is handed out.
        overlap = clear_hash is not None and dest is not None
        hashing = ThreadPoolExecutor(1, thread_name_prefix="dcml-hash") if overlap else None
        try:
            for sealed, last_block in _blocks(f, k * block):
                chunks = max(1, -(-len(sealed) // block))
                start = size
                base = start if dest is None else 0  # offset of this block's first byte in `view`
                for j in range(chunks):
                    ct = sealed[j * block:(j + 1) * block]
                    if len(ct) < TAG_LEN:
                        raise BundleError(BundleReason.TRUNCATED, f"{label}: chunk {counter} is cut short")
                    n = len(ct) - TAG_LEN
                    if size - base + n > len(view):  # only `dest` can be too short: the manifest lied
                        raise BundleError(BundleReason.HASH_MISMATCH, f"{name} is longer than the manifest says")
                    target = view[size - base:size - base + n]
                    last = j == chunks - 1 and last_block()
                    try:
                        decrypt_into(cipher.nonce(counter, last), ct, aad, target)
                    except InvalidTag:
                        raise _diagnose(cipher, ct, counter, last, label) from None
                    size, counter = size + n, counter + 1
                out = view[start - base:size - base]
                if clear_hash is not None and hashing is not None:
                    hashing.submit(clear_hash.update, out)
                elif clear_hash is not None:
                    clear_hash.update(out)
                yield out
            if entry is not None and clear_hash is not None:
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


_new_bytearray: Callable[[None, int], bytearray] | None
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

