"""A paid answer streamed as server-sent events, between the node and the consumer.

`SseFilter` (sans-IO) reads the node's events with the wire's reader (`client.wire.sse`): data events pass
through, re-framed by the wire's writer (the same bytes the node sent for them), while the named events
`payment-need-voucher` (answered by posting a voucher), `payment-timeout` and `dcml-receipt` are removed,
because openai's `Stream` parses every event that is not `thread.*` as a chunk (3.51, `_streaming.py`) and would
yield garbage chunks. `[DONE]` is held back until the receipt that follows it is verified, so a consumer that
stops at `[DONE]` (the SDK does) still gets it checked. The two byte streams drive it for the transports.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, cast

import anyio.to_thread
import httpx

from dcml.client.sdk.exchange import Exchange, PaymentTimeout, SealedResponseError
from dcml.client.wire import sse
from dcml.client.wire.e2e import E2EError, ResponseKey, StreamOpener
from dcml.client.wire.receipts import RECEIPT_EVENT, ReceiptError, SignedReceipt
from dcml.client.wire.x402 import NEED_VOUCHER_EVENT, PAYMENT_TIMEOUT_EVENT, NeedVoucher

if TYPE_CHECKING:
    from dcml.client.sdk.transport import AsyncPayingTransport, PayingTransport

_TIMED_OUT = ("the node paused this stream for a voucher and none arrived in time; the answer is cut short (its "
              "receipt was verified and recorded)")


class SseFilter:
    """Sans-IO: splits raw SSE bytes into events, returning what the consumer may see and what the
    payer must handle. `payloads` collects what the receipt's responseHash covers: the data of unnamed
    events only, `[DONE]` included (`client.wire.receipts`, as `parse_sse_stream` reads a stream).
    A stream breaking the reader's bounds raises `client.wire.sse.SseError`."""

    def __init__(self, key: ResponseKey | None = None) -> None:
        self._reader = sse.SseReader()
        self.key = key  # a sealed stream: every data payload and the receipt are opened with it
        self._opener = StreamOpener(key) if key is not None else None
        self.payloads: list[bytes] = []
        self.receipt: SignedReceipt | None = None
        self.receipt_error: str | None = None
        self.done_block: bytes | None = None  # `data: [DONE]`, released once the receipt is verified
        self.timed_out = False

    def feed(self, chunk: bytes) -> list[bytes | NeedVoucher]:
        out: list[bytes | NeedVoucher] = []
        for event in self._reader.feed(chunk):
            self._event(event, out)
        return out

    def close(self) -> None:
        """The stream ended: an event it cut short is dropped (never passed on half)."""
        self._reader.close()

    def _event(self, event: sse.Event, out: list[bytes | NeedVoucher]) -> None:
        payload = event.data
        if event.name == RECEIPT_EVENT:
            try:
                self.receipt = SignedReceipt.from_json(payload if self.key is None
                                                       else self.key.open_aux("receipt", payload))
            except (ReceiptError, E2EError) as exc:
                self.receipt_error = str(exc)
            return
        if event.unnamed:
            if self._opener is not None:
                try:
                    payload = self._opener.open(payload)
                except E2EError as exc:
                    raise SealedResponseError(f"a sealed stream chunk does not open: {exc}") from exc
            self.payloads.append(payload)
            data = sse.data_event(payload)
            if payload == sse.DONE:
                self.done_block = data
            else:
                out.append(data)
        elif event.name == NEED_VOUCHER_EVENT:
            out.append(NeedVoucher.model_validate_json(payload))
        elif event.name == PAYMENT_TIMEOUT_EVENT:
            self.timed_out = True
        # any other named event is the node's business, not the OpenAI consumer's: dropped


class PaidStream(httpx.SyncByteStream):
    def __init__(self, transport: PayingTransport, upstream: httpx.Response, exchange: Exchange,
                 url: httpx.URL, key: ResponseKey | None = None) -> None:
        self.transport, self.upstream, self.exchange, self.url = transport, upstream, exchange, url
        self.filter = SseFilter(key)

    def __iter__(self) -> Iterator[bytes]:
        payer = self.transport.payer
        try:
            # Raw bytes (identity encoding was asked for); a sync transport answers with a sync stream.
            for chunk in cast(httpx.SyncByteStream, self.upstream.stream):
                for item in self.filter.feed(chunk):
                    if isinstance(item, NeedVoucher):
                        self.transport.post_voucher(self.url, payer.on_need_voucher(item, self.exchange))
                    else:
                        yield item
        except (httpx.HTTPError, sse.SseError):
            payer.on_aborted(self.exchange)
            raise
        self.filter.close()
        self.exchange.finished = True
        settle = payer.on_receipt(self.exchange, self.filter.receipt, sse_payloads=self.filter.payloads)
        self.transport.settle(self.url, settle)
        if self.filter.timed_out:
            raise PaymentTimeout(_TIMED_OUT)
        if self.filter.done_block is not None:
            yield self.filter.done_block

    def close(self) -> None:
        if not self.exchange.finished:
            self.transport.payer.on_aborted(self.exchange)
        self.upstream.close()


class AsyncPaidStream(httpx.AsyncByteStream):
    def __init__(self, transport: AsyncPayingTransport, upstream: httpx.Response, exchange: Exchange,
                 url: httpx.URL, key: ResponseKey | None = None) -> None:
        self.transport, self.upstream, self.exchange, self.url = transport, upstream, exchange, url
        self.filter = SseFilter(key)

    async def __aiter__(self) -> AsyncIterator[bytes]:
        payer = self.transport.payer
        try:
            async for chunk in cast(httpx.AsyncByteStream, self.upstream.stream):
                for item in self.filter.feed(chunk):
                    if isinstance(item, NeedVoucher):
                        voucher = await anyio.to_thread.run_sync(payer.on_need_voucher, item, self.exchange)
                        await self.transport.post_voucher(self.url, voucher)
                    else:
                        yield item
        except (httpx.HTTPError, sse.SseError):
            await anyio.to_thread.run_sync(payer.on_aborted, self.exchange)
            raise
        self.filter.close()
        self.exchange.finished = True
        settle = await anyio.to_thread.run_sync(
            lambda: payer.on_receipt(self.exchange, self.filter.receipt, sse_payloads=self.filter.payloads))
        await self.transport.settle(self.url, settle)
        if self.filter.timed_out:
            raise PaymentTimeout(_TIMED_OUT)
        if self.filter.done_block is not None:
            yield self.filter.done_block

    async def aclose(self) -> None:
        if not self.exchange.finished:
            await anyio.to_thread.run_sync(self.transport.payer.on_aborted, self.exchange)
        await self.upstream.aclose()
