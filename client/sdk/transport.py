"""httpx transports that pay for inference and verify what they get, so any httpx-based client (the
official OpenAI SDK included) talks to a paid node unchanged.

The protocol is `client.wire.x402`; the money decisions (which channel, how much to sign, what a receipt
must say) belong to a `Payer` (`client.sdk.payer`, which `client.sdk.Client` is). A transport only moves bytes:

* an inference POST carries the payer's current voucher; a `402` is answered with the voucher the
  payer signs for it and the request is retried with the identical body;
* a streamed answer is filtered (`client.sdk.streams`): data events pass through byte for byte, the payment
  and receipt events are handled here, `[DONE]` is held back until the receipt that follows it is verified;
* a receipt that fails verification is recorded as a violation by the payer and raised as
  `ReceiptViolation` from the response (`handle_request` for a full answer, the stream's last read for
  a streamed one): code that asked for an answer is never handed an unverified one as if it were fine;
* when the payer names the node's attested HPKE key (`Payer.seal_key`; the SDK does by default), every
  attempt is sealed afresh end to end (`client.wire.e2e`) and the answer, its acceptance and its receipt are
  opened here (`client.sdk.envelope`): the consumer sees plain OpenAI bytes, the network and the operator see
  ciphertext only.
"""

from __future__ import annotations

import logging
import time

import anyio.to_thread
import httpx

from dcml.client.sdk.envelope import (
    backoff,
    is_paid,
    is_sse,
    model_of,
    opened_body,
    opened_error,
    opened_headers,
    payment_required,
    receipt_header,
    response_key,
    seal_attempt,
    voucher_answer,
    voucher_request,
    with_voucher,
)
from dcml.client.sdk.exchange import (
    EXCHANGE_EXTENSION,
    PAID_PATHS,
    Exchange,
    Payer,
    PaymentError,
    PaymentRejected,
    PaymentTimeout,
    ReceiptViolation,
    SealedResponseError,
)
from dcml.client.sdk.streams import AsyncPaidStream, PaidStream, SseFilter
from dcml.client.wire.voucher import Voucher
from dcml.client.wire.x402 import PAYMENT_REQUIRED, PaymentRequirement

# Kept importable from here, where they were defined before the split.
__all__ = ["EXCHANGE_EXTENSION", "PAID_PATHS", "AsyncPayingTransport", "Exchange", "Payer", "PayingTransport",
           "PaymentError", "PaymentRejected", "PaymentTimeout", "ReceiptViolation", "SealedResponseError",
           "SseFilter"]

log = logging.getLogger("dcml.client")

# unpaid -> open channel -> exact amount -> (a concurrent request on the channel spent it first: again) -> give up.
# Each round raises our voucher to what the node asks (on_payment_required refuses to re-sign lower), so many
# requests sharing one channel may need several rounds; a node can ask for any amount in one round anyway.
MAX_PAYMENT_ROUNDS = 128
_STREAM_LIMITS = httpx.Limits(max_connections=None, max_keepalive_connections=64)  # one connection per stream


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
        if not is_paid(request):
            return self.inner.handle_request(request)
        body = request.read()
        model = model_of(body)
        if model is None:
            return self.inner.handle_request(request)  # let the node say what is wrong with the body
        exchange = Exchange(request_body=body, model=model)
        try:
            voucher = self.payer.prepare(model, exchange)
            seal_key = self.payer.seal_key()
            for rounds in range(MAX_PAYMENT_ROUNDS):
                sealed = seal_attempt(seal_key, body, request.url)
                response = self.inner.handle_request(with_voucher(request, body, voucher, self._offers.get(model),
                                                                   sealed))
                if response.status_code != 402 or PAYMENT_REQUIRED not in response.headers:
                    break
                response.read()
                response.close()
                time.sleep(backoff(rounds))
                voucher = self.payer.on_payment_required(payment_required(response, self._offers, model), exchange,
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
            return opened_error(response, data, sealed)
        try:
            key = response_key(response, sealed)
            headers = opened_headers(response.headers, key, None if is_sse(response) else "application/json")
        except SealedResponseError:
            self.payer.on_aborted(exchange)
            response.close()
            raise
        exchange.sealed = key is not None
        self.payer.on_admitted(headers, exchange)
        extensions = {**response.extensions, EXCHANGE_EXTENSION: exchange}
        if is_sse(response):
            stream = PaidStream(self, response, exchange, request.url, key)
            return httpx.Response(response.status_code, headers=headers, stream=stream, extensions=extensions)
        data = response.read()
        response.close()
        try:
            data = opened_body(key, data)
        except SealedResponseError:
            self.payer.on_aborted(exchange)
            raise
        settle = self.payer.on_receipt(exchange, receipt_header(headers), response_bytes=data)
        self.settle(request.url, settle)
        return httpx.Response(response.status_code, headers=headers, content=data, extensions=extensions)

    def post_voucher(self, url: httpx.URL, voucher: Voucher) -> None:
        response = self.vouchers.handle_request(voucher_request(url, voucher))
        try:
            voucher_answer(response.status_code, response.read())
        finally:
            response.close()

    def settle(self, url: httpx.URL, voucher: Voucher | None) -> None:
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


class AsyncPayingTransport(httpx.AsyncBaseTransport):
    """The async twin of `PayingTransport`; the payer's blocking work runs in worker threads."""

    def __init__(self, payer: Payer, inner: httpx.AsyncBaseTransport | None = None) -> None:
        self.payer = payer
        self._offers: dict[str, PaymentRequirement] = {}  # model -> the node's channel offer, from its last 402
        self.inner = inner or httpx.AsyncHTTPTransport(limits=_STREAM_LIMITS)
        self.vouchers = inner or httpx.AsyncHTTPTransport()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if not is_paid(request):
            return await self.inner.handle_async_request(request)
        body = await request.aread()
        model = model_of(body)
        if model is None:
            return await self.inner.handle_async_request(request)
        exchange = Exchange(request_body=body, model=model)
        try:
            voucher = await anyio.to_thread.run_sync(self.payer.prepare, model, exchange)
            seal_key = await anyio.to_thread.run_sync(self.payer.seal_key)
            for rounds in range(MAX_PAYMENT_ROUNDS):
                sealed = seal_attempt(seal_key, body, request.url)
                response = await self.inner.handle_async_request(with_voucher(request, body, voucher,
                                                                               self._offers.get(model), sealed))
                if response.status_code != 402 or PAYMENT_REQUIRED not in response.headers:
                    break
                await response.aread()
                await response.aclose()
                await anyio.sleep(backoff(rounds))
                required = payment_required(response, self._offers, model)
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
            return opened_error(response, data, sealed)
        try:
            key = response_key(response, sealed)
            headers = opened_headers(response.headers, key, None if is_sse(response) else "application/json")
        except SealedResponseError:
            await anyio.to_thread.run_sync(self.payer.on_aborted, exchange)
            await response.aclose()
            raise
        exchange.sealed = key is not None
        await anyio.to_thread.run_sync(self.payer.on_admitted, headers, exchange)
        extensions = {**response.extensions, EXCHANGE_EXTENSION: exchange}
        if is_sse(response):
            stream = AsyncPaidStream(self, response, exchange, request.url, key)
            return httpx.Response(response.status_code, headers=headers, stream=stream, extensions=extensions)
        data = await response.aread()
        await response.aclose()
        try:
            data = opened_body(key, data)
        except SealedResponseError:
            await anyio.to_thread.run_sync(self.payer.on_aborted, exchange)
            raise
        settle = await anyio.to_thread.run_sync(
            lambda: self.payer.on_receipt(exchange, receipt_header(headers), response_bytes=data))
        await self.settle(request.url, settle)
        return httpx.Response(response.status_code, headers=headers, content=data, extensions=extensions)

    async def post_voucher(self, url: httpx.URL, voucher: Voucher) -> None:
        response = await self.vouchers.handle_async_request(voucher_request(url, voucher))
        try:
            voucher_answer(response.status_code, await response.aread())
        finally:
            await response.aclose()

    async def settle(self, url: httpx.URL, voucher: Voucher | None) -> None:
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
