"""Issue 19, finding 12: the SDK, `client.openai()` and the async client seal every prompt by default.

What the node's socket receives and sends is captured by an ASGI wrapper in front of the real app, so the
test sees exactly what the operator's network (and TLS terminator) would."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from eth_account import Account
from eth_account.signers.local import LocalAccount
from web3 import Web3

from dcml.client.chain.deployment import Deployment
from dcml.client.demo.kit.nodes import MODEL, fund, paid_settings
from dcml.client.sdk.client import ChatResult, ChatStream, Client
from dcml.client.sdk.transport import PayingTransport, SealedResponseError
from dcml.client.wire.e2e import SEALED_CONTENT_TYPE
from dcml.node.api.app import create_app
from dcml.node.api.server import BackgroundServer
from dcml.node.engine.synthetic import SyntheticEngine
from dcml.node.identity import EnclaveIdentity
from dcml.node.tee.simulated import SimulatedProvider

SECRET = "my very private medical question"


class Wire:
    """ASGI wrapper recording every inference request body and every response byte the node sends."""

    def __init__(self, app) -> None:
        self.app = app
        self.requests: list[tuple[dict, bytes]] = []
        self.responses: list[bytes] = []

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].endswith("/completions"):
            return await self.app(scope, receive, send)
        body = bytearray()
        sent = bytearray()

        async def recv():
            message = await receive()
            body.extend(message.get("body", b""))
            return message

        async def snd(message):
            if message["type"] == "http.response.start":
                sent.extend(b"".join(k + b": " + v + b"\n" for k, v in message["headers"]))
            sent.extend(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, recv, snd)
        finally:
            headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
            self.requests.append((headers, bytes(body)))
            self.responses.append(bytes(sent))


@pytest.fixture(scope="module")
def node(w3: Web3, deployment_file: Path, tmp_path_factory) -> Iterator[tuple[str, Wire]]:
    identity = EnclaveIdentity.generate()
    fund(w3, identity.address)
    app = create_app(paid_settings(deployment_file, tmp_path_factory.mktemp("node"), prepay_tokens=0,
                                   credit_tokens=4), engine=SyntheticEngine(model_name=MODEL), identity=identity,
                     provider=SimulatedProvider())
    app.state.node  # noqa: B018 -- created by the factory
    wire = Wire(app)
    server = BackgroundServer(wire).start()
    yield server.url, wire
    server.stop()


@pytest.fixture
def client(node, w3: Web3, deployment: Deployment, tmp_path: Path) -> Iterator[Client]:
    wallet: LocalAccount = Account.create()
    w3.provider.make_request("anvil_setBalance", [wallet.address, hex(10**20)])
    from dcml.client.chain.contracts import contract
    from dcml.client.chain.tx import send

    donor = Account.from_key(deployment.accounts["client"].private_key)
    send(w3, donor, contract(w3, "TestToken", deployment.token).functions.transfer(wallet.address, 10**19),
         action="fund")
    node[1].requests.clear()
    node[1].responses.clear()
    with Client(node[0], wallet, deployment=deployment, allow_simulated=True, store=tmp_path / "s.sqlite",
                deposit=10**17, w3=w3) as c:
        yield c


def _assert_all_sealed(wire: Wire) -> None:
    assert wire.requests, "nothing reached the node"
    for headers, body in wire.requests:
        if "payment-signature" not in headers:
            continue  # the unpaid first try that only fetches the terms is sealed too, but checked below
        assert headers["content-type"] == SEALED_CONTENT_TYPE and headers["x-dcml-sealed"] == "1"
        assert SECRET.encode() not in body and b'"messages"' not in body and b'"prompt"' not in body
    assert all(h["content-type"] == SEALED_CONTENT_TYPE for h, _ in wire.requests)
    for sent in wire.responses:
        # no prompt, no answer text, no receipt or acceptance (their requestHash tests a guess) in clear
        assert SECRET.encode() not in sent and b"requestHash" not in sent and b'"content"' not in sent
        assert b"x-dcml-receipt-id" not in sent.lower()


def test_sdk_seals_by_default(client: Client, node) -> None:
    r = client.chat([{"role": "user", "content": SECRET}], MODEL, max_tokens=6)
    assert isinstance(r, ChatResult) and r.sealed and r.text and r.receipt is not None
    s = client.chat([{"role": "user", "content": SECRET}], MODEL, stream=True, max_tokens=20)
    assert isinstance(s, ChatStream) and "".join(s) and s.result.sealed and s.result.receipt is not None
    assert client.complete(SECRET, MODEL, max_tokens=4).sealed
    assert len(client.receipts()) == 3 and client.violations() == []
    _assert_all_sealed(node[1])


def test_openai_clients_seal_by_default(client: Client, node) -> None:
    oai = client.openai()
    full = oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": SECRET}], max_tokens=5)
    assert full.choices[0].message.content
    chunks = list(oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": SECRET}],
                                              max_tokens=12, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].usage.completion_tokens == 12

    async def run() -> str:
        stream = await client.async_openai().completions.create(model=MODEL, prompt=SECRET, max_tokens=6,
                                                                 stream=True)
        return "".join([c.choices[0].text async for c in stream if c.choices])

    assert asyncio.run(run())
    assert len(client.receipts()) == 3 and client.violations() == []
    _assert_all_sealed(node[1])
    # errors come back sealed and are opened for the caller
    with pytest.raises(openai.NotFoundError) as info:
        oai.chat.completions.create(model="nope", messages=[{"role": "user", "content": SECRET}], max_tokens=2)
    assert info.value.code == "model_not_found"


def test_opt_out_sends_clear(client: Client, node) -> None:
    client.seal = False
    assert not client.chat([{"role": "user", "content": SECRET}], MODEL, max_tokens=3).sealed
    assert any(SECRET.encode() in body for _, body in node[1].requests)


class _Flip(httpx.BaseTransport):
    """On the path: flips one byte of every sealed answer."""

    def __init__(self) -> None:
        self.inner = httpx.HTTPTransport()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self.inner.handle_request(request)
        if response.status_code == 200 and request.url.path.endswith("/completions"):
            body = bytearray(response.read())
            i = body.index(b'"ct":"') + 8
            body[i] = ord("A") if body[i] != ord("A") else ord("B")
            return httpx.Response(200, headers=response.headers, content=bytes(body))
        return response


def test_altered_sealed_answer_is_refused(client: Client) -> None:
    http = httpx.Client(base_url=client.node_url, transport=PayingTransport(client, inner=_Flip()))
    body = {"model": MODEL, "messages": [{"role": "user", "content": SECRET}], "max_tokens": 3}
    with pytest.raises(SealedResponseError):
        http.post("/v1/chat/completions", json=body)
    body["stream"] = True
    with pytest.raises(SealedResponseError), http.stream("POST", "/v1/chat/completions", json=body) as response:
        for _ in response.iter_bytes():
            pass
    assert client.receipts() == []
