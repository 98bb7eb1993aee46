"""Product location (OWLv2) as a Ray Serve deployment on a fractional GPU (cpu without one), batched."""

from __future__ import annotations

import io
import os
from typing import TYPE_CHECKING

from pydantic import Field
from ray import serve

from deployments.batched import BatchConfig, BatchedStage
from deskgen.boxes import clean_products
from deskgen.contracts import LocatedProduct, ProductLocation
from deskgen.limits import MAX_INSTANCES

if TYPE_CHECKING:
    from PIL import Image

    from deskgen.locator import Locator as OwlLocator


class LocatorConfig(BatchConfig):
    """The locator's ``user_config``."""

    threshold: float = Field(0.2, ge=0.0, le=1.0, description="a product counts as found above this score")
    nms_iou: float = Field(0.3, gt=0.0, le=1.0, description="boxes overlapping more than this are one instance")
    max_instances: int = Field(4, ge=1, le=MAX_INSTANCES, description="instances reported per product")


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=16)
class Locator(BatchedStage[LocatorConfig, "tuple[Image.Image, tuple[str, ...]]", "tuple[LocatedProduct, ...]"]):
    """Finds products in images. Concurrent requests are located in one batch. ``locator`` injects an
    already loaded model (tests); otherwise ``model_id`` loads one."""

    stage = "locator"
    config_model = LocatorConfig

    def __init__(self, model_id: str, device: str | None = None, dtype: str | None = None, *,
                 locator: OwlLocator | None = None) -> None:  # fmt: skip
        super().__init__(self.locate_batch)
        if locator is None:
            from deskgen.locator import Locator as OwlLocator

            locator = OwlLocator.from_pretrained(model_id, device=device, dtype=dtype)
        self.locator = locator

    async def locate_batch(self, items: list[tuple[Image.Image, tuple[str, ...]]]) -> list[tuple[LocatedProduct, ...]]:
        from deskgen.locator import LocateSettings

        settings = LocateSettings(threshold=self.config.threshold, nms_iou=self.config.nms_iou,
                                  max_instances=self.config.max_instances)  # fmt: skip
        found, _ = await self.run_model(self.locator.locate_batch, [i for i, _ in items], [p for _, p in items], settings)
        return found

    async def locate(self, image: Image.Image | bytes, products: tuple[str, ...]) -> ProductLocation:
        """Where ``products`` are in ``image`` (a PIL image, or encoded bytes such as a generated PNG)."""
        if isinstance(image, bytes):
            from PIL import Image

            with Image.open(io.BytesIO(image)) as opened:
                image = opened.convert("RGB")
        products = clean_products(products)
        found = await self.batcher.submit((image, products))
        return ProductLocation(status="ok", items=found, threshold=self.config.threshold, width=image.width, height=image.height)

    def stats(self) -> dict[str, int]:
        """Batches and images located since start, and this replica's process id."""
        return super().stats() | {"pid": os.getpid()}
