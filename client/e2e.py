"""End-to-end sealed requests and responses: prompts readable only inside the attested enclave.

Request (client → enclave). ``POST`` the usual OpenAI path with ``Content-Type: application/dcml-sealed+json``
and ``X-DCML-Sealed: 1``; the body is the envelope ``{"v": 1, "kid": <hex>, "ct": <base64>}``:

* ``kid`` = hex sha256 of the node's HPKE public key (the one bound into its attestation), so a request
  sealed to another key is refused with a clear error instead of a generic decryption failure;
* ``ct`` = RFC 9180 HPKE single-shot ciphertext (`client.identity.HPKE_SUITE`: ML-KEM-768+X25519,
  HKDF-SHA256, AES-256-GCM) with ``info = b"dcml-e2e-v1 request " + path`` (a sealed chat request cannot
  be replayed against another endpoint), of ``response_key(32) ‖ inner request body``.

Response (enclave → client). ``response_key`` is fresh per request, lives only inside the sealed request
and is expanded with HKDF-SHA256(salt = sha256(ct), info = ``b"dcml-e2e-v1 response"``) into an
AES-256-GCM key. Each payload is sealed with nonce = 4 zero bytes ‖ seq (uint64 BE) and
AAD = ``b"dcml-e2e-v1 chunk" ‖ seq ‖ final-flag``, giving ``{"seq": n, "final": bool, "ct": <base64>}``:
the whole body for a non-streamed answer (seq 0, final), and for a stream each SSE ``data:`` payload,
``[DONE]`` being the only final one. Reordered, replayed, dropped or truncated chunks fail to open.
A symmetric response key (rather than the client's own HPKE key) is used because it is protected by the
same post-quantum KEM and costs no KEM operation per streamed chunk.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from dataclasses import dataclass, field
from enum import StrEnum

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from client import safejson
from client.identity import HPKE_SUITE, hpke_public_key_from_bytes

SEALED_CONTENT_TYPE = "application/dcml-sealed+json"
SEALED_HEADER = "X-DCML-Sealed"
VERSION = 1
RESPONSE_KEY_LEN = 32
_REQUEST_INFO = b"dcml-e2e-v1 request "
_RESPONSE_INFO = b"dcml-e2e-v1 response"
_CHUNK_AAD = b"dcml-e2e-v1 chunk"
MAX_SEALED_BYTES = 64 * 1024 * 1024  # an envelope or chunk is parsed only below this (the node bounds bodies lower)


class E2EReason(StrEnum):
    MALFORMED = "malformed"
    WRONG_RECIPIENT = "wrong_recipient"
    DECRYPT_FAILED = "decrypt_failed"
    OUT_OF_ORDER = "out_of_order"
    TRUNCATED = "truncated"


class E2EError(Exception):
    """A sealed message that cannot be opened; `reason` tells which check failed."""

    def __init__(self, reason: E2EReason, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def key_id(hpke_public_bytes: bytes) -> str:
    return hashlib.sha256(hpke_public_bytes).hexdigest()


def _request_info(path: str) -> bytes:
    return _REQUEST_INFO + path.encode()


@dataclass
class ResponseKey:
    """The per-request symmetric key both sides derive; seals/opens payloads by sequence number."""

    aead: AESGCM

    @classmethod
    def derive(cls, response_key: bytes, sealed_request_ct: bytes) -> ResponseKey:
        okm = HKDF(algorithm=hashes.SHA256(), length=32, salt=hashlib.sha256(sealed_request_ct).digest(),
                   info=_RESPONSE_INFO).derive(response_key)
        return cls(AESGCM(okm))

    @staticmethod
    def _nonce_aad(seq: int, final: bool) -> tuple[bytes, bytes]:
        counter = seq.to_bytes(8, "big")
        return b"\0\0\0\0" + counter, _CHUNK_AAD + counter + (b"\1" if final else b"\0")

    def seal(self, plaintext: bytes, seq: int, final: bool) -> bytes:
        """Sealed payload as compact JSON bytes: {"seq", "final", "ct"}."""
        nonce, aad = self._nonce_aad(seq, final)
        ct = base64.b64encode(self.aead.encrypt(nonce, plaintext, aad)).decode()
        return b'{"seq":%d,"final":%s,"ct":"%s"}' % (seq, b"true" if final else b"false", ct.encode())

    def open(self, payload: bytes | str, expected_seq: int) -> tuple[bytes, bool]:
        try:
            obj = safejson.loads(payload, max_bytes=MAX_SEALED_BYTES)
            seq, final, ct = obj["seq"], obj["final"], base64.b64decode(obj["ct"], validate=True)
            if not isinstance(seq, int) or not isinstance(final, bool):
                raise TypeError("seq must be an integer and final a boolean")
        except (ValueError, KeyError, TypeError, binascii.Error) as exc:
            raise E2EError(E2EReason.MALFORMED, f"not a sealed payload: {exc}") from exc
        if seq != expected_seq:
            raise E2EError(E2EReason.OUT_OF_ORDER,
                           f"sealed chunk {seq} arrived where {expected_seq} was expected (reordered or dropped)")
        nonce, aad = self._nonce_aad(seq, final)
        try:
            return self.aead.decrypt(nonce, ct, aad), final
        except InvalidTag as exc:
            raise E2EError(E2EReason.DECRYPT_FAILED,
                           "sealed response does not authenticate: altered in transit or wrong request") from exc


# ---- client side ------------------------------------------------------------------------------

@dataclass
class SealedRequest:
    """What to POST (body and headers) and the key to open the answer with."""

    body: bytes
    headers: dict[str, str]
    key: ResponseKey


def seal_request(body: bytes, node_hpke_public_key: bytes, *, path: str = "/v1/chat/completions") -> SealedRequest:
    """Seal an OpenAI request body to the node's attested HPKE key (verify the attestation first)."""
    response_key = os.urandom(RESPONSE_KEY_LEN)
    ct = HPKE_SUITE.encrypt(response_key + body, hpke_public_key_from_bytes(node_hpke_public_key),
                            info=_request_info(path))
    envelope = json.dumps({"v": VERSION, "kid": key_id(node_hpke_public_key),
                           "ct": base64.b64encode(ct).decode()}, separators=(",", ":")).encode()
    headers = {"Content-Type": SEALED_CONTENT_TYPE, SEALED_HEADER: "1"}
    return SealedRequest(body=envelope, headers=headers, key=ResponseKey.derive(response_key, ct))


def open_response(key: ResponseKey, body: bytes) -> bytes:
    """Open a non-streamed sealed response body into the plaintext OpenAI JSON bytes."""
    plaintext, final = key.open(body, 0)
    if not final:
        raise E2EError(E2EReason.TRUNCATED, "non-streamed sealed response is not marked final")
    return plaintext


def open_stream_chunk(key: ResponseKey, payload: bytes | str, seq: int) -> tuple[bytes, bool]:
    """Open the `seq`-th SSE data payload (0-based) of a sealed stream: (plaintext payload, is_final)."""
    return key.open(payload, seq)


@dataclass
class StreamOpener:
    """Opens a sealed stream payload by payload and insists that it ended with the final chunk."""

    key: ResponseKey
    seq: int = 0
    done: bool = False
    plaintexts: list[bytes] = field(default_factory=list)

    def open(self, payload: bytes | str) -> bytes:
        if self.done:
            raise E2EError(E2EReason.MALFORMED, "data after the final sealed chunk")
        plaintext, self.done = open_stream_chunk(self.key, payload, self.seq)
        self.seq += 1
        self.plaintexts.append(plaintext)
        return plaintext

    def finish(self) -> list[bytes]:
        if not self.done:
            raise E2EError(E2EReason.TRUNCATED, f"sealed stream ended after {self.seq} chunks without its final chunk")
        return self.plaintexts


# ---- enclave side -----------------------------------------------------------------------------

def open_request(envelope: bytes, private_key, public_bytes: bytes, *, path: str) -> tuple[bytes, ResponseKey]:
    """Open a sealed request with the enclave's HPKE private key: (inner body, key to seal the answer)."""
    try:
        obj = safejson.loads(envelope, max_bytes=MAX_SEALED_BYTES)
        version, kid, ct = obj["v"], obj["kid"], base64.b64decode(obj["ct"], validate=True)
    except (ValueError, KeyError, TypeError, binascii.Error) as exc:
        raise E2EError(E2EReason.MALFORMED,
                       'sealed body must be JSON {"v": 1, "kid": <hex>, "ct": <base64>}; build it with '
                       "client.e2e.seal_request") from exc
    if version != VERSION:
        raise E2EError(E2EReason.MALFORMED, f"unsupported sealed envelope version {version!r}; this node speaks 1")
    ours = key_id(public_bytes)
    if kid != ours:
        raise E2EError(E2EReason.WRONG_RECIPIENT,
                       f"request sealed to key {str(kid)[:16]}…, but this node's HPKE key is {ours[:16]}…; "
                       "fetch /v1/attestation, verify it, and seal to the key it attests")
    try:
        plaintext = HPKE_SUITE.decrypt(ct, private_key, info=_request_info(path))
    except Exception as exc:  # the HPKE binding raises InvalidTag or ValueError depending on where it fails
        raise E2EError(E2EReason.DECRYPT_FAILED,
                       "sealed request does not open with this node's key (altered, or sealed for another path)"
                       ) from exc
    if len(plaintext) < RESPONSE_KEY_LEN:
        raise E2EError(E2EReason.MALFORMED, "sealed request is shorter than its response key")
    return plaintext[RESPONSE_KEY_LEN:], ResponseKey.derive(plaintext[:RESPONSE_KEY_LEN], ct)
