"""httpx transports that pay for inference and verify what they get, so any httpx-based client (the
official OpenAI SDK included) talks to a paid node unchanged.

The protocol is `client.x402`; the money decisions (which channel, how much to sign, what a receipt
must say) belong to a `Payer` (`client.sdk.Client`). A transport only moves bytes:

* an inference POST carries the payer's current voucher; a `402` is answered with the voucher the
  payer signs for it and the request is retried with the identical body;
* a streamed answer is filtered: data events pass through byte for byte, while the named events
  `payment-need-voucher` (answered by posting a voucher), `payment-timeout` and `dcml-receipt` are
  removed, because openai's `Stream` parses every event that is not `thread.*` as a chunk (3.51,
  `_streaming.py`) and would yield garbage chunks. `[DONE]` is held back until the receipt that follows
  it is verified, so a consumer that stops at `[DONE]` (the SDK does) still gets it checked;
* a receipt that fails verification is recorded as a violation by the payer and raised as
  `ReceiptViolation` from the response (`handle_request` for a full answer, the stream's last read for
  a streamed one): code that asked for an answer is never handed an unverified one as if it were fine;
* when the payer names the node's attested HPKE key (`Payer.seal_key`; the SDK does by default), every
  attempt is sealed afresh end to end (`client.e2e`) and the answer, its acceptance and its receipt are
  opened here: the consumer sees plain OpenAI bytes, the network and the operator see ciphertext only.
"""

from __future__ import annotations

import base64
import json
import logging
import random
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Protocol

import anyio.to_thread
import httpx

from dcml.client.wire.e2e import (
    SEALED_CONTENT_TYPE,
    SEALED_HEADER,
    E2EError,
    ResponseKey,
    SealedRequest,
    StreamOpener,
    open_response,
    seal_request,
)
from dcml.client.wire.errors import ErrorType, PaymentError, PaymentReason, read_error
from dcml.client.wire.receipts import DONE_PAYLOAD, RECEIPT_EVENT, RECEIPT_HEADER, ReceiptError, SignedReceipt
from dcml.client.wire.voucher import Voucher
from dcml.client.wire.x402 import (
    ACCEPTANCE_HEADER,
    NEED_VOUCHER_EVENT,
    PAYMENT_REQUIRED,
    PAYMENT_SIGNATURE,
    PAYMENT_TIMEOUT_EVENT,
    VOUCHERS_PATH,
    NeedVoucher,
    PaymentPayload,
    PaymentRequired,
    PaymentRequirement,
)

log = logging.getLogger("dcml.client")

PAID_PATHS = ("/v1/chat/completions", "/v1/completions")
EXCHANGE_EXTENSION = "dcml.exchange"  # response.extensions key holding the `Exchange`
# unpaid -> open channel -> exact amount -> (a concurrent request on the channel spent it first: again) -> give up.
# Each round raises our voucher to what the node asks (on_payment_required refuses to re-sign lower), so many
# requests sharing one channel may need several rounds; a node can ask for any amount in one round anyway.
MAX_PAYMENT_ROUNDS = 128
_STREAM_LIMITS = httpx.Limits(max_connections=None, max_keepalive_connections=64)  # one connection per stream


class PaymentRejected(PaymentError):
    """The node refused a voucher; `code` is its stable reason (e.g. `exceeds_deposit`, `bad_signature`)."""

    reason_in_str = True

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message, reason=code)
        self.code = code


class PaymentTimeout(PaymentError):
    """The node paused the stream for a voucher and ended it because none arrived in time."""

    reason = PaymentReason.PAYMENT_TIMEOUT


class SealedResponseError(PaymentError):
    """A sealed request's answer came unsealed or does not open: altered in transit, or not from the enclave."""

    reason = PaymentReason.SEALED_RESPONSE_INVALID


class ReceiptViolation(PaymentError):
    """A receipt or acceptance failed verification (recorded in the spend store); `reason` says which check."""

    error_type = ErrorType.RECEIPT
    reason_in_str = True

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message, reason=reason)


@dataclass
class Exchange:
    """One paid request as the payer saw it; filled in as the response arrives."""

    request_body: bytes
    model: str
    channel_id: str | None = None
    accepted: int | None = None  # PAYMENT-RESPONSE at admission
    spent_at_admission: int | None = None
    receipt: SignedReceipt | None = None
    vouchers: list[Voucher] = field(default_factory=list)  # signed during this exchange
    finished: bool = False
    started_at: float = field(default_factory=time.time)  # our clock when the request was sent
    request_hash: str | None = None  # set once the node's acceptance of it verified
    sealed: bool = False  # the request went sealed end to end and its answer opened
    offered: str | None = None  # the channel a voucher was sent on, until the node admits (or refuses) the request
    alone_epoch: int | None = None  # the payer's mark that no other request shared the channel since admission

    @property
    def cost(self) -> int:
        return self.receipt.receipt.cost if self.receipt else 0


class Payer(Protocol):
    """What a paying transport needs from its owner. Every method may block (chain, SQLite, HTTP)."""

    def prepare(self, model: str, exchange: Exchange) -> Voucher | None:
        """Attest the node if not yet done; the current voucher of the channel for `model`, if any."""

    def on_payment_required(self, required: PaymentRequired, exchange: Exchange, sent: Voucher | None) -> Voucher:
        """A 402: return the voucher to retry with (opening or topping up a channel as needed)."""

    def seal_key(self) -> bytes | None:
        """The attested node's HPKE public key to seal requests to, or None to send them in clear."""

    def on_admitted(self, headers: httpx.Headers, exchange: Exchange) -> None:
        """Check the acceptance and PAYMENT-RESPONSE of an admitted request (raise ReceiptViolation)."""

    def on_need_voucher(self, need: NeedVoucher, exchange: Exchange) -> Voucher:
        """Mid-stream request for more money: the voucher to post."""

    def on_receipt(self, exchange: Exchange, signed: SignedReceipt | None, *, response_bytes: bytes | None = None,
                   sse_payloads: list[bytes] | None = None) -> Voucher | None:
        """Verify and record; raise ReceiptViolation. Returns a voucher that pays any credit used, to post."""

    def on_aborted(self, exchange: Exchange) -> None:
        """The response ended before its receipt (consumer closed it or the connection broke), or the request
        was never admitted."""


def _backoff(rounds: int) -> float:
    """Pause before re-paying: none for the usual first rounds (open, exact amount), then a growing, jittered
    one, so requests contending for one channel spread out instead of outrunning each other's vouchers."""
    return 0.0 if rounds < 2 else random.uniform(0, min(0.01 * 2 ** (rounds - 2), 0.5))


def _model_of(body: bytes) -> str | None:
    try:
        data = json.loads(body)
    except ValueError:
        return None
    model = data.get("model") if isinstance(data, dict) else None
    return model if isinstance(model, str) else None


def _paid(request: httpx.Request) -> bool:
    return request.method == "POST" and request.url.path.endswith(PAID_PATHS)


def _with_voucher(request: httpx.Request, body: bytes, voucher: Voucher | None,
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


def _seal(key: bytes | None, body: bytes, url: httpx.URL) -> SealedRequest | None:
    """Sealed afresh for every attempt: the node answers each sealed request once (its replay cache)."""
    return None if key is None else seal_request(body, key, path=url.path)


def _response_key(response: httpx.Response, sealed: SealedRequest | None) -> ResponseKey | None:
    if sealed is None:
        return None
    if response.headers.get(SEALED_HEADER) != "1":
        raise SealedResponseError(f"the node answered a sealed request unsealed ({response.status_code}): refusing "
                                  "it, since anyone on the path could have written it")
    try:
        return sealed.key_for(response.headers)
    except E2EError as exc:
        raise SealedResponseError(str(exc)) from exc


def _opened_headers(headers: httpx.Headers, key: ResponseKey | None, content_type: str | None) -> httpx.Headers:
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


def _opened_error(response: httpx.Response, data: bytes, sealed: SealedRequest | None) -> httpx.Response:
    """An error answer to a sealed request, opened (a node error before it could open the request is clear)."""
    if sealed is None or not response.headers.get("content-type", "").startswith(SEALED_CONTENT_TYPE):
        return httpx.Response(response.status_code, headers=response.headers, content=data,
                              extensions=response.extensions)
    key = _response_key(response, sealed)
    try:
        plain = open_response(key, data)
    except E2EError as exc:
        raise SealedResponseError(f"the sealed error answer does not open: {exc}") from exc
    return httpx.Response(response.status_code, headers=_opened_headers(response.headers, key, "application/json"),
                          content=plain, extensions=response.extensions)


def _opened_body(key: ResponseKey | None, data: bytes) -> bytes:
    if key is None:
        return data
    try:
        return open_response(key, data)
    except E2EError as exc:
        raise SealedResponseError(f"the sealed answer does not open: {exc}") from exc


def _voucher_request(url: httpx.URL, voucher: Voucher) -> httpx.Request:
    return httpx.Request("POST", url.copy_with(path=VOUCHERS_PATH, query=None), json=voucher.to_wire(),
                         headers={"Accept-Encoding": "identity"})


def _voucher_answer(status: int, body: bytes) -> None:
    if status == 200:
        return
    code, message = read_error(body)
    code = code or PaymentReason.REJECTED
    if message is None:
        message = body[:200].decode(errors="replace")
    if code == PaymentReason.NOT_INCREASING:
        return  # the node already holds this voucher or a higher one (a concurrent stream of ours posted it)
    raise PaymentRejected(code, message)


def _payment_required(response: httpx.Response, offers: dict[str, PaymentRequirement], model: str
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


def _receipt_header(headers: httpx.Headers) -> SignedReceipt | None:
    value = headers.get(RECEIPT_HEADER)
    if value is None:
        return None
    try:
        return SignedReceipt.from_header(value)
    except ReceiptError:
        return None  # the payer records a missing/unreadable receipt as a violation


def _is_sse(response: httpx.Response) -> bool:
    return response.headers.get("content-type", "").startswith("text/event-stream")


class SseFilter:
    """Sans-IO: splits raw SSE bytes into events, returning what the consumer may see and what the
    payer must handle. `payloads` collects what the receipt's responseHash covers: the data of unnamed
    events only, `[DONE]` included (`client.receipts`, as `parse_sse_stream` reads a stream)."""

    def __init__(self, key: ResponseKey | None = None) -> None:
        self._buf = b""
        self.key = key  # a sealed stream: every data payload and the receipt are opened with it
        self._opener = StreamOpener(key) if key is not None else None
        self.payloads: list[bytes] = []
        self.receipt: SignedReceipt | None = None
        self.receipt_error: str | None = None
        self.done_block: bytes | None = None  # `data: [DONE]`, released once the receipt is verified
        self.timed_out = False

    def feed(self, chunk: bytes) -> list[bytes | NeedVoucher]:
        self._buf = (self._buf + chunk).replace(b"\r\n", b"\n")
        out: list[bytes | NeedVoucher] = []
        while (end := self._buf.find(b"\n\n")) >= 0:
            block, self._buf = self._buf[:end], self._buf[end + 2:]
            self._event(block, out)
        return out

    def close(self) -> list[bytes | NeedVoucher]:
        out: list[bytes | NeedVoucher] = []
        if self._buf.strip():
            self._event(self._buf, out)
        self._buf = b""
        return out

    def _event(self, block: bytes, out: list[bytes | NeedVoucher]) -> None:
        event, lines = None, []
        for line in block.split(b"\n"):
            if line.startswith(b"event:"):
                event = line[6:].strip().decode(errors="replace")
            elif line.startswith(b"data:"):
                lines.append(line[6:] if line.startswith(b"data: ") else line[5:])
        if not lines:
            return  # comments and keep-alives carry nothing
        payload = b"\n".join(lines)
        if event == RECEIPT_EVENT:
            try:
                self.receipt = SignedReceipt.from_json(payload if self.key is None
                                                       else self.key.open_aux("receipt", payload))
            except (ReceiptError, E2EError) as exc:
                self.receipt_error = str(exc)
            return
        if event in (None, "message"):
            if self._opener is not None:
                try:
                    payload = self._opener.open(payload)
                except E2EError as exc:
                    raise SealedResponseError(f"a sealed stream chunk does not open: {exc}") from exc
                lines = payload.split(b"\n")
            self.payloads.append(payload)
            data = b"".join(b"data: " + line + b"\n" for line in lines) + b"\n"
            if payload == DONE_PAYLOAD:
                self.done_block = data
            else:
                out.append(data)
        elif event == NEED_VOUCHER_EVENT:
            out.append(NeedVoucher.model_validate_json(payload))
        elif event == PAYMENT_TIMEOUT_EVENT:
            self.timed_out = True
        # any other named event is the node's business, not the OpenAI consumer's: dropped


# ---- sync ------------------------------------------------------------------------------------------


class PayingTransport(httpx.BaseTransport):
    """Pays for and verifies `POST /v1/chat/completions` and `/v1/completions`; passes anything else through."""

    def __init__(self, payer: Payer, inner: httpx.BaseTransport | None = None) -> None:
        self.payer = payer
        self._offers: dict[str, PaymentRequirement] = {}  # model -> the node's channel offer, from its last 402
        # Own pools: streams hold their connection for the whole answer, so many concurrent streams need as many
        # connections, and a voucher a paused stream waits for must never queue behind those streams.
        self.inner = inner or httpx.HTTPTransport(limits=_STREAM_LIMITS)
        self.vouchers = inner or httpx.HTTPTransport()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if not _paid(request):
            return self.inner.handle_request(request)
        body = request.read()
        model = _model_of(body)
        if model is None:
            return self.inner.handle_request(request)  # let the node say what is wrong with the body
        exchange = Exchange(request_body=body, model=model)
        try:
            voucher = self.payer.prepare(model, exchange)
            seal_key = self.payer.seal_key()
            for rounds in range(MAX_PAYMENT_ROUNDS):
                sealed = _seal(seal_key, body, request.url)
                response = self.inner.handle_request(_with_voucher(request, body, voucher, self._offers.get(model),
                                                                   sealed))
                if response.status_code != 402 or PAYMENT_REQUIRED not in response.headers:
                    break
                response.read()
                response.close()
                time.sleep(_backoff(rounds))
                voucher = self.payer.on_payment_required(_payment_required(response, self._offers, model), exchange,
                                                         voucher)
            else:
                raise PaymentError(f"the node still asks for payment after {MAX_PAYMENT_ROUNDS} vouchers; another "
                                   "client may be spending the same channel: retry, or open a separate channel")
        except BaseException:
            self.payer.on_aborted(exchange)
            raise
        if response.status_code >= 400:
            self.payer.on_aborted(exchange)
            if sealed is None:
                return response  # the caller's HTTP client reports it as usual
            data = response.read()
            response.close()
            return _opened_error(response, data, sealed)
        try:
            key = _response_key(response, sealed)
            headers = _opened_headers(response.headers, key, None if _is_sse(response) else "application/json")
        except SealedResponseError:
            self.payer.on_aborted(exchange)
            response.close()
            raise
        exchange.sealed = key is not None
        self.payer.on_admitted(headers, exchange)
        extensions = {**response.extensions, EXCHANGE_EXTENSION: exchange}
        if _is_sse(response):
            stream = _SyncPaidStream(self, response, exchange, request.url, key)
            return httpx.Response(response.status_code, headers=headers, stream=stream, extensions=extensions)
        data = response.read()
        response.close()
        try:
            data = _opened_body(key, data)
        except SealedResponseError:
            self.payer.on_aborted(exchange)
            raise
        settle = self.payer.on_receipt(exchange, _receipt_header(headers), response_bytes=data)
        self._settle(request.url, settle)
        return httpx.Response(response.status_code, headers=headers, content=data, extensions=extensions)

    def post_voucher(self, url: httpx.URL, voucher: Voucher) -> None:
        response = self.vouchers.handle_request(_voucher_request(url, voucher))
        try:
            _voucher_answer(response.status_code, response.read())
        finally:
            response.close()

    def _settle(self, url: httpx.URL, voucher: Voucher | None) -> None:
        """Pay the credit a finished answer used; a failure is not fatal (the next 402 asks again)."""
        if voucher is None:
            return
        try:
            self.post_voucher(url, voucher)
        except (PaymentError, httpx.HTTPError) as exc:
            log.warning("could not post the voucher paying for credit used (%s); the next request will", exc)

    def close(self) -> None:
        self.inner.close()
        if self.vouchers is not self.inner:
            self.vouchers.close()


class _SyncPaidStream(httpx.SyncByteStream):
    def __init__(self, transport: PayingTransport, upstream: httpx.Response, exchange: Exchange,
                 url: httpx.URL, key: ResponseKey | None = None) -> None:
        self.transport, self.upstream, self.exchange, self.url = transport, upstream, exchange, url
        self.filter = SseFilter(key)

    def __iter__(self) -> Iterator[bytes]:
        payer = self.transport.payer
        try:
            for chunk in self.upstream.stream:  # raw bytes: identity encoding was asked for
                for item in self.filter.feed(chunk):
                    if isinstance(item, NeedVoucher):
                        self.transport.post_voucher(self.url, payer.on_need_voucher(item, self.exchange))
                    else:
                        yield item
        except httpx.HTTPError:
            payer.on_aborted(self.exchange)
            raise
        for item in self.filter.close():
            if isinstance(item, bytes):
                yield item
        self.exchange.finished = True
        settle = payer.on_receipt(self.exchange, self.filter.receipt, sse_payloads=self.filter.payloads)
        self.transport._settle(self.url, settle)
        if self.filter.timed_out:
            raise PaymentTimeout("the node paused this stream for a voucher and none arrived in time; the answer "
                                 "is cut short (its receipt was verified and recorded)")
        if self.filter.done_block is not None:
            yield self.filter.done_block

    def close(self) -> None:
        if not self.exchange.finished:
            self.transport.payer.on_aborted(self.exchange)
        self.upstream.close()


# ---- async -----------------------------------------------------------------------------------------


class AsyncPayingTransport(httpx.AsyncBaseTransport):
    """The async twin of `PayingTransport`; the payer's blocking work runs in worker threads."""

    def __init__(self, payer: Payer, inner: httpx.AsyncBaseTransport | None = None) -> None:
        self.payer = payer
        self._offers: dict[str, PaymentRequirement] = {}  # model -> the node's channel offer, from its last 402
        self.inner = inner or httpx.AsyncHTTPTransport(limits=_STREAM_LIMITS)
        self.vouchers = inner or httpx.AsyncHTTPTransport()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if not _paid(request):
            return await self.inner.handle_async_request(request)
        body = await request.aread()
        model = _model_of(body)
        if model is None:
            return await self.inner.handle_async_request(request)
        exchange = Exchange(request_body=body, model=model)
        try:
            voucher = await anyio.to_thread.run_sync(self.payer.prepare, model, exchange)
            seal_key = await anyio.to_thread.run_sync(self.payer.seal_key)
            for rounds in range(MAX_PAYMENT_ROUNDS):
                sealed = _seal(seal_key, body, request.url)
                response = await self.inner.handle_async_request(_with_voucher(request, body, voucher,
                                                                               self._offers.get(model), sealed))
                if response.status_code != 402 or PAYMENT_REQUIRED not in response.headers:
                    break
                await response.aread()
                await response.aclose()
                await anyio.sleep(_backoff(rounds))
                required = _payment_required(response, self._offers, model)
                voucher = await anyio.to_thread.run_sync(self.payer.on_payment_required, required, exchange, voucher)
            else:
                raise PaymentError(f"the node still asks for payment after {MAX_PAYMENT_ROUNDS} vouchers; another "
                                   "client may be spending the same channel: retry, or open a separate channel")
        except BaseException:
            await anyio.to_thread.run_sync(self.payer.on_aborted, exchange)
            raise
        if response.status_code >= 400:
            await anyio.to_thread.run_sync(self.payer.on_aborted, exchange)
            if sealed is None:
                return response
            data = await response.aread()
            await response.aclose()
            return _opened_error(response, data, sealed)
        try:
            key = _response_key(response, sealed)
            headers = _opened_headers(response.headers, key, None if _is_sse(response) else "application/json")
        except SealedResponseError:
            await anyio.to_thread.run_sync(self.payer.on_aborted, exchange)
            await response.aclose()
            raise
        exchange.sealed = key is not None
        await anyio.to_thread.run_sync(self.payer.on_admitted, headers, exchange)
        extensions = {**response.extensions, EXCHANGE_EXTENSION: exchange}
        if _is_sse(response):
            stream = _AsyncPaidStream(self, response, exchange, request.url, key)
            return httpx.Response(response.status_code, headers=headers, stream=stream, extensions=extensions)
        data = await response.aread()
        await response.aclose()
        try:
            data = _opened_body(key, data)
        except SealedResponseError:
            await anyio.to_thread.run_sync(self.payer.on_aborted, exchange)
            raise
        settle = await anyio.to_thread.run_sync(
            lambda: self.payer.on_receipt(exchange, _receipt_header(headers), response_bytes=data))
        await self._settle(request.url, settle)
        return httpx.Response(response.status_code, headers=headers, content=data, extensions=extensions)

    async def post_voucher(self, url: httpx.URL, voucher: Voucher) -> None:
        response = await self.vouchers.handle_async_request(_voucher_request(url, voucher))
        try:
            _voucher_answer(response.status_code, await response.aread())
        finally:
            await response.aclose()

    async def _settle(self, url: httpx.URL, voucher: Voucher | None) -> None:
        if voucher is None:
            return
        try:
            await self.post_voucher(url, voucher)
        except (PaymentError, httpx.HTTPError) as exc:
            log.warning("could not post the voucher paying for credit used (%s); the next request will", exc)

    async def aclose(self) -> None:
        await self.inner.aclose()
        if self.vouchers is not self.inner:
            await self.vouchers.aclose()


class _AsyncPaidStream(httpx.AsyncByteStream):
    def __init__(self, transport: AsyncPayingTransport, upstream: httpx.Response, exchange: Exchange,
                 url: httpx.URL, key: ResponseKey | None = None) -> None:
        self.transport, self.upstream, self.exchange, self.url = transport, upstream, exchange, url
        self.filter = SseFilter(key)

    async def __aiter__(self) -> AsyncIterator[bytes]:
        payer = self.transport.payer
        try:
            async for chunk in self.upstream.stream:  # type: ignore[union-attr]
                for item in self.filter.feed(chunk):
                    if isinstance(item, NeedVoucher):
                        voucher = await anyio.to_thread.run_sync(payer.on_need_voucher, item, self.exchange)
                        await self.transport.post_voucher(self.url, voucher)
                    else:
                        yield item
        except httpx.HTTPError:
            await anyio.to_thread.run_sync(payer.on_aborted, self.exchange)
            raise
        for item in self.filter.close():
            if isinstance(item, bytes):
                yield item
        self.exchange.finished = True
        settle = await anyio.to_thread.run_sync(
            lambda: payer.on_receipt(self.exchange, self.filter.receipt, sse_payloads=self.filter.payloads))
        await self.transport._settle(self.url, settle)
        if self.filter.timed_out:
            raise PaymentTimeout("the node paused this stream for a voucher and none arrived in time; the answer "
                                 "is cut short (its receipt was verified and recorded)")
        if self.filter.done_block is not None:
            yield self.filter.done_block

    async def aclose(self) -> None:
        if not self.exchange.finished:
            await anyio.to_thread.run_sync(self.transport.payer.on_aborted, self.exchange)
        await self.upstream.aclose()
