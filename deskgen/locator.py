"""The locating stage: where named products are in an image, with OWLv2 (open-vocabulary detection).

Ray-free on purpose: ``deployments/locator.py`` wraps a :class:`Locator` and adds batching and
``user_config``; unit tests drive this class directly on the tiny OWLv2 (``deskgen.tools.tiny_owl``).

How a batch is located (:meth:`Locator.locate_batch`):
  1. Each product becomes the text query "a photo of a <product>" (OWL-ViT's prompt template). Images
     with fewer products than the longest list in the batch get padding queries; their columns are ignored.
  2. The image processor pads every image to a square (grey, right or below) and resizes it to the model's
     input (960 px for owlv2-base); the text and vision towers run once for the whole batch.
  3. :func:`deskgen.boxes.product_boxes` turns each image's logits and boxes into products (threshold,
     overlapping boxes merged, pixels and [0, 1] coordinates of the original image).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from deskgen.boxes import product_boxes
from deskgen.contracts import LocatedProduct
from deskgen.devices import placement
from deskgen.errors import ModelFilesMissing
from deskgen.images import to_rgb
from deskgen.paths import resolve_model_id

if TYPE_CHECKING:
    import torch
    from PIL import Image

log = logging.getLogger(__name__)

DEFAULT_MODEL_ID = "google/owlv2-base-patch16-ensemble"
#: OWL-ViT's text-query template: the detector was trained on captions, not bare nouns.
QUERY_TEMPLATE = "a photo of a {}"
#: The query that fills an image's unused columns in a batch (ignored in the results).
PAD_QUERY = " "


@dataclass(frozen=True)
class LocateSettings:
    """How detections become products (the deployment's ``user_config`` fields of the same names)."""

    threshold: float = 0.2
    nms_iou: float = 0.3
    max_instances: int = 4


class Locator:
    """OWLv2 product location. Calls only read the model, so they are thread-safe (and compete for it)."""

    def __init__(self, model: Any, processor: Any, *, device: str) -> None:
        import torch

        self.device = str(torch.device(device))
        self._model = model.to(self.device).eval()
        self._dtype: torch.dtype = next(self._model.parameters()).dtype
        self._processor = processor

    @classmethod
    def from_pretrained(cls, model_id: str = DEFAULT_MODEL_ID, *, device: str | None = None,
                        dtype: str | None = None) -> Locator:  # fmt: skip
        """Load an OWLv2 checkpoint: a hub id or a local folder (relative paths resolve against the project
        root). Defaults: ``cuda`` + ``float16`` where a GPU is available, ``cpu`` + ``float32`` otherwise.
        :class:`ModelFilesMissing` names the path when the files are not there."""
        from transformers import Owlv2ForObjectDetection, Owlv2ImageProcessorPil, Owlv2Processor

        location = resolve_model_id(model_id)
        is_local = Path(location).is_absolute()
        if is_local and not Path(location).is_dir():
            raise ModelFilesMissing("OWLv2 locator model", location)
        device, torch_dtype = placement(device, dtype)
        start = time.perf_counter()
        try:
            model = Owlv2ForObjectDetection.from_pretrained(location, dtype=torch_dtype)
            # The PIL image processor explicitly: the same pixels with or without torchvision.
            processor = Owlv2Processor.from_pretrained(location, image_processor=Owlv2ImageProcessorPil.from_pretrained(location))
        except OSError as exc:
            hint = (
                "the folder lacks OWLv2 model files; rebuild the tiny models with `make models`"
                if is_local
                else f"download it where there is internet (`hf download {model_id}`) into the Hugging Face "
                "cache, or point `locator_model` at a local folder"
            )
            raise ModelFilesMissing("OWLv2 locator model", location, hint=f"{hint} ({exc})") from exc
        locator = cls(model, processor, device=device)
        log.info("OWLv2 locator loaded from %s on %s (%s) in %.2f s", location, locator.device,
                 str(torch_dtype).removeprefix("torch."), time.perf_counter() - start)  # fmt: skip
        return locator

    def detect_batch(self, images: Sequence[Image.Image], products: Sequence[Sequence[str]]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Raw detections per image: ``(logits, boxes)``, logits (queries, products of that image) and boxes
        (queries, 4) as ``(cx, cy, w, h)`` relative to the image's padded square."""
        import torch

        if len(images) != len(products):
            raise ValueError(f"{len(images)} images but {len(products)} product lists")
        widest = max((len(p) for p in products), default=0)
        if widest == 0:
            return [(np.zeros((0, 0)), np.zeros((0, 4))) for _ in images]
        queries = [[QUERY_TEMPLATE.format(p) for p in ps] + [PAD_QUERY] * (widest - len(ps)) for ps in products]
        inputs = self._processor(text=queries, images=[to_rgb(im) for im in images], return_tensors="pt", truncation=True)
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(self._dtype)
        with torch.inference_mode():
            out = self._model(**inputs)
        logits = out.logits.float().cpu().numpy()
        boxes = out.pred_boxes.float().cpu().numpy()
        return [(logits[i, :, : len(ps)], boxes[i]) for i, ps in enumerate(products)]

    def locate_batch(
        self, images: Sequence[Image.Image], products: Sequence[Sequence[str]], settings: LocateSettings = LocateSettings()
    ) -> list[tuple[LocatedProduct, ...]]:
        """Products per image (see :func:`deskgen.boxes.product_boxes`)."""
        detections = self.detect_batch(images, products)
        return [
            product_boxes(logits, boxes, ps, width=im.width, height=im.height, threshold=settings.threshold,
                          nms_iou=settings.nms_iou, max_instances=settings.max_instances)
            for im, ps, (logits, boxes) in zip(images, products, detections, strict=True)
        ]  # fmt: skip
