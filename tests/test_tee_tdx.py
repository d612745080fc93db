"""The configfs-tsm provider against a temp dir laid out like /sys/kernel/config/tsm/report.

A plain directory cannot react to writes, so FakeTsmKernel subclasses the provider's ConfigfsOps to do
what the kernel does: mkdir creates the attribute files, writing inblob bumps `generation` and makes
`outblob` (the real vector quote with our report_data spliced in: it parses, but its Intel signature no
longer verifies, as it must), rmdir drops the attributes. The provider code under test is unchanged.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dcml.client.attestation.measurements import parse_tdx_quote
from dcml.client.attestation.verify import AttestationError, Policy, Reason, verify_attestation
from dcml.client.demo.kit.vectors import TDX, collateral, tdx_quote, ts
from dcml.node.identity import EnclaveIdentity
from dcml.node.tee.base import TeeError
from dcml.node.tee.document import build_attestation_document
from dcml.node.tee.tdx import ConfigfsOps, TdxProvider


class FakeTsmKernel(ConfigfsOps):
    def __init__(self, provider: str = "tdx_guest", extra_writers: int = 0) -> None:
        self.provider = provider
        self.extra_writers = extra_writers  # simulate another process writing inblob concurrently
        self.inblobs: list[bytes] = []
        self.template = tdx_quote("tdx_quote")

    def mkdir(self, path: Path) -> None:
        super().mkdir(path)
        (path / "provider").write_text(self.provider + "\n")
        (path / "generation").write_text("0\n")

    def write(self, path: Path, data: bytes) -> None:
        super().write(path, data)
        if path.name == "inblob":
            self.inblobs.append(data)
            gen = int((path.parent / "generation").read_text()) + 1 + self.extra_writers
            (path.parent / "generation").write_text(f"{gen}\n")
            quote = bytearray(self.template)
            quote[48 + 520 : 48 + 584] = data
            (path.parent / "outblob").write_bytes(bytes(quote))

    def rmdir(self, path: Path) -> None:
        for child in path.iterdir():
            child.unlink()
        super().rmdir(path)


def test_quote_through_configfs(tmp_path):
    kernel = FakeTsmKernel()
    provider = TdxProvider(root=tmp_path, ops=kernel)
    rd = os.urandom(64)
    evidence = provider.quote(rd)
    assert kernel.inblobs == [rd]
    assert parse_tdx_quote(evidence.quote).report_data == rd
    assert evidence.event_log is None and evidence.extra["provider"] == "tdx_guest"
    assert list(tmp_path.iterdir()) == []  # the report entry was removed


def test_document_from_tdx_provider_binds_identity_but_fake_quote_fails_dcap(tmp_path):
    identity = EnclaveIdentity.generate()
    nonce = os.urandom(32)
    doc = build_attestation_document(identity, TdxProvider(tmp_path, FakeTsmKernel()), nonce, node_version="t")
    assert doc.tee_type == "tdx" and doc.report_data == identity.report_data(nonce).hex()
    with pytest.raises(AttestationError) as err:  # spliced report_data breaks Intel's signature
        verify_attestation(doc, nonce=nonce, policy=Policy(), collateral=collateral(TDX / "tdx_quote_collateral.json"),
                           now=ts("2025-06-20T10:16:03Z"))
    assert err.value.reason is Reason.QUOTE_INVALID


def test_concurrent_writer_detected(tmp_path):
    provider = TdxProvider(tmp_path, FakeTsmKernel(extra_writers=1))
    with pytest.raises(TeeError, match="concurrently"):
        provider.quote(bytes(64))
    assert list(tmp_path.iterdir()) == []


def test_wrong_tsm_provider(tmp_path):
    with pytest.raises(TeeError, match="not tdx_guest"):
        TdxProvider(tmp_path, FakeTsmKernel(provider="sev_guest")).quote(bytes(64))


def test_missing_configfs_and_bad_report_data(tmp_path):
    with pytest.raises(TeeError, match="configfs-tsm"):
        TdxProvider(tmp_path / "absent")
    with pytest.raises(ValueError, match="64"):
        TdxProvider(tmp_path, FakeTsmKernel()).quote(bytes(32))
