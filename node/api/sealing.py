"""End-to-end sealed requests on the node: open them inside the enclave, seal every answer byte back.

The wire format (envelope, HPKE suite, per-chunk AEAD with counters) is `client.e2e`; this module only
decides, per HTTP request, whether it is sealed and turns wire errors into OpenAI-shaped 400s.
"""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request

from client.e2e import SEALED_CONTENT_TYPE, SEALED_HEADER, E2EError, E2EReason, ResponseKey, open_request
from node.api.errors import BadRequest
from node.identity import EnclaveIdentity

SEALED_RESPONSE_HEADERS = {SEALED_HEADER: "1"}


@dataclass(frozen=True)
class OpenedBody:
    body: bytes  # the plaintext request body: what requestHash covers
    key: ResponseKey | None  # set when the request was sealed: the answer must be sealed with it


def is_sealed(request: Request) -> bool:
    return (request.headers.get(SEALED_HEADER) == "1"
            or request.headers.get("content-type", "").split(";")[0].strip() == SEALED_CONTENT_TYPE)


def open_body(request: Request, raw: bytes, identity: EnclaveIdentity) -> OpenedBody:
    if not is_sealed(request):
        return OpenedBody(raw, None)
    try:
        body, key = open_request(raw, identity.hpke_private_key, identity.hpke_public_bytes(),
                                 path=request.url.path)
    except E2EError as exc:
        code = "sealed_to_other_key" if exc.reason is E2EReason.WRONG_RECIPIENT else f"sealed_{exc.reason.value}"
        raise BadRequest(f"Cannot open the sealed request: {exc}", code=code) from exc
    return OpenedBody(body, key)
