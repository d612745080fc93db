"""Runs trio in a dedicated thread and lets asyncio (or plain threads) call into it.

py-libp2p is trio-only; the daemon is asyncio (uvicorn). The trio loop owns one long-lived nursery;
callers hand it coroutine functions and get results back through a future, so neither loop blocks.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import trio

from dcml.client.wire.errors import DcmlError, ErrorType

T = TypeVar("T")


class BridgeError(DcmlError, RuntimeError):
    """The trio thread is not running (never started, stopped, or crashed)."""

    reason = "bridge_down"
    error_type = ErrorType.UNAVAILABLE


class TrioThread:
    """`start(setup)` runs `setup(nursery)` inside trio and returns its result; `stop()` cancels everything."""

    def __init__(self, name: str = "libp2p-trio") -> None:
        self._name = name
        self._thread: threading.Thread | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._nursery: trio.Nursery | None = None
        self._stop: trio.Event | None = None
        self._crash: BaseException | None = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._token is not None

    def start(self, setup: Callable[[trio.Nursery], Awaitable[T]], timeout: float = 30.0) -> T:
        """Blocking: start the thread, run `setup` in trio, return what it returns (or raise what it raised)."""
        if self._thread is not None:
            raise BridgeError("already started")
        started: concurrent.futures.Future[T] = concurrent.futures.Future()

        async def main() -> None:
            self._token = trio.lowlevel.current_trio_token()
            self._stop = trio.Event()
            try:
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    try:
                        result = await setup(nursery)
                    except BaseException as exc:
                        started.set_exception(exc)
                        raise
                    started.set_result(result)
                    await self._stop.wait()
                    nursery.cancel_scope.cancel()
            finally:
                self._nursery = None

        def run() -> None:
            try:
                trio.run(main)
            except BaseException as exc:  # surfaced to callers through `started` or `_crash`
                self._crash = exc
                if not started.done():
                    started.set_exception(exc)

        self._thread = threading.Thread(target=run, name=self._name, daemon=True)
        self._thread.start()
        return started.result(timeout)

    def call(self, fn: Callable[..., Awaitable[T]], *args: Any, timeout: float | None = None) -> T:
        """Blocking, from any thread but the trio one: run `fn(*args)` in the trio nursery, return its result."""
        return self.submit(fn, *args).result(timeout)

    def submit(self, fn: Callable[..., Awaitable[T]], *args: Any) -> concurrent.futures.Future[T]:
        fut: concurrent.futures.Future[T] = concurrent.futures.Future()
        if not self.running or self._nursery is None:
            raise BridgeError(f"the libp2p thread is not running ({self._crash!r})" if self._crash
                              else "the libp2p thread is not running")

        async def runner() -> None:
            try:
                result = await fn(*args)
            except BaseException as exc:  # handed to the caller, never lost in the nursery
                if not fut.cancelled():
                    fut.set_exception(exc)
                if isinstance(exc, trio.Cancelled):
                    raise
            else:
                if not fut.cancelled():
                    fut.set_result(result)

        def schedule() -> None:
            if self._nursery is None:
                fut.set_exception(BridgeError("the libp2p thread is stopping"))
            else:
                self._nursery.start_soon(runner)

        try:
            self._token.run_sync_soon(schedule)  # type: ignore[union-attr]
        except trio.RunFinishedError as exc:
            raise BridgeError("the libp2p thread has stopped") from exc
        return fut

    async def acall(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """From asyncio: await `fn(*args)` run in trio without blocking the asyncio loop."""
        return await asyncio.wrap_future(self.submit(fn, *args))

    def stop(self, timeout: float = 10.0) -> None:
        """Blocking: cancel the nursery (hosts close their listeners) and join the thread. Idempotent."""
        if self._thread is None:
            return
        if self._token is not None and self._stop is not None:
            with contextlib.suppress(trio.RunFinishedError):
                self._token.run_sync_soon(self._stop.set)
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise BridgeError(f"the libp2p thread did not stop within {timeout} s")
        self._thread = None
        self._token = None
