"""End-to-end sealed requests and responses: prompts readable only inside the attested enclave.

Request (client → enclave). ``POST`` the usual OpenAI path with ``Content-Type: application/dcml-sealed+json``
and ``X-DCML-Sealed: 1``; the body is the envelope ``{"v": 2, "kid": <hex>, "ct": <base64>}``:

* ``kid`` = hex sha256 of the node's HPKE public key (the one bound into its attestation), so a request
  sealed to another key is refused with a clear error instead of a generic decryption failure;
* ``ct`` = RFC 9180 HPKE single-shot ciphertext (`client.identity.HPKE_SUITE`: ML-KEM-768+X25519,
  HKDF-SHA256, AES-256-GCM) with ``info = b"dcml-e2e-v2 request " + path`` (a sealed chat request cannot
  be replayed against another endpoint), of ``secret(32) ‖ sealed_at_ms (uint64 BE) ‖ inner request body``.

Response (enclave → client). For every response the enclave draws a fresh 32-byte ``salt`` and sends it in
clear (header ``X-DCML-Sealed-Salt``, hex); both sides derive the response key
``K = HKDF-SHA256(ikm = secret, salt = salt, info = b"dcml-e2e-v2 response" ‖ sha256(ct))``. Each payload
is sealed with AES-256-GCM under K, nonce = kind (uint32 BE) ‖ seq (uint64 BE), AAD = ``b"dcml-e2e-v2" ‖
kind ‖ seq``, where kind is 0 (data), 1 (final data), 2 (receipt) or 3 (acceptance): the whole body of a
non-streamed answer is (1, 0); each SSE ``data:`` payload of a stream is (0, n), ``[DONE]`` being the only
(1, n); the signed receipt (header or ``dcml-receipt`` event) is (2, 0) and the signed acceptance (3, 0).
Wire form of a payload: ``{"seq": n, "final": bool, "ct": <base64>}`` (receipt and acceptance: ``{"kind":
"receipt"|"acceptance", "ct"}``). Reordered, replayed, dropped or truncated chunks fail to open.

Why replays gain nothing. ``secret`` is known only to the client and the enclave. Replaying a victim's
sealed request makes the enclave answer under a key drawn with a *new* salt, so the replay's ciphertext is
under a key independent of the victim's (HKDF is a PRF keyed by the secret: distinct salts give
independent keys), and no (key, nonce) pair is ever used twice: nonces are unique per key because the
enclave seals each (kind, seq) once per response. A chunk cut from a replay therefore fails the victim's
GCM tag. The enclave also refuses replays outright: ``sealed_at_ms`` must lie within the replay window
(`node.api.sealing.ReplayCache`, default 5 min back, 1 min ahead) and each ``sha256(ct)`` is accepted once
in that window (bounded memory; when full, the oldest entries are dropped and anything sealed before them is
refused as stale). Receipts and acceptances of a sealed request are sealed too: their ``requestHash`` would
otherwise let an observer test a guess of the prompt.
A symmetric response key (rather than the client's own HPKE key) is used because it is protected by the
same post-quantum KEM and costs no KEM operation per streamed chunk.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from dcml.client.wire import safejson
from dcml.client.wire.errors import DcmlError
from dcml.client.wire.identity import HPKE_SUITE, hpke_public_key_from_bytes

SEALED_CONTENT_TYPE = "application/dcml-sealed+json"
SEALED_HEADER = "X-DCML-Sealed"
SALT_HEADER = "X-DCML-Sealed-Salt"
VERSION = 2
RESPONSE_KEY_LEN = 32
SALT_LEN = 32
_REQUEST_INFO = b"dcml-e2e-v2 request "
_RESPONSE_INFO = b"dcml-e2e-v2 response"
_AAD = b"dcml-e2e-v2"
DATA, FINAL, RECEIPT, ACCEPTANCE = 0, 1, 2, 3
_AUX_KINDS = {"receipt": RECEIPT, "acceptance": ACCEPTANCE}
MAX_SEALED_BYTES = 64 * 1024 * 1024  # an envelope or chunk is parsed only below this (the node bounds bodies lower)


class E2EReason(StrEnum):
    MALFORMED = "malformed"
    WRONG_RECIPIENT = "wrong_recipient"
    DECRYPT_FAILED = "decrypt_failed"
    OUT_OF_ORDER = "out_of_order"
    TRUNCATED = "truncated"
    REPLAYED = "replayed"
    EXPIRED = "expired"


class E2EError(DcmlError):
    """A sealed message that cannot be opened; `reason` tells which check failed."""

    reason: E2EReason

    def __init__(self, reason: E2EReason, message: str) -> None:
        super().__init__(message, reason=reason)


def key_id(hpke_public_bytes: bytes) -> str:
    return hashlib.sha256(hpke_public_bytes).hexdigest()


def _request_info(path: str) -> bytes:
    return _REQUEST_INFO + path.encode()


def _digest(ct: bytes) -> bytes:
    return hashlib.sha256(ct).digest()


@dataclass
class ResponseKey:
    """The per-response symmetric key both sides derive; seals/opens payloads by (kind, sequence number)."""

    aead: AESGCM

    @classmethod
    def derive(cls, secret: bytes, salt: bytes, request_digest: bytes) -> ResponseKey:
        if len(salt) != SALT_LEN:
            raise E2EError(E2EReason.MALFORMED, f"response salt must be {SALT_LEN} bytes")
        okm = HKDF(algorithm=hashes.SHA256(), length=32, salt=salt,
                   info=_RESPONSE_INFO + request_digest).derive(secret)
        return cls(AESGCM(okm))

    @staticmethod
    def _nonce_aad(kind: int, seq: int) -> tuple[bytes, bytes]:
        nonce = kind.to_bytes(4, "big") + seq.to_bytes(8, "big")
        return nonce, _AAD + nonce

    def seal(self, plaintext: bytes, seq: int, final: bool) -> bytes:
        """Sealed data payload as compact JSON bytes: {"seq", "final", "ct"}."""
        nonce, aad = self._nonce_aad(FINAL if final else DATA, seq)
        ct = base64.b64encode(self.aead.encrypt(nonce, plaintext, aad)).decode()
        return b'{"seq":%d,"final":%s,"ct":"%s"}' % (seq, b"true" if final else b"false", ct.encode())

    def seal_aux(self, kind: str, plaintext: bytes) -> bytes:
        """A sealed receipt or acceptance: {"kind", "ct"}."""
        nonce, aad = self._nonce_aad(_AUX_KINDS[kind], 0)
        ct = base64.b64encode(self.aead.encrypt(nonce, plaintext, aad)).decode()
        return b'{"kind":"%s","ct":"%s"}' % (kind.encode(), ct.encode())

    def open_aux(self, kind: str, payload: bytes | str) -> bytes:
        try:
            obj = safejson.loads(payload, max_bytes=MAX_SEALED_BYTES)
            if obj["kind"] != kind:
                raise ValueError(f"a sealed {obj['kind']!r} where a {kind} was expected")
            ct = base64.b64decode(obj["ct"], validate=True)
        except (ValueError, KeyError, TypeError, binascii.Error) as exc:
            raise E2EError(E2EReason.MALFORMED, f"not a sealed {kind}: {exc}") from exc
        nonce, aad = self._nonce_aad(_AUX_KINDS[kind], 0)
        try:
            return self.aead.decrypt(nonce, ct, aad)
        except InvalidTag as exc:
            raise E2EError(E2EReason.DECRYPT_FAILED, f"sealed {kind} does not authenticate") from exc

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
        nonce, aad = self._nonce_aad(FINAL if final else DATA, seq)
        try:
            return self.aead.decrypt(nonce, ct, aad), final
        except InvalidTag as exc:
            raise E2EError(E2EReason.DECRYPT_FAILED,
                           "sealed response does not authenticate: altered in transit or wrong request") from exc


# ---- client side ------------------------------------------------------------------------------

@dataclass
class SealedRequest:
    """What to POST (body and headers) and the secret to open the answer with (`key_for` its headers)."""

    body: bytes
    headers: dict[str, str]
    secret: bytes
    request_digest: bytes

    def key_for(self, response_headers: Mapping[str, str]) -> ResponseKey:
        """The key of one response, from the salt the enclave sent with it."""
        salt = response_headers.get(SALT_HEADER) or response_headers.get(SALT_HEADER.lower())
        try:
            raw = bytes.fromhex(salt or "")
        except ValueError:
            raw = b""
        if len(raw) != SALT_LEN:
            raise E2EError(E2EReason.MALFORMED, f"the sealed response has no valid {SALT_HEADER} header")
        return ResponseKey.derive(self.secret, raw, self.request_digest)


def seal_request(body: bytes, node_hpke_public_key: bytes, *, path: str = "/v1/chat/completions",
                 sealed_at: float | None = None) -> SealedRequest:
    """Seal an OpenAI request body to the node's attested HPKE key (verify the attestation first)."""
    secret = os.urandom(RESPONSE_KEY_LEN)
    when = int(1000 * (time.time() if sealed_at is None else sealed_at))
    ct = HPKE_SUITE.encrypt(secret + when.to_bytes(8, "big") + body, hpke_public_key_from_bytes(node_hpke_public_key),
                            info=_request_info(path))
    envelope = json.dumps({"v": VERSION, "kid": key_id(node_hpke_public_key),
                           "ct": base64.b64encode(ct).decode()}, separators=(",", ":")).encode()
    headers = {"Content-Type": SEALED_CONTENT_TYPE, SEALED_HEADER: "1"}
    return SealedRequest(body=envelope, headers=headers, secret=secret, request_digest=_digest(ct))


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

@dataclass(frozen=True)
class OpenedRequest:
    """A sealed request opened inside the enclave."""

    body: bytes  # the inner (plaintext) request body
    secret: bytes
    request_digest: bytes  # sha256 of the HPKE ciphertext: the replay cache's key
    sealed_at: float  # the client's clock, seconds

    def response_key(self) -> tuple[ResponseKey, bytes]:
        """A fresh key for one response: (key, salt to send in clear as `SALT_HEADER`)."""
        salt = os.urandom(SALT_LEN)
        return ResponseKey.derive(self.secret, salt, self.request_digest), salt


def open_request(envelope: bytes, private_key, public_bytes: bytes, *, path: str) -> OpenedRequest:
    """Open a sealed request with the enclave's HPKE private key (replays are the caller's to refuse)."""
    try:
        obj = safejson.loads(envelope, max_bytes=MAX_SEALED_BYTES)
        version, kid, ct = obj["v"], obj["kid"], base64.b64decode(obj["ct"], validate=True)
    except (ValueError, KeyError, TypeError, binascii.Error) as exc:
        raise E2EError(E2EReason.MALFORMED,
                       'sealed body must be JSON {"v": 2, "kid": <hex>, "ct": <base64>}; build it with '
                       "dcml.client.wire.e2e.seal_request") from exc
    if version != VERSION:
        raise E2EError(E2EReason.MALFORMED, f"unsupported sealed envelope version {version!r}; this node speaks "
                       f"{VERSION} (version 1 response keys could be replayed into key reuse: upgrade the client)")
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
    head = RESPONSE_KEY_LEN + 8
    if len(plaintext) < head:
        raise E2EError(E2EReason.MALFORMED, "sealed request is shorter than its secret and timestamp")
    sealed_at = int.from_bytes(plaintext[RESPONSE_KEY_LEN:head], "big") / 1000
    return OpenedRequest(plaintext[head:], plaintext[:RESPONSE_KEY_LEN], _digest(ct), sealed_at)
