"""The desk gate as a Ray Serve deployment: CPU replicas, concurrent requests batched.

Batching, ``reconfigure``, stats and health come from :class:`deployments.batched.BatchedStage`. Only
this deployment's process imports TensorFlow (inside :class:`deskgen.classifier.DeskClassifier`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field
from ray import serve

from deployments import metrics
from deployments.batched import BatchConfig, BatchedStage
from deskgen.contracts import GateVerdict

if TYPE_CHECKING:
    from PIL import Image

    from deskgen.classifier import DeskClassifier


class ClassifierConfig(BatchConfig):
    """The classifier's ``user_config``: cheap knobs changed without restarting replicas."""

    threshold: float = Field(0.5, ge=0.0, le=1.0, description="score >= threshold means a desk setup")


@serve.deployment(ray_actor_options={"num_cpus": 1}, max_ongoing_requests=16)
class Classifier(BatchedStage[ClassifierConfig, "Image.Image", GateVerdict]):
    """Scores photos with the VGG16 gate; batches concurrent requests into one forward pass. ``gate``
    injects an already loaded :class:`DeskClassifier` (tests); otherwise ``model_path`` loads one."""

    stage = "classifier"
    config_model = ClassifierConfig

    def __init__(self, model_path: str, tf_threads: int | None = None, *, gate: DeskClassifier | None = None) -> None:
        super().__init__(self.classify_batch)
        if gate is None:
            from deskgen.classifier import DeskClassifier
            from deskgen.paths import resolve

            gate = DeskClassifier.load(resolve(model_path), intra_op_threads=tf_threads)
        self.gate = gate

    def apply_config(self, config: ClassifierConfig) -> None:
        self.gate.threshold = config.threshold

    async def classify_batch(self, images: list[Image.Image]) -> list[GateVerdict]:
        scores, seconds = await self.run_model(self.gate.score_batch, images)
        threshold = self.config.threshold
        metrics.gate_scores(list(scores), threshold)
        return [
            GateVerdict(score=s, is_desk=s >= threshold, threshold=threshold, batch_size=len(images), seconds=seconds)
            for s in scores
        ]

    async def classify(self, image: Image.Image) -> GateVerdict:
        """The verdict for one RGB image (batched with concurrent calls)."""
        return await self.batcher.submit(image)
