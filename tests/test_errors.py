"""The one error model: every error class has the root and a reason, the protocols' reason enums are defined once,
and every error the node answers has the same JSON shape with the reason as `code` (issue 11, deliverable 3)."""

from __future__ import annotations

import ast
import importlib
import inspect
import json
import pkgutil
from pathlib import Path

import httpx
import pytest

import dcml.client
import dcml.node
from dcml.client.demo.kit.nodes import MODEL, start_paid_node
from dcml.client.wire import errors
from dcml.client.wire.errors import DcmlError, ErrorType, PaymentError, PaymentReason, read_error

# Control flow inside one module, never raised past it.
# Optional extras whose modules cannot import on a base install (libp2p, vLLM).
_OPTIONAL = ("libp2p", "trio", "multiaddr", "vllm", "x402")


def _modules() -> list:
    out = []
    for pkg in (dcml.client, dcml.node):
        for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
            if info.name.endswith("__main__"):
                continue
            try:
                out.append(importlib.import_module(info.name))
            except ImportError as exc:
                if not any(name in str(exc) for name in _OPTIONAL):
                    raise
    return out


def test_every_error_class_has_the_root_and_a_reason() -> None:
    found = []
    for module in _modules():
        for name, cls in vars(module).items():
            if inspect.isclass(cls) and issubclass(cls, BaseException) and cls.__module__ == module.__name__:
                found.append(cls)
                assert issubclass(cls, DcmlError), f"{module.__name__}.{name} does not subclass DcmlError"
                assert isinstance(cls.reason, str) and cls.reason, name
    assert len(found) >= 50  # the payments, attestation, receipts, chain, engine, API ... errors


def test_each_protocol_enum_is_defined_once_and_shared() -> None:
    from dcml.client.attestation import gpu, verify
    from dcml.client.sdk import payer
    from dcml.client.wire import receipts

    assert verify.Reason is errors.AttestationReason and gpu.GpuReason is errors.GpuReason
    assert receipts.ReceiptReason is errors.ReceiptReason
    assert set(PaymentReason) >= payer._DEAD_CHANNEL
    assert all(isinstance(r, errors.ReceiptReason) for r in payer._SIGNED_FOR_THE_REQUEST)


def test_an_error_carries_its_reason_on_the_wire() -> None:
    from dcml.client.attestation.verify import AttestationError, Reason
    from dcml.node.payments.verifier import VoucherRejected

    exc = AttestationError(Reason.NOT_TDX, "the quote is not a TDX quote")
    assert str(exc) == "not_tdx: the quote is not a TDX quote" and exc.reason is Reason.NOT_TDX
    assert exc.to_wire() == {"error": {"message": "the quote is not a TDX quote", "type": "attestation_error",
                                       "param": None, "code": "not_tdx"}}
    rejected = VoucherRejected(PaymentReason.EXCEEDS_DEPOSIT, "top up first")
    assert isinstance(rejected, PaymentError) and rejected.to_wire()["error"]["code"] == "exceeds_deposit"


# Where the node and the SDK name a payment reason by its string: each must be a PaymentReason value.
_PAYMENT_RAISERS = {"needed", "VoucherRejected", "LedgerConflict", "payment_error", "PaymentRejected"}


def test_every_payment_code_the_code_writes_is_a_payment_reason() -> None:
    root = Path(dcml.node.__file__).parent
    sources = [*sorted((root / "payments").glob("*.py")), Path(dcml.client.__file__).parent / "sdk" / "client.py"]
    codes = set()
    for path in sources:
        for call in ast.walk(ast.parse(path.read_text())):
            if not isinstance(call, ast.Call):
                continue
            name = getattr(call.func, "id", None) or getattr(call.func, "attr", None)
            args = [a for a in call.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
            if name in _PAYMENT_RAISERS and args and call.args[0] is args[0]:
                codes.add(args[0].value)
    assert len(codes) >= 15
    assert codes <= set(PaymentReason), codes - set(PaymentReason)


@pytest.mark.parametrize("body", [
    b"", b"\xff\xfe", b"null", b"[]", b'{"error": "text"}', b'{"error": []}', b"[" * 100_000 + b"]" * 100_000,
    b'{"error": {"code": 7}}', json.dumps({"error": {"message": "m" * 1_000_000}}).encode(),
])
def test_reading_a_hostile_error_body_never_raises(body: bytes) -> None:
    code, message = read_error(body, "rejected")
    assert code in ("rejected", "7") and (message is None or isinstance(message, str))


@pytest.fixture
def node(w3, deployment, tmp_path):
    path = tmp_path / "deployment.json"
    deployment.save(path)
    paid = start_paid_node(w3, path, tmp_path / "node")
    yield paid
    paid.server.stop()


def test_every_node_error_has_the_one_shape_with_the_reason_as_code(node) -> None:
    """Payment errors came in three shapes (the gate's 402, the voucher endpoint, the timeout event): one now."""
    http = httpx.Client(base_url=node.url, timeout=30)
    answers = {
        "payment_required": http.post("/v1/completions", json={"model": MODEL, "prompt": "a", "max_tokens": 2}),
        "malformed": http.post("/v1/payments/vouchers", content=b"{not json"),
        "unknown_channel": http.post("/v1/payments/vouchers", json={
            "channelId": "0x" + "ab" * 32, "cumulativeAmount": "1", "signature": "0x" + "11" * 64 + "1b"}),
        "auth_required": http.get("/v1/payments/channels/0x" + "ab" * 32),
        "not_found": http.get("/v1/no-such-route"),
        "invalid_request": http.post("/v1/completions", json={"model": MODEL, "prompt": 5}),
    }
    for code, r in answers.items():
        assert r.status_code >= 400, (code, r.text)
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"], r.text
        assert err["code"] == code and err["type"] in set(ErrorType), r.text
        if code in set(PaymentReason):
            assert err["type"] == ErrorType.PAYMENT, r.text
        assert read_error(r.content) == (code, err["message"])
