"""What a call to a node gives back: a `ChatResult`, a `ChatStream` of text deltas (read with the wire's SSE
reader), or a `NodeError` with the node's own status and code."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx

from dcml.client.chain.sla import Broken
from dcml.client.sdk.exchange import EXCHANGE_EXTENSION, Exchange
from dcml.client.wire import sse
from dcml.client.wire.errors import DcmlError, read_error
from dcml.client.wire.receipts import SignedReceipt


class NodeError(DcmlError):
    """The node answered with an error; `status` and `code` are the node's (`code` is also the `reason`)."""

    def __init__(self, status: int, code: str | None, message: str) -> None:
        super().__init__(f"node answered {status}{f' ({code})' if code else ''}: {message}",
                         reason=code or "node_error")
        self.status, self.code = status, code


def node_error(response: httpx.Response) -> NodeError:
    code, message = read_error(response.content)
    return NodeError(response.status_code, code, response.text[:300] if message is None else message)


@dataclass(frozen=True)
class ChatResult:
    text: str
    usage: dict[str, int] | None
    receipt: SignedReceipt | None
    cost: int  # wei, from the verified receipt
    channel_id: str | None
    response: dict[str, Any] | None = None  # the full JSON body (non-streamed)
    sla_broken: Broken = Broken.NONE  # terms the receipt breaks: a claim is pending in `Client.disputes`
    sealed: bool = False  # the request and its answer travelled sealed end to end


@dataclass
class ChatStream:
    """Iterate for text deltas; `result` is set once the stream ended and its receipt verified."""

    _client: httpx.Client
    _path: str
    _body: bytes
    result: ChatResult | None = None
    _parts: list[str] = field(default_factory=list)
    _sla_of: Callable[[SignedReceipt | None], Broken] | None = None

    def __iter__(self) -> Iterator[str]:
        usage = None
        with self._client.stream("POST", self._path, content=self._body,
                                 headers={"Content-Type": "application/json"}) as response:
            if response.status_code >= 400:
                response.read()
                raise node_error(response)
            exchange: Exchange = response.extensions[EXCHANGE_EXTENSION]
            reader = sse.SseReader()
            for chunk in response.iter_bytes():
                for event in reader.feed(chunk):
                    if not event.unnamed or event.data == sse.DONE:
                        continue
                    obj = json.loads(event.data)
                    if obj.get("error"):
                        code, message = read_error(obj)
                        raise NodeError(200, code, str(message))
                    usage = obj.get("usage") or usage
                    for choice in obj.get("choices") or []:
                        delta = (choice.get("delta") or {}).get("content") or choice.get("text")
                        if delta:
                            self._parts.append(delta)
                            yield delta
            reader.close()
        broken = self._sla_of(exchange.receipt) if self._sla_of else Broken.NONE
        self.result = ChatResult("".join(self._parts), usage, exchange.receipt, exchange.cost, exchange.channel_id,
                                 sla_broken=broken, sealed=exchange.sealed)
