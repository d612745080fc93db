"""The trio-in-a-thread bridge: asyncio keeps running while trio works; errors and stop behave."""

from __future__ import annotations

import asyncio

import pytest
import trio

from dcml.client.network.bridge import BridgeError, TrioThread


async def _nothing(nursery: trio.Nursery) -> str:
    return "ready"


async def _slow(x: int) -> int:
    await trio.sleep(0.3)
    return x * 2


async def _boom() -> None:
    raise ValueError("from trio")


def test_asyncio_stays_responsive_while_trio_works() -> None:
    bridge = TrioThread()
    assert bridge.start(_nothing) == "ready"

    async def main() -> tuple[list[int], int]:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.01)

        t = asyncio.create_task(ticker())
        results = await asyncio.gather(*(bridge.acall(_slow, i) for i in range(20)))
        t.cancel()
        return results, ticks

    try:
        results, ticks = asyncio.run(main())
        assert results == [i * 2 for i in range(20)]
        assert ticks >= 10  # the 0.3 s of trio work ran concurrently with the asyncio loop
        with pytest.raises(ValueError, match="from trio"):
            bridge.call(_boom, timeout=5)
        assert bridge.call(_slow, 4, timeout=5) == 8  # an error does not kill the thread
    finally:
        bridge.stop()
    bridge.stop()  # idempotent
    with pytest.raises(BridgeError):
        bridge.call(_slow, 1)


def test_setup_failure_surfaces() -> None:
    async def bad(nursery: trio.Nursery) -> None:
        raise RuntimeError("no listen address")

    bridge = TrioThread()
    with pytest.raises(RuntimeError, match="no listen address"):
        bridge.start(bad, timeout=5)
