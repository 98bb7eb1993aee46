"""Dynamic batching for a model that runs one batch at a time.

Why not ``@serve.batch``: in Ray Serve 2.60 its loop forms the next batch ``batch_wait_timeout_s``
after the first request arrives, even while the previous batch is still running; formed batches then
wait for the model one after another. Requests that arrive spread out over a long forward pass
therefore queue as many batches of one (measured: mean batch 1.1 under 8 concurrent clients on the
full-size VGG16 gate, see BENCHMARKS.md). Here the next batch is formed when the model becomes free,
from everything that queued meanwhile — the rule of Triton's and TF Serving's dynamic batchers.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

from deskgen.limits import UNHEALTHY_AFTER_FAILURES

T = TypeVar("T")
R = TypeVar("R")

#: How many recent batch sizes :attr:`DynamicBatcher.batch_sizes` keeps (a replica lives for days).
BATCH_WINDOW = 1024


class DynamicBatcher(Generic[T, R]):
    """Groups concurrent :meth:`submit` calls into calls of ``run_batch``, one batch at a time.

    - A batch holds at most ``max_batch_size`` items, in arrival order.
    - When the model is idle, the first item waits at most ``max_wait_s`` for others to join.
    - When the model becomes free, whatever queued meanwhile runs at once, without waiting.
    - ``run_batch`` must return one result per item; if it raises, every caller of that batch gets
      the exception. A caller that was cancelled before its batch started is left out.
    """

    def __init__(self, run_batch: Callable[[list[T]], Awaitable[list[R]]], *, max_batch_size: int = 8,
                 max_wait_s: float = 0.01) -> None:
        self._run_batch = run_batch
        self.configure(max_batch_size=max_batch_size, max_wait_s=max_wait_s)
        self._queue: list[tuple[T, asyncio.Future[R]]] = []
        self._arrived = asyncio.Event()
        self._worker: asyncio.Task[None] | None = None
        #: Sizes of the last :data:`BATCH_WINDOW` batches; the totals count every batch since start.
        self.batch_sizes: deque[int] = deque(maxlen=BATCH_WINDOW)
        self.batches_total = 0
        self.items_total = 0
        self.failures_in_a_row = 0
        self.last_failure: str | None = None

    def configure(self, *, max_batch_size: int, max_wait_s: float) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1 but is {max_batch_size}")
        if max_wait_s < 0:
            raise ValueError(f"max_wait_s must be >= 0 but is {max_wait_s}")
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s

    async def submit(self, item: T) -> R:
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._queue.append((item, future))
        self._arrived.set()
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        # 1. The model was idle: give concurrent callers max_wait_s to fill the first batch.
        await self._wait_to_fill()
        while self._queue:
            # 2. Take what is queued (up to a full batch); skip callers that gave up.
            batch, self._queue = self._queue[: self.max_batch_size], self._queue[self.max_batch_size :]
            batch = [(item, future) for item, future in batch if not future.cancelled()]
            if not batch:
                continue
            self.batch_sizes.append(len(batch))
            self.batches_total += 1
            self.items_total += len(batch)
            # 3. Run it; meanwhile new arrivals queue up and form the next batch right after.
            try:
                results = await self._run_batch([item for item, _ in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"run_batch returned {len(results)} results for {len(batch)} items")
            except Exception as exc:
                self.failures_in_a_row += 1
                self.last_failure = f"{type(exc).__name__}: {exc}"
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            self.failures_in_a_row = 0
            for (_, future), result in zip(batch, results, strict=True):
                if not future.done():
                    future.set_result(result)

    def stats(self) -> dict[str, int]:
        """Totals since start, and the largest batch in the recent window."""
        return {"batches": self.batches_total, "items": self.items_total,
                "max_batch": max(self.batch_sizes, default=0), "window": len(self.batch_sizes)}  # fmt: skip

    def check_health(self) -> None:
        """Raise RuntimeError once :data:`UNHEALTHY_AFTER_FAILURES` batches in a row failed: a deployment's
        ``check_health`` calls this, so Serve replaces a replica whose model broke."""
        if self.failures_in_a_row >= UNHEALTHY_AFTER_FAILURES:
            raise RuntimeError(f"{self.failures_in_a_row} batches in a row failed; last: {self.last_failure}")

    async def _wait_to_fill(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_wait_s
        while len(self._queue) < self.max_batch_size:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except TimeoutError:
                return
