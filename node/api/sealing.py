"""End-to-end sealed requests on the node: open them inside the enclave, refuse replays, seal every answer
byte back under a key with fresh enclave randomness.

The wire format (envelope, HPKE suite, per-response salt, per-chunk AEAD with counters) is `client.e2e`;
this module only decides, per HTTP request, whether it is sealed, keeps the replay cache and turns wire
errors into OpenAI-shaped 400s.
"""

from __future__ import annotations

import base64
import heapq
import threading
import time
from dataclasses import dataclass

from fastapi import Request

from dcml.client.wire.e2e import (
    SALT_HEADER,
    SEALED_CONTENT_TYPE,
    SEALED_HEADER,
    E2EError,
    E2EReason,
    ResponseKey,
    open_request,
)
from dcml.node.api.errors import BadRequest
from dcml.node.identity import EnclaveIdentity

SEALED_RESPONSE_HEADERS = {SEALED_HEADER: "1"}


class ReplayCache:
    """Each sealed request (by sha256 of its HPKE ciphertext) is accepted once, if sealed within the window.

    Memory is bounded by `max_entries`: when full, the entry sealed earliest is dropped and the floor rises
    to its time, so anything sealed at or before the floor is refused as stale (never accepted twice)."""

    def __init__(self, past_s: float = 300.0, future_s: float = 60.0, max_entries: int = 200_000) -> None:
        self.past_s, self.future_s, self.max_entries = past_s, future_s, max_entries
        self._seen: set[bytes] = set()
        self._heap: list[tuple[float, bytes]] = []
        self._floor = 0.0
        self._lock = threading.Lock()

    def check(self, digest: bytes, sealed_at: float, now: float | None = None) -> None:
        now = time.time() if now is None else now
        with self._lock:
            while self._heap and self._heap[0][0] < now - self.past_s:  # outside the window: refused as stale anyway
                self._seen.discard(heapq.heappop(self._heap)[1])
            if not (max(now - self.past_s, self._floor) < sealed_at <= now + self.future_s):
                raise E2EError(E2EReason.EXPIRED, f"sealed at {sealed_at:.3f}, outside this node's replay window "
                               f"({self.past_s:g} s back, {self.future_s:g} s ahead of {now:.3f}): seal it again "
                               "(and check your clock)")
            if digest in self._seen:
                raise E2EError(E2EReason.REPLAYED, "this sealed request was already answered: seal every request "
                               "afresh (a replay is never answered twice)")
            if len(self._seen) >= self.max_entries:
                when, old = heapq.heappop(self._heap)
                self._seen.discard(old)
                self._floor = max(self._floor, when)
            self._seen.add(digest)
            heapq.heappush(self._heap, (sealed_at, digest))

    def __len__(self) -> int:
        return len(self._seen)


@dataclass(frozen=True)
class OpenedBody:
    body: bytes  # the plaintext request body: what requestHash covers
    key: ResponseKey | None  # set when the request was sealed: the answer must be sealed with it
    headers: dict[str, str]  # to send with every answer (sealed: the flag and this response's salt)

    def seal_header(self, kind: str, value: str) -> str:
        """A receipt or acceptance header: sealed (base64 of `client.e2e` JSON) when the request was sealed."""
        if self.key is None:
            return value
        return base64.b64encode(self.key.seal_aux(kind, base64.b64decode(value))).decode()


def is_sealed(request: Request) -> bool:
    return (request.headers.get(SEALED_HEADER) == "1"
            or request.headers.get("content-type", "").split(";")[0].strip() == SEALED_CONTENT_TYPE)


def open_body(request: Request, raw: bytes, identity: EnclaveIdentity, replay: ReplayCache) -> OpenedBody:
    if not is_sealed(request):
        return OpenedBody(raw, None, {})
    try:
        opened = open_request(raw, identity.hpke_private_key, identity.hpke_public_bytes(), path=request.url.path)
        replay.check(opened.request_digest, opened.sealed_at)
    except E2EError as exc:
        code = "sealed_to_other_key" if exc.reason is E2EReason.WRONG_RECIPIENT else f"sealed_{exc.reason.value}"
        raise BadRequest(f"Cannot open the sealed request: {exc}", code=code) from exc
    key, salt = opened.response_key()
    return OpenedBody(opened.body, key, {**SEALED_RESPONSE_HEADERS, SALT_HEADER: salt.hex()})
