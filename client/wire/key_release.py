"""A model key released by a publisher's key broker to one attested enclave: the HPKE sealing both sides apply.

The key is sealed with HPKE (`dcml.client.wire.identity.HPKE_SUITE`) to the attested HPKE key, with
``info = b"dcml-model-key-v1" || model_id || nonce``; the broker's /key answer carries it as base64.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

from dcml.client.wire.identity import HPKE_SUITE, hpke_public_key_from_bytes

KEY_INFO = b"dcml-model-key-v1"

__all__ = ["KEY_INFO", "decode_release", "open_model_key", "seal_model_key"]


def _info(model_id: bytes, nonce: bytes) -> bytes:
    return KEY_INFO + model_id + nonce


def seal_model_key(model_key: bytes, hpke_public_key: bytes, *, model_id: bytes, nonce: bytes) -> bytes:
    return HPKE_SUITE.encrypt(model_key, hpke_public_key_from_bytes(hpke_public_key), info=_info(model_id, nonce))


def open_model_key(sealed: bytes, hpke_private_key: Any, *, model_id: bytes, nonce: bytes) -> bytes:
    """Open a released key inside the enclave; raises ValueError if it was sealed to another key/request."""
    try:
        return HPKE_SUITE.decrypt(sealed, hpke_private_key, info=_info(model_id, nonce))
    except Exception as exc:  # InvalidTag or ValueError depending on where HPKE fails
        raise ValueError("the sealed model key does not open with this enclave's HPKE key (sealed to another "
                         "key, or for another model or nonce)") from exc


def decode_release(body: dict[str, Any]) -> tuple[bytes, str]:
    """(sealed key, kid) from a /key response body."""
    try:
        return base64.b64decode(body["sealed_key"], validate=True), str(body["kid"])
    except (KeyError, TypeError, binascii.Error) as exc:
        raise ValueError(f"key broker answered something that is not a key release: {exc}") from exc
