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
  a streamed one): code that asked for an answer is never handed an unverified one as if it were fine.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Protocol

import anyio.to_thread
import httpx

from client.receipts import DONE_PAYLOAD, RECEIPT_EVENT, RECEIPT_HEADER, ReceiptError, SignedReceipt
from client.voucher import Voucher
from client.x402 import (
    NEED_VOUCHER_EVENT,
    PAYMENT_REQUIRED,
    PAYMENT_SIGNATURE,
    PAYMENT_TIMEOUT_EVENT,
    VOUCHERS_PATH,
    NeedVoucher,
    PaymentRequired,
)

log = logging.getLogger("dcml.client")

PAID_PATHS = ("/v1/chat/completions", "/v1/completions")
EXCHANGE_EXTENSION = "dcml.exchange"  # response.extensions key holding the `Exchange`
# unpaid -> open channel -> exact amount -> (a concurrent request on the channel spent it first: again) -> give up.
# Each round raises our voucher to what the node asks (on_payment_required refuses to re-sign lower), so many
# requests sharing one channel may need several rounds; a node can ask for any amount in one round anyway.
MAX_PAYMENT_ROUNDS = 128
_STREAM_LIMITS = httpx.Limits(max_connections=None, max_keepalive_connections=64)  # one connection per stream


class PaymentError(Exception):
    """Paying for a request failed; the message says what to do."""


class PaymentRejected(PaymentError):
    """The node refused a voucher; `code` is its stable reason (e.g. `exceeds_deposit`, `bad_signature`)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code


class PaymentTimeout(PaymentError):
    """The node paused the stream for a voucher and ended it because none arrived in time."""


class ReceiptViolation(PaymentError):
    """A receipt or acceptance failed verification (recorded in the spend store); `reason` says which check."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason


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


def _with_voucher(request: httpx.Request, body: bytes, voucher: Voucher | None) -> httpx.Request:
    headers = httpx.Headers(request.headers)
    headers["Accept-Encoding"] = "identity"  # hashes are over the bytes the node sent, not a re-encoding
    if voucher is not None:
        headers[PAYMENT_SIGNATURE] = voucher.to_header()
    else:
        headers.pop(PAYMENT_SIGNATURE, None)
    return httpx.Request(request.method, request.url, headers=headers, content=body, extensions=request.extensions)


def _voucher_request(url: httpx.URL, voucher: Voucher) -> httpx.Request:
    return httpx.Request("POST", url.copy_with(path=VOUCHERS_PATH, query=None), json=voucher.to_wire(),
                         headers={"Accept-Encoding": "identity"})


def _voucher_answer(status: int, body: bytes) -> None:
    if status == 200:
        return
    try:
        err = json.loads(body)["error"]
        code, message = str(err.get("code") or "rejected"), str(err.get("message"))
    except (ValueError, KeyError, TypeError, AttributeError):
        code, message = "rejected", body[:200].decode(errors="replace")
    if code == "not_increasing":
        return  # the node already holds this voucher or a higher one (a concurrent stream of ours posted it)
    raise PaymentRejected(code, message)


def _payment_required(response: httpx.Response) -> PaymentRequired:
    try:
        return PaymentRequired.from_header(response.headers[PAYMENT_REQUIRED])
    except (ValueError, TypeError) as exc:
        raise PaymentError(f"the node's {PAYMENT_REQUIRED} header is not x402 JSON ({exc}); is this a dcml node?") \
            from exc


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

    def __init__(self) -> None:
        self._buf = b""
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
                self.receipt = SignedReceipt.from_json(payload)
            except ReceiptError as exc:
                self.receipt_error = str(exc)
            return
        if event in (None, "message"):
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
            for rounds in range(MAX_PAYMENT_ROUNDS):
                response = self.inner.handle_request(_with_voucher(request, body, voucher))
                if response.status_code != 402 or PAYMENT_REQUIRED not in response.headers:
                    break
                response.read()
                response.close()
                time.sleep(_backoff(rounds))
                voucher = self.payer.on_payment_required(_payment_required(response), exchange, voucher)
            else:
                raise PaymentError(f"the node still asks for payment after {MAX_PAYMENT_ROUNDS} vouchers; another "
                                   "client may be spending the same channel: retry, or open a separate channel")
        except BaseException:
            self.payer.on_aborted(exchange)
            raise
        if response.status_code >= 400:
            self.payer.on_aborted(exchange)
            return response  # the caller's HTTP client reports it as usual
        self.payer.on_admitted(response.headers, exchange)
        extensions = {**response.extensions, EXCHANGE_EXTENSION: exchange}
        if _is_sse(response):
            stream = _SyncPaidStream(self, response, exchange, request.url)
            return httpx.Response(response.status_code, headers=response.headers, stream=stream,
                                  extensions=extensions)
        data = response.read()
        response.close()
        settle = self.payer.on_receipt(exchange, _receipt_header(response.headers), response_bytes=data)
        self._settle(request.url, settle)
        return httpx.Response(response.status_code, headers=response.headers, content=data, extensions=extensions)

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
                 url: httpx.URL) -> None:
        self.transport, self.upstream, self.exchange, self.url = transport, upstream, exchange, url
        self.filter = SseFilter()

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
            for rounds in range(MAX_PAYMENT_ROUNDS):
                response = await self.inner.handle_async_request(_with_voucher(request, body, voucher))
                if response.status_code != 402 or PAYMENT_REQUIRED not in response.headers:
                    break
                await response.aread()
                await response.aclose()
                await anyio.sleep(_backoff(rounds))
                voucher = await anyio.to_thread.run_sync(self.payer.on_payment_required,
                                                         _payment_required(response), exchange, voucher)
            else:
                raise PaymentError(f"the node still asks for payment after {MAX_PAYMENT_ROUNDS} vouchers; another "
                                   "client may be spending the same channel: retry, or open a separate channel")
        except BaseException:
            await anyio.to_thread.run_sync(self.payer.on_aborted, exchange)
            raise
        if response.status_code >= 400:
            await anyio.to_thread.run_sync(self.payer.on_aborted, exchange)
            return response
        await anyio.to_thread.run_sync(self.payer.on_admitted, response.headers, exchange)
        extensions = {**response.extensions, EXCHANGE_EXTENSION: exchange}
        if _is_sse(response):
            stream = _AsyncPaidStream(self, response, exchange, request.url)
            return httpx.Response(response.status_code, headers=response.headers, stream=stream,
                                  extensions=extensions)
        data = await response.aread()
        await response.aclose()
        settle = await anyio.to_thread.run_sync(
            lambda: self.payer.on_receipt(exchange, _receipt_header(response.headers), response_bytes=data))
        await self._settle(request.url, settle)
        return httpx.Response(response.status_code, headers=response.headers, content=data, extensions=extensions)

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
                 url: httpx.URL) -> None:
        self.transport, self.upstream, self.exchange, self.url = transport, upstream, exchange, url
        self.filter = SseFilter()

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
