"""Sealed bundles: byte-identical round trip, and every tampering detected with a clear error."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from dcml.client.chain.model_registry import model_id
from dcml.client.publisher.bundle import (
    TAG_LEN,
    BundleError,
    BundleReason,
    SealedHeader,
    decrypt_model,
    generate_key,
    load_manifest,
    open_sealed,
    verify_manifest,
)
from tests.model_helpers import MODEL_ID, PUBLISHER, make_bundle

CHUNK = 1 << 16


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return make_bundle(tmp_path_factory.mktemp("bundle"), CHUNK)


@pytest.fixture
def copy(bundle, tmp_path) -> Path:
    shutil.copytree(bundle[1], tmp_path / "b")
    return tmp_path / "b"


def _open(bundle_dir: Path, key: bytes) -> None:
    decrypt_model(bundle_dir, key, publisher=PUBLISHER.address)


def _sealed(bundle_dir: Path, i: int = 0) -> tuple[Path, int]:
    entry = load_manifest(bundle_dir).manifest.sealed_files[i]
    path = bundle_dir / entry.sealed.path
    with open(path, "rb") as f:
        _, header = SealedHeader.read(f)
    return path, len(header)


def test_round_trip_is_byte_identical_for_every_file(bundle):
    clear, bundle_dir, key, signed = bundle
    manifest, weights = decrypt_model(bundle_dir, key, publisher=PUBLISHER.address,
                                      manifest_hash=signed.manifest_hash)
    assert sorted(weights) == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    for name, data in weights.items():
        assert bytes(data) == (clear / name).read_bytes()
        assert (bundle_dir / (name + ".dcml")).read_bytes()[:8] == b"DCMLSEAL"
        assert not (bundle_dir / name).exists()  # no clear weights in the bundle
    assert (bundle_dir / "config.json").read_bytes() == (clear / "config.json").read_bytes()
    assert manifest.model_id == "0x" + MODEL_ID.hex()
    assert any(f.size > 4 * CHUNK for f in manifest.sealed_files)  # many chunks per file


def test_flipped_byte_is_detected(bundle, copy):
    path, header_len = _sealed(copy)
    data = bytearray(path.read_bytes())
    data[header_len + CHUNK + 100] ^= 1
    path.write_bytes(data)
    with pytest.raises(BundleError, match="chunk 1 does not authenticate") as e:
        _open(copy, bundle[2])
    assert e.value.reason == BundleReason.TAMPERED


@pytest.mark.parametrize("cut", ["boundary", "middle"])
def test_truncated_file_is_detected(bundle, copy, cut):
    path, header_len = _sealed(copy)
    data = path.read_bytes()
    end = header_len + 2 * (CHUNK + TAG_LEN) if cut == "boundary" else len(data) - 1000
    path.write_bytes(data[:end])
    with pytest.raises(BundleError, match=r"truncated|cut short") as e:
        _open(copy, bundle[2])
    assert e.value.reason == BundleReason.TRUNCATED
    # Without the manifest's size the STREAM last-chunk flag still tells truncation from tampering.
    entry = load_manifest(copy).manifest.sealed_files[0]
    with pytest.raises(BundleError) as e:
        list(open_sealed(path, bundle[2], model_id=MODEL_ID, name=entry.name))
    assert e.value.reason == (BundleReason.TRUNCATED if cut == "boundary" else BundleReason.TAMPERED)


def test_swapped_chunks_are_detected(bundle, copy):
    path, header_len = _sealed(copy)
    data = bytearray(path.read_bytes())
    block = CHUNK + TAG_LEN
    a, b = header_len, header_len + block
    data[a:a + block], data[b:b + block] = data[b:b + block], data[a:a + block]
    path.write_bytes(data)
    with pytest.raises(BundleError, match="chunk 0 does not authenticate") as e:
        _open(copy, bundle[2])
    assert e.value.reason == BundleReason.TAMPERED


def test_swapped_files_are_detected(bundle, copy):
    p1, _ = _sealed(copy, 0)
    p2, _ = _sealed(copy, 1)
    d1, d2 = p1.read_bytes(), p2.read_bytes()
    p1.write_bytes(d2)
    p2.write_bytes(d1)
    with pytest.raises(BundleError, match="files were swapped") as e:
        _open(copy, bundle[2])
    assert e.value.reason == BundleReason.WRONG_FILE


def test_relabelled_bundle_is_detected(bundle, copy):
    other = model_id("someone-elses-model")
    path, _ = _sealed(copy)
    data = bytearray(path.read_bytes())
    data[20:52] = other  # header: magic 8, version 1, chunk 4, prefix 7, then the model id
    path.write_bytes(data)
    entry = load_manifest(copy).manifest.sealed_files[0]
    # Opened as the model it claims to be: the header is authenticated, so the relabel shows.
    with pytest.raises(BundleError, match="does not authenticate") as e:
        list(open_sealed(path, bundle[2], model_id=other, name=entry.name))
    assert e.value.reason == BundleReason.TAMPERED
    # Opened as the expected model: named as another model's file.
    with pytest.raises(BundleError, match="relabelled") as e:
        _open(copy, bundle[2])
    assert e.value.reason == BundleReason.WRONG_MODEL
    # Relabelling the manifest breaks the publisher's signature.
    manifest_path = copy / "manifest.json"
    manifest_path.write_text(manifest_path.read_text().replace(MODEL_ID.hex(), other.hex()))
    with pytest.raises(BundleError, match="altered") as e:
        verify_manifest(load_manifest(copy))
    assert e.value.reason == BundleReason.BAD_SIGNATURE


def test_altered_clear_file_and_wrong_key_are_detected(bundle, copy):
    with pytest.raises(BundleError) as e:
        _open(copy, generate_key())
    assert e.value.reason == BundleReason.WRONG_KEY
    (copy / "tokenizer_config.json").write_text("{}")
    with pytest.raises(BundleError) as e:
        _open(copy, bundle[2])
    assert e.value.reason == BundleReason.HASH_MISMATCH


def test_manifest_from_another_publisher_or_release_is_refused(bundle):
    signed = load_manifest(bundle[1])
    with pytest.raises(BundleError, match="expected publisher"):
        verify_manifest(signed, publisher="0x" + "11" * 20)
    with pytest.raises(BundleError, match="another release"):
        verify_manifest(signed, manifest_hash=bytes(32))


def test_version_1_manifest_is_refused_clearly(bundle, copy):
    """dcml-bundle/1 manifests (SHA-256 `sha256` fields) are refused up front, with what to do."""
    manifest_path = copy / "manifest.json"
    manifest_path.write_text(manifest_path.read_text().replace('"dcml-bundle/2"', '"dcml-bundle/1"')
                             .replace('"blake3"', '"sha256"'))
    with pytest.raises(BundleError, match=r"'dcml-bundle/1' is not 'dcml-bundle/2'.*re-seal") as e:
        load_manifest(copy)
    assert e.value.reason == BundleReason.MALFORMED
    with pytest.raises(BundleError, match="re-seal"):
        _open(copy, bundle[2])


def test_manifest_hashes_are_plain_blake3(bundle):
    """File hashes are plain BLAKE3 (b3sum-compatible) of the clear and sealed bytes; weights_hash commits to them."""
    import blake3

    from dcml.client.publisher.bundle import weights_hash

    clear, bundle_dir, _, signed = bundle
    m = signed.manifest
    assert m.format == "dcml-bundle/2"
    for f in m.files:
        assert f.blake3 == blake3.blake3((clear / f.name).read_bytes()).hexdigest()
        if f.sealed is not None:
            assert f.sealed.blake3 == blake3.blake3((bundle_dir / f.sealed.path).read_bytes()).hexdigest()
    assert m.weights_hash == "0x" + weights_hash(m.files).hex()
    expected = blake3.blake3(b"dcml-weights-v2")
    for f in sorted(m.sealed_files, key=lambda f: f.name):
        expected.update(f.name.encode() + b"\0" + bytes.fromhex(f.blake3))
    assert m.weights_hash == "0x" + expected.hexdigest()


@pytest.mark.parametrize("size", [0, 1, 4096, 4096 * 3, 4096 * 3 + 5, 4096 * 6, 4096 * 6 + 1, 4096 * 13 - 1])
def test_chunk_and_block_boundaries_round_trip(tmp_path, monkeypatch, size):
    """Sealing/opening work IO_BLOCK (here 3 chunks) at a time; every edge still round-trips and truncation
    at a block boundary is still caught by the STREAM last flag."""
    import os

    import dcml.client.publisher.bundle as mb
    import dcml.client.publisher.sealed as sealed_format

    monkeypatch.setattr(sealed_format, "IO_BLOCK", 3 * 4096)
    data = os.urandom(size)
    (tmp_path / "w.bin").write_bytes(data)
    key = generate_key()
    entry = mb.seal_file(tmp_path / "w.bin", tmp_path / "w.bin.dcml", key, model_id=MODEL_ID, name="w.bin",
                         chunk_size=4096)
    assert entry.sealed.size == mb.sealed_size(size, 4096, "w.bin") == (tmp_path / "w.bin.dcml").stat().st_size
    manifest = mb.Manifest(model_id="0x" + MODEL_ID.hex(), model_name="t", publisher=PUBLISHER.address,
                           chunk_size=4096, created_at=0, key_commitment="", weights_hash="", files=[entry])
    assert bytes(mb.decrypt_to_memory(tmp_path, manifest, entry, key)) == data
    mb.decrypt_to_file(tmp_path, manifest, entry, key, tmp_path / "out" / "w.bin")
    assert (tmp_path / "out" / "w.bin").read_bytes() == data
    pieces = b"".join(bytes(p) for p in open_sealed(tmp_path / "w.bin.dcml", key, model_id=MODEL_ID, name="w.bin",
                                                       entry=entry))
    assert pieces == data
    if size > 3 * 4096:  # cut after the first block: three whole chunks, none of them the last
        sealed = tmp_path / "w.bin.dcml"
        with open(sealed, "rb") as f:
            _, header = SealedHeader.read(f)
        sealed.write_bytes(sealed.read_bytes()[:len(header) + 3 * (4096 + TAG_LEN)])
        with pytest.raises(BundleError) as e:
            list(open_sealed(sealed, key, model_id=MODEL_ID, name="w.bin"))
        assert e.value.reason == BundleReason.TRUNCATED
