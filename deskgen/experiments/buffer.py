"""The ingress's exposure buffer: a request settles its exposure in memory (no database on its path) and a
background task writes batches to the recorder deployment, retrying until they are stored.

Nothing is dropped. A request takes its place *before* any model runs (:meth:`ExposureBuffer.reserve`); once
``capacity`` exposures wait (the recorder has been unreachable long enough to fill the buffer), new requests
are refused with 503 before they cost anything, while the requests already admitted still settle theirs (so
the buffer may exceed ``capacity`` by the requests in flight, at most the ingress's ``max_ongoing_requests``).
A batch leaves the buffer only once the recorder answered that it committed it; a retry of a batch whose
answer was lost is harmless because the store skips rows it already has.

A delivered image's exposure must not die with the replica: :meth:`Reservation.committed` lets the route
wait until the exposure's batch is committed before the image goes out (bounded: while the store is down,
images still go out and their exposures wait here).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from deskgen.errors import RecorderBacklog
from deskgen.experiments.records import Experiment, Exposure
from deskgen_client.protocol import MixSource

log = logging.getLogger("ray.serve")

#: Writes a batch (and the experiments it refers to) and returns once it is committed; raises otherwise.
Sink = Callable[[list[Experiment], list[Exposure]], Awaitable[Any]]


@dataclass
class BufferStats:
    pending: int = 0
    written: int = 0
    #: Flush attempts that failed (the batch stayed in the buffer and was retried).
    failed_flushes: int = 0
    #: Requests refused with 503 because the buffer was full.
    refused: int = 0
    last_error: str | None = None


@dataclass
class Reservation:
    """A request's place in the buffer, taken before any model runs. :meth:`settle` records the request's
    outcome once; later calls are ignored (the first outcome is the one the client got)."""

    buffer: ExposureBuffer
    experiment: Experiment
    image_id: str
    user_id: str | None
    arm: str | None
    mix_id: str
    mix_source: MixSource
    style: str | None = None
    concept: str | None = None
    api_key: str | None = None
    #: The request's stage timings, filled in as the stages run (recorded as they are at settle time).
    timings: dict[str, float] = field(default_factory=dict)
    settled: bool = False
    #: The exposure's place in the buffer's order (set at settle): committed once the buffer wrote it.
    seq: int = 0

    def settle(self, outcome: str, status: int, *, seed: int | None = None, found_fraction: float | None = None) -> None:
        if self.settled:
            return
        self.settled = True
        exposure = Exposure(
            image_id=self.image_id, experiment_id=self.experiment.id, user_id=self.user_id, arm=self.arm,
            mix_id=self.mix_id, mix_source=self.mix_source, outcome=outcome, status=status, style=self.style,
            seed=seed, timings=dict(self.timings), concept=self.concept, found_fraction=found_fraction,
            api_key=self.api_key,
        )  # fmt: skip
        self.seq = self.buffer._settled(self.experiment, exposure)

    async def committed(self, timeout_s: float) -> bool:
        """Wait until the settled exposure is committed to the store, at most ``timeout_s``; whether it is."""
        return await self.buffer.wait_written(self.seq, timeout_s)


class ExposureBuffer:
    def __init__(self, sink: Sink, *, capacity: int, flush_interval_s: float, batch_size: int = 500,
                 max_backoff_s: float = 5.0, on_settled: Callable[[Exposure], None] | None = None) -> None:  # fmt: skip
        self.sink = sink
        self.on_settled = on_settled
        self.capacity = capacity
        self.flush_interval_s = flush_interval_s
        self.batch_size = batch_size
        self.max_backoff_s = max_backoff_s
        self.stats = BufferStats()
        self._queue: deque[Exposure] = deque()
        self._experiments: dict[str, Experiment] = {}
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        #: Exposures settled so far, and how many of them (a prefix: the queue is FIFO) are committed.
        self._settled_count = 0
        self._written_count = 0
        self._progress = asyncio.Event()
        #: Set while a route waits for a commit: the writer skips the gathering pause.
        self._urgent = asyncio.Event()

    # -- the request side ----------------------------------------------------------------------------

    def reserve(self, experiment: Experiment, **fields: Any) -> Reservation:
        """A place for one request's exposure; :class:`RecorderBacklog` (503) when the buffer is full."""
        if len(self._queue) >= self.capacity:
            self.stats.refused += 1
            raise RecorderBacklog(
                f"deskgen cannot record more requests right now ({len(self._queue)} exposures wait for the "
                "experiment store): retry after Retry-After seconds."
            )
        self._ensure_task()
        return Reservation(self, experiment, **fields)

    def _settled(self, experiment: Experiment, exposure: Exposure) -> int:
        self._experiments[experiment.id] = experiment
        self._queue.append(exposure)
        self._settled_count += 1
        self.stats.pending = len(self._queue)
        self._wake.set()
        if self.on_settled is not None:
            self.on_settled(exposure)
        return self._settled_count

    async def wait_written(self, seq: int, timeout_s: float) -> bool:
        """Wait until the ``seq``-th settled exposure is committed, at most ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        if self._written_count < seq:
            self._urgent.set()
        while self._written_count < seq:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            progress = self._progress
            try:
                await asyncio.wait_for(progress.wait(), remaining)
            except TimeoutError:
                return self._written_count >= seq
        return True

    # -- the writer side -----------------------------------------------------------------------------

    async def flush(self) -> int:
        """Write everything settled so far; raises if the recorder does not commit it (it stays buffered).
        Returns how many exposures this call wrote."""
        written = 0
        async with self._lock:
            while self._queue:
                batch = [self._queue[i] for i in range(min(self.batch_size, len(self._queue)))]
                ids = {e.experiment_id for e in batch}
                try:
                    await self.sink([self._experiments[i] for i in sorted(ids)], batch)
                except Exception as exc:
                    self.stats.failed_flushes += 1
                    self.stats.last_error = f"{type(exc).__name__}: {exc}"[:300]
                    raise
                for _ in batch:
                    self._queue.popleft()
                self._written_count += len(batch)
                self._progress.set()
                self._progress = asyncio.Event()
                written += len(batch)
                self.stats.written += len(batch)
                self.stats.pending = len(self._queue)
                if not any(e.experiment_id in ids for e in self._queue):
                    for i in ids:
                        self._experiments.pop(i, None)
        return written

    def _ensure_task(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        backoff = self.flush_interval_s
        while True:
            await self._wake.wait()
            # Let a burst gather into one batch, unless a route waits for its exposure to be committed: then
            # write now (group commit: what settles while this write is in flight goes in the next one).
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._urgent.wait(), self.flush_interval_s)
            self._wake.clear()
            self._urgent.clear()
            try:
                await self.flush()
                backoff = self.flush_interval_s
            except Exception:
                log.warning("exposure flush failed (%d pending, retry in %.2f s): %s",
                            len(self._queue), backoff, self.stats.last_error)  # fmt: skip
                self._wake.set()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.max_backoff_s)

    async def close(self, timeout_s: float) -> None:
        """Flush what is left, retrying within ``timeout_s`` (the replica is shutting down)."""
        if self._task is not None:
            self._task.cancel()
        deadline = time.monotonic() + timeout_s
        while self._queue and time.monotonic() < deadline:
            try:
                await self.flush()
            except Exception:
                await asyncio.sleep(min(0.5, max(deadline - time.monotonic(), 0)))
        if self._queue:
            log.error("ingress shutting down with %d exposures the experiment store never took", len(self._queue))
