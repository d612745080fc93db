"""One group-commit writer: items submitted while a commit is on disk go together in the next one.

Each commit costs one fsync however many requests wait on it, so concurrent vouchers, charges, receipts and
acceptances share the disk's latency instead of queueing behind each other. The commit runs on the writer's
own thread (SQLite connections must not be used from two threads at once); the event loop only waits.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")

class GroupCommitWriter(Generic[T, R]):
    """`commit` writes a batch in one transaction and returns one result per item: an exception for an item it
    refused (the others still commit). If it raises, the whole batch failed and nothing in it was committed."""

    def __init__(self, commit: Callable[[list[T]], list[Any]], *, name: str) -> None:
        self._commit = commit
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._pending: list[tuple[T, asyncio.Future[R]]] = []
        self._flusher: asyncio.Task[None] | None = None

    async def submit(self, item: T) -> R:
        """The item's result once its commit is durable; raises what refused it."""
        fut: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._pending.append((item, fut))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())
        return await fut

    async def _flush(self) -> None:
        loop = asyncio.get_running_loop()
        while self._pending:
            batch, self._pending = self._pending, []
            try:
                results = await loop.run_in_executor(self._executor, self._commit, [item for item, _ in batch])
            except Exception as exc:  # nothing in the batch was committed
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            for (_, fut), result in zip(batch, results, strict=True):
                if fut.done():
                    continue
                if isinstance(result, BaseException):
                    fut.set_exception(result)
                else:
                    fut.set_result(result)

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run `fn` on the writer's thread (a read on the connection the commits use)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """`run` for another thread: blocks until `fn` has run on the writer's thread."""
        return self._executor.submit(fn, *args).result()

    async def drain(self) -> None:
        """Wait until every submitted item is committed (or refused)."""
        if self._flusher is not None:
            await asyncio.shield(self._flusher)

    def close(self) -> None:
        self._executor.shutdown(wait=True)
