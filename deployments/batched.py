"""What the three batched stages (classifier, captioner, locator) share: :class:`BatchedStage`.

Each stage is its own ``@serve.deployment`` (own resources, own ``user_config`` model) and keeps only
what is its own: loading its model, the per-batch model call and its typed result. The base holds the
rest: the typed ``user_config`` applied by ``reconfigure``, the batcher and its re-tuning, the
``deskgen_batch_size`` metric, ``stats``, the health check, ``ping`` and request-id log stamping.

Batching uses :class:`deskgen.batching.DynamicBatcher` rather than ``@serve.batch``, which in Serve 2.60
forms batches while the previous one runs and so yields batches of one under real load (see
deskgen/batching.py and BENCHMARKS.md): here a batch forms when the model is free.

A plain class without a Serve decorator: a stage decorated in place is pickled by value, and this base,
importable from here, travels by reference with it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar, Generic, ParamSpec, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from deployments import metrics
from deployments.logs import stamp_library_logs
from deskgen.batching import DynamicBatcher


class BatchConfig(BaseModel):
    """The ``user_config`` knobs every batched stage has; a stage's config model adds its own (and may
    narrow these two, as the captioner does)."""

    model_config = ConfigDict(extra="forbid")

    max_batch_size: int = Field(8, ge=1, le=64, description="items per forward pass")
    batch_wait_timeout_s: float = Field(
        0.01, ge=0.0, le=1.0, description="an idle replica waits this long for a first batch to fill"
    )


ConfigT = TypeVar("ConfigT", bound=BatchConfig)
ItemT = TypeVar("ItemT")
ResultT = TypeVar("ResultT")
P = ParamSpec("P")
R = TypeVar("R")


class BatchedStage(Generic[ConfigT, ItemT, ResultT]):
    """A model stage that answers each request from a batch of concurrent ones.

    A subclass declares :attr:`stage` (its ``deskgen_batch_size`` label) and :attr:`config_model` (its
    ``user_config`` model), calls ``super().__init__(self.<its>_batch)`` first in its ``__init__`` (so the
    model loading that follows logs with request ids), submits items with ``self.batcher.submit`` and
    overrides :meth:`apply_config` to hand its own settings to its model."""

    #: The ``stage`` label of ``deskgen_batch_size``.
    stage: ClassVar[str]
    #: The stage's ``user_config`` model (Serve's ``reconfigure`` validates into it).
    config_model: type[ConfigT]

    def __init__(self, run_batch: Callable[[list[ItemT]], Awaitable[list[ResultT]]]) -> None:
        """``run_batch``: the stage's model call on one batch (a coroutine function returning one result
        per item); the batcher calls it one batch at a time."""
        stamp_library_logs()
        self._run_batch = run_batch
        self.config: ConfigT = self.config_model()
        self.batcher: DynamicBatcher[ItemT, ResultT] = DynamicBatcher(
            self._measured_batch, max_batch_size=self.config.max_batch_size, max_wait_s=self.config.batch_wait_timeout_s
        )

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Serve's ``user_config``: validated whole first (a bad one changes nothing), then applied."""
        config = self.config_model.model_validate(user_config)
        self.apply_config(config)
        self.config = config
        self.batcher.configure(max_batch_size=config.max_batch_size, max_wait_s=config.batch_wait_timeout_s)

    def apply_config(self, config: ConfigT) -> None:
        """Hand a new, valid config's own settings to the model (before it becomes :attr:`config`)."""

    async def _measured_batch(self, items: list[ItemT]) -> list[ResultT]:
        results = await self._run_batch(items)
        metrics.batch_size(self.stage, len(items))
        return results

    @staticmethod
    async def run_model(fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> tuple[R, float]:
        """``fn(*args, **kwargs)`` in a worker thread, and its seconds. The event loop keeps taking
        requests meanwhile; Serve's request context (the id stamped on log lines) goes along."""
        start = time.perf_counter()
        result = await asyncio.to_thread(fn, *args, **kwargs)
        return result, time.perf_counter() - start

    def stats(self) -> dict[str, int]:
        """Batches and items since start, the largest recent batch and the recent window's length."""
        return self.batcher.stats()

    def check_health(self) -> None:
        """Raise if the model keeps failing (Serve then replaces the replica)."""
        self.batcher.check_health()

    def ping(self) -> str:
        return "ok"
