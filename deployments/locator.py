"""Product location (OWLv2) as a Ray Serve deployment on a fractional GPU (cpu without one), batched."""

from __future__ import annotations

import asyncio
import io
import os
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field
from ray import serve

from deployments import metrics
from deployments.logs import stamp_library_logs
from deskgen.batching import DynamicBatcher
from deskgen.boxes import clean_products
from deskgen.contracts import Located, LocatedProduct
from deskgen.limits import MAX_INSTANCES

if TYPE_CHECKING:
    from PIL import Image

    from deskgen.locator import Locator as OwlLocator


class LocatorConfig(BaseModel):
    """The locator's ``user_config``."""

    model_config = ConfigDict(extra="forbid")

    threshold: float = Field(0.2, ge=0.0, le=1.0, description="a product counts as found above this score")
    nms_iou: float = Field(0.3, gt=0.0, le=1.0, description="boxes overlapping more than this are one instance")
    max_instances: int = Field(4, ge=1, le=MAX_INSTANCES, description="instances reported per product")
    max_batch_size: int = Field(8, ge=1, le=64)
    batch_wait_timeout_s: float = Field(0.01, ge=0.0, le=1.0)


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=16)
class Locator:
    """Finds products in images. Concurrent requests are located in one batch. ``locator`` injects an
    already loaded model (tests); otherwise ``model_id`` loads one."""

    def __init__(self, model_id: str, device: str | None = None, dtype: str | None = None, *,
                 locator: OwlLocator | None = None) -> None:  # fmt: skip
        stamp_library_logs()
        if locator is None:
            from deskgen.locator import Locator as OwlLocator

            locator = OwlLocator.from_pretrained(model_id, device=device, dtype=dtype)
        self.locator = locator
        self.config = LocatorConfig()
        self.batcher = DynamicBatcher(self.locate_batch, max_batch_size=self.config.max_batch_size,
                                      max_wait_s=self.config.batch_wait_timeout_s)  # fmt: skip

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        self.config = LocatorConfig.model_validate(user_config)
        self.batcher.configure(max_batch_size=self.config.max_batch_size, max_wait_s=self.config.batch_wait_timeout_s)

    async def locate_batch(self, items: list[tuple[Image.Image, tuple[str, ...]]]) -> list[tuple[LocatedProduct, ...]]:
        from deskgen.locator import LocateSettings

        settings = LocateSettings(threshold=self.config.threshold, nms_iou=self.config.nms_iou,
                                  max_instances=self.config.max_instances)  # fmt: skip
        found = await asyncio.to_thread(self.locator.locate_batch, [i for i, _ in items], [p for _, p in items], settings)
        metrics.batch_size("locator", len(items))
        return found

    async def locate(self, image: Image.Image | bytes, products: tuple[str, ...]) -> Located:
        """Where ``products`` are in ``image`` (a PIL image, or encoded bytes such as a generated PNG)."""
        if isinstance(image, bytes):
            from PIL import Image

            with Image.open(io.BytesIO(image)) as opened:
                image = opened.convert("RGB")
        products = clean_products(products)
        found = await self.batcher.submit((image, products))
        return Located(status="ok", items=found, threshold=self.config.threshold, width=image.width, height=image.height)

    def stats(self) -> dict[str, int]:
        """Batches and images located since start, and this replica's process id."""
        return self.batcher.stats() | {"pid": os.getpid()}

    def check_health(self) -> None:
        """Raise if the model keeps failing (Serve then replaces the replica)."""
        self.batcher.check_health()

    def ping(self) -> str:
        return "ok"
