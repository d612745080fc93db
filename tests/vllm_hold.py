"""Test-only ASGI middleware loaded into the session's vLLM (`--middleware tests.vllm_hold.HoldBack`).

A request whose JSON `user` is "hold-after-N" gets the first N pieces of its streamed body, then vLLM holds the rest
back for good: a test can then kill vLLM at a moment where it certainly has not sent the whole answer, however the
machine's load orders vLLM, the node and the client. Every other request passes untouched. Runs inside vLLM's own
virtualenv: standard library only.
"""

from __future__ import annotations

import asyncio
import json

PREFIX = "hold-after-"


class HoldBack:
    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        messages, body = [], b""
        while True:  # read the whole body to find the marker, then hand the same messages on
            message = await receive()
            messages.append(message)
            body += message.get("body", b"")
            if message["type"] != "http.request" or not message.get("more_body"):
                break

        async def replay():
            return messages.pop(0) if messages else await receive()

        try:
            user = json.loads(body).get("user")
        except (ValueError, AttributeError):
            user = None
        if not (isinstance(user, str) and user.startswith(PREFIX)):
            await self.app(scope, replay, send)
            return
        left = int(user[len(PREFIX):])

        async def holding_send(message) -> None:
            nonlocal left
            if message["type"] == "http.response.body" and message.get("body"):
                if left <= 0:
                    await asyncio.Event().wait()  # never set: held until the test kills vLLM
                left -= 1
            await send(message)

        await self.app(scope, replay, holding_send)
