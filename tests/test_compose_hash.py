"""The composes docker/ ships: their hash, computed as dstack computes it, is what configs/policy.toml allows,
and the dstack verifier accepts a quote whose mr_config_id is 0x01 || that hash and refuses any other."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from dstack_sdk import get_compose_hash

from dcml.client.attestation.measurements import EventLogEntry, parse_tdx_quote, replay_rtmrs, runtime_event_digest
from dcml.client.attestation.verify import AttestationDocument, AttestationError, Policy, Reason, _verify_dstack
from dcml.node.identity import EnclaveIdentity
from dcml.node.tee.compose import compose_hash, mr_config_id, render

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "docker").glob("app-compose.*.json"))
POLICY = Policy.load(ROOT / "configs" / "policy.toml")
VECTOR = Path("/work/shared/vectors/dstack/app_info.json")


def test_repository_ships_the_cpu_compose_and_allows_exactly_the_shipped_hashes() -> None:
    assert ROOT / "docker" / "app-compose.cpu.json" in SHIPPED
    assert sorted(POLICY.dstack.compose_hashes) == sorted(compose_hash(p.read_bytes()).hex() for p in SHIPPED)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_compose_pins_every_image_by_digest_and_is_dstack_canonical(path: Path) -> None:
    data = path.read_bytes()
    app = json.loads(data)
    assert "{{" not in app["docker_compose_file"] and "<digest>" not in app["docker_compose_file"]
    images = [line.split("image:", 1)[1].strip() for line in app["docker_compose_file"].splitlines()
              if line.strip().startswith("image:")]
    assert images and all("@sha256:" in ref and len(ref.split("@sha256:")[1]) == 64 for ref in images)
    # dstack-sdk's own hash of the content equals the file hash: the file is in its deterministic form.
    assert get_compose_hash(app) == compose_hash(data).hex()


def test_compose_hash_matches_dstack_on_the_real_vector() -> None:
    info = json.loads(VECTOR.read_text())
    app_compose = info["tcb_info"]["app_compose"].encode()
    assert compose_hash(app_compose).hex() == info["compose_hash"]
    assert mr_config_id(app_compose) == (b"\x01" + bytes.fromhex(info["compose_hash"])).ljust(48, b"\0")


def test_cli_prints_the_hash_and_mr_config_id(tmp_path: Path) -> None:
    f = tmp_path / "app-compose.json"
    f.write_text(json.loads(VECTOR.read_text())["tcb_info"]["app_compose"])
    out = subprocess.run([sys.executable, "-m", "dcml.node.cli", "compose-hash", str(f)], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout
    want = json.loads(VECTOR.read_text())["compose_hash"]
    assert out.split()[0] == want and f"mr_config_id=01{want}" in out


def test_render_refuses_images_not_pinned_by_digest() -> None:
    with pytest.raises(ValueError, match="not pinned by digest"):
        render("image: {{NODE_IMAGE}}", {"NODE_IMAGE": "ghcr.io/x/dcml-node:latest"}, "x")
    with pytest.raises(ValueError, match="no image given"):
        render("image: {{NODE_IMAGE}}\nimage: {{VLLM_IMAGE}}", {"NODE_IMAGE": "a/b@sha256:" + "0" * 64}, "x")


def _dstack_quote(app_compose: bytes, config_id: bytes) -> tuple[bytes, list[EventLogEntry]]:
    """A TDX-shaped quote whose RTMR3 and MRCONFIGID are what a dstack CVM running `app_compose` reports.

    The Intel signature chain is not what this test is about (the dstack vector tests cover it): the quote
    goes straight to the dstack checks, which read mr_config_id, replay the event log and match the policy.
    """
    h = compose_hash(app_compose)
    events = [EventLogEntry(imr=3, event_type=0x08000001, event=name, event_payload=payload.hex(),
                            digest=runtime_event_digest(0x08000001, name, payload).hex())
              for name, payload in (("app-id", b"\x11" * 20), ("compose-hash", h), ("instance-id", b"\x22" * 20))]
    rtmrs = replay_rtmrs(events)
    body = bytearray(584)
    body[184:232] = config_id
    for i, r in enumerate(rtmrs):
        body[328 + 48 * i: 376 + 48 * i] = r
    header = struct.pack("<HHIHH", 4, 2, 0x81, 0, 0) + b"\0" * 36
    signed = header + bytes(body)
    return signed + struct.pack("<I", 0), events


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_verifier_accepts_the_shipped_compose_and_refuses_another_mr_config_id(path: Path) -> None:
    app_compose = path.read_bytes()
    ident = EnclaveIdentity.from_seed(b"compose".ljust(32, b"\0"))

    def doc(events: list[EventLogEntry], quote: bytes) -> AttestationDocument:
        return AttestationDocument(
            tee_type="dstack", quote=quote.hex(), signing_address=ident.address,
            hpke_public_key=ident.hpke_public_bytes().hex(), nonce="00" * 32, report_data="00" * 64,
            node_version="test", event_log=events, measurements=parse_tdx_quote(quote).measurements(),
            app_info={"compose_hash": compose_hash(app_compose).hex(),
                      "tcb_info": {"app_compose": app_compose.decode()}})

    quote, events = _dstack_quote(app_compose, mr_config_id(app_compose))
    assert _verify_dstack(doc(events, quote), parse_tdx_quote(quote), POLICY) == compose_hash(app_compose).hex()

    other = (b"\x01" + bytes(32)).ljust(48, b"\0")
    quote, events = _dstack_quote(app_compose, other)
    with pytest.raises(AttestationError) as err:
        _verify_dstack(doc(events, quote), parse_tdx_quote(quote), POLICY)
    assert err.value.reason == Reason.COMPOSE_HASH_MISMATCH

    # Another compose (one byte more): measured consistently, but not allow-listed.
    changed = app_compose + b" "
    quote, events = _dstack_quote(changed, mr_config_id(changed))
    with pytest.raises(AttestationError) as err:
        _verify_dstack(doc(events, quote).model_copy(update={"app_info": None}), parse_tdx_quote(quote), POLICY)
    assert err.value.reason == Reason.COMPOSE_HASH_NOT_ALLOWED
