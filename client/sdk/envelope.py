"""A paid request and its answer on the wire, for both transports: the voucher header, end-to-end sealing of each
attempt and opening of the answer (`client.wire.e2e`), the node's 402 and voucher answers, the receipt header."""

from __future__ import annotations

import base64
import json
import random

import httpx

from dcml.client.sdk.exchange import PAID_PATHS, PaymentError, PaymentRejected, SealedResponseError
from dcml.client.wire.e2e import (
    SEALED_CONTENT_TYPE,
    SEALED_HEADER,
    E2EError,
    ResponseKey,
    SealedRequest,
    open_response,
    seal_request,
)
from dcml.client.wire.errors import PaymentReason, read_error
from dcml.client.wire.receipts import RECEIPT_HEADER, ReceiptError, SignedReceipt
from dcml.client.wire.voucher import Voucher
from dcml.client.wire.x402 import (
    ACCEPTANCE_HEADER,
    PAYMENT_REQUIRED,
    PAYMENT_SIGNATURE,
    VOUCHERS_PATH,
    PaymentPayload,
    PaymentRequired,
    PaymentRequirement,
)


def backoff(rounds: int) -> float:
    """Pause before re-paying: none for the usual first rounds (open, exact amount), then a growing, jittered
    one, so requests contending for one channel spread out instead of outrunning each other's vouchers."""
    return 0.0 if rounds < 2 else random.uniform(0, min(0.01 * 2 ** (rounds - 2), 0.5))


def model_of(body: bytes) -> str | None:
    try:
        data = json.loads(body)
    except ValueError:
        return None
    model = data.get("model") if isinstance(data, dict) else None
    return model if isinstance(model, str) else None


def is_paid(request: httpx.Request) -> bool:
    return request.method == "POST" and request.url.path.endswith(PAID_PATHS)


def with_voucher(request: httpx.Request, body: bytes, voucher: Voucher | None,
                  offer: PaymentRequirement | None = None, sealed: SealedRequest | None = None) -> httpx.Request:
    headers = httpx.Headers(request.headers)
    headers["Accept-Encoding"] = "identity"  # hashes are over the bytes the node sent, not a re-encoding
    if voucher is not None:  # a v2 PaymentPayload once the node's offer is known; before that the bare voucher
        headers[PAYMENT_SIGNATURE] = (PaymentPayload(accepted=offer, payload=voucher).to_header() if offer
                                      else voucher.to_header())
    else:
        headers.pop(PAYMENT_SIGNATURE, None)
    if sealed is not None:
        headers.pop("Content-Length", None)
        headers.update(sealed.headers)
        body = sealed.body
    return httpx.Request(request.method, request.url, headers=headers, content=body, extensions=request.extensions)


def seal_attempt(key: bytes | None, body: bytes, url: httpx.URL) -> SealedRequest | None:
    """Sealed afresh for every attempt: the node answers each sealed request once (its replay cache)."""
    return None if key is None else seal_request(body, key, path=url.path)


def response_key(response: httpx.Response, sealed: SealedRequest | None) -> ResponseKey | None:
    return None if sealed is None else _sealed_key(response, sealed)


def _sealed_key(response: httpx.Response, sealed: SealedRequest) -> ResponseKey:
    """The key that opens the answer to a sealed request; an unsealed answer to it is refused."""
    if response.headers.get(SEALED_HEADER) != "1":
        raise SealedResponseError(f"the node answered a sealed request unsealed ({response.status_code}): refusing "
                                  "it, since anyone on the path could have written it")
    try:
        return sealed.key_for(response.headers)
    except E2EError as exc:
        raise SealedResponseError(str(exc)) from exc


def opened_headers(headers: httpx.Headers, key: ResponseKey | None, content_type: str | None) -> httpx.Headers:
    """The response headers with the sealed acceptance and receipt opened, as an unsealed answer has them."""
    if key is None:
        return headers
    out = httpx.Headers(headers)
    out.pop("Content-Length", None)
    if content_type is not None:
        out["Content-Type"] = content_type
    for name, kind in ((ACCEPTANCE_HEADER, "acceptance"), (RECEIPT_HEADER, "receipt")):
        if name in out:
            try:
                out[name] = base64.b64encode(key.open_aux(kind, base64.b64decode(out[name], validate=True))).decode()
            except (E2EError, ValueError) as exc:
                raise SealedResponseError(f"the sealed {kind} does not open: {exc}") from exc
    return out


def opened_error(response: httpx.Response, data: bytes, sealed: SealedRequest | None) -> httpx.Response:
    """An error answer to a sealed request, opened (a node error before it could open the request is clear)."""
    if sealed is None or not response.headers.get("content-type", "").startswith(SEALED_CONTENT_TYPE):
        return httpx.Response(response.status_code, headers=response.headers, content=data,
                              extensions=response.extensions)
    key = _sealed_key(response, sealed)
    try:
        plain = open_response(key, data)
    except E2EError as exc:
        raise SealedResponseError(f"the sealed error answer does not open: {exc}") from exc
    return httpx.Response(response.status_code, headers=opened_headers(response.headers, key, "application/json"),
                          content=plain, extensions=response.extensions)


def opened_body(key: ResponseKey | None, data: bytes) -> bytes:
    if key is None:
        return data
    try:
        return open_response(key, data)
    except E2EError as exc:
        raise SealedResponseError(f"the sealed answer does not open: {exc}") from exc


def voucher_request(url: httpx.URL, voucher: Voucher) -> httpx.Request:
    return httpx.Request("POST", url.copy_with(path=VOUCHERS_PATH, query=None), json=voucher.to_wire(),
                         headers={"Accept-Encoding": "identity"})


def voucher_answer(status: int, body: bytes) -> None:
    if status == 200:
        return
    code, message = read_error(body)
    code = code or PaymentReason.REJECTED
    if message is None:
        message = body[:200].decode(errors="replace")
    if code in (PaymentReason.NOT_INCREASING, PaymentReason.BAD_RELEASE):
        # The node already holds this voucher or a higher one: a concurrent stream of ours posted it first (a
        # voucher below the accepted one reads as a release there, refused as `bad_release` when it no longer
        # covers what was served). This one adds nothing; if the node still needs more, it asks again.
        return
    raise PaymentRejected(code, message)


def payment_required(response: httpx.Response, offers: dict[str, PaymentRequirement], model: str
                      ) -> PaymentRequired:
    """The 402's PaymentRequired (its message from the JSON body); remembers the channel offer for `model`."""
    try:
        required = PaymentRequired.from_header(response.headers[PAYMENT_REQUIRED])
    except (ValueError, TypeError) as exc:
        raise PaymentError(f"the node's {PAYMENT_REQUIRED} header is not x402 JSON ({exc}); is this a dcml node?") \
            from exc
    _, message = read_error(response.content)
    offer = next((r for r in required.accepts if isinstance(r, PaymentRequirement)), None)
    if offer is not None:
        offers[model] = offer.model_copy(update={"extra": offer.extra.model_copy(
            update={"channel_id": None, "required_cumulative": None})})
    return required.model_copy(update={"message": message if isinstance(message, str) else None})


def receipt_header(headers: httpx.Headers) -> SignedReceipt | None:
    value = headers.get(RECEIPT_HEADER)
    if value is None:
        return None
    try:
        return SignedReceipt.from_header(value)
    except ReceiptError:
        return None  # the payer records a missing/unreadable receipt as a violation


def is_sse(response: httpx.Response) -> bool:
    return response.headers.get("content-type", "").startswith("text/event-stream")
