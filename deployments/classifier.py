"""The desk gate as a Ray Serve deployment: CPU replicas, concurrent requests batched.

Batching uses :class:`deskgen.batching.DynamicBatcher` rather than ``@serve.batch``, which in Serve
2.60 forms batches while the previous one runs and so yields batches of one under real load (see
deskgen/batching.py and BENCHMARKS.md). Only this deployment's process imports TensorFlow (inside
:class:`deskgen.classifier.DeskClassifier`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field
from ray import serve

from deployments import metrics
from deployments.logs import stamp_library_logs
from deskgen.batching import DynamicBatcher
from deskgen.contracts import GateVerdict

if TYPE_CHECKING:
    from PIL import Image

    from deskgen.classifier import DeskClassifier

log = logging.getLogger("ray.serve")


class ClassifierConfig(BaseModel):
    """The classifier's ``user_config``: cheap knobs changed without restarting replicas."""

    model_config = ConfigDict(extra="forbid")

    threshold: float = Field(0.5, ge=0.0, le=1.0, description="score >= threshold means a desk setup")
    max_batch_size: int = Field(8, ge=1, le=64, description="images per forward pass")
    batch_wait_timeout_s: float = Field(
        0.01, ge=0.0, le=1.0, description="an idle replica waits this long for a first batch to fill"
    )


@serve.deployment(ray_actor_options={"num_cpus": 1}, max_ongoing_requests=16)
class Classifier:
    """Scores photos with the VGG16 gate; batches concurrent requests into one forward pass. ``gate``
    injects an already loaded :class:`DeskClassifier` (tests); otherwise ``model_path`` loads one."""

    def __init__(self, model_path: str, tf_threads: int | None = None, *, gate: DeskClassifier | None = None) -> None:
        stamp_library_logs()
        if gate is None:
            from deskgen.classifier import DeskClassifier
            from deskgen.paths import resolve

            gate = DeskClassifier.load(resolve(model_path), intra_op_threads=tf_threads)
        self.gate = gate
        self.config = ClassifierConfig()
        self.batcher = DynamicBatcher(self.classify_batch, max_batch_size=self.config.max_batch_size,
                                      max_wait_s=self.config.batch_wait_timeout_s)

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        self.config = ClassifierConfig.model_validate(user_config)
        self.gate.threshold = self.config.threshold
        self.batcher.configure(max_batch_size=self.config.max_batch_size, max_wait_s=self.config.batch_wait_timeout_s)

    async def classify_batch(self, images: list[Image.Image]) -> list[GateVerdict]:
        start = time.perf_counter()
        scores = await asyncio.to_thread(self.gate.score_batch, images)
        seconds = time.perf_counter() - start
        threshold = self.config.threshold
        metrics.batch_size("classifier", len(images))
        metrics.gate_scores(list(scores), threshold)
        return [
            GateVerdict(score=s, is_desk=s >= threshold, threshold=threshold, batch_size=len(images), seconds=seconds)
            for s in scores
        ]

    async def classify(self, image: Image.Image) -> GateVerdict:
        """The verdict for one RGB image (batched with concurrent calls)."""
        return await self.batcher.submit(image)

    def check_health(self) -> None:
        """Raise if the model keeps failing (Serve then replaces the replica)."""
        self.batcher.check_health()

    def stats(self) -> dict[str, int]:
        return self.batcher.stats()

    def ping(self) -> str:
        return "ok"
