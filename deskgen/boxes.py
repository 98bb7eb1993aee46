"""From an open-vocabulary detector's raw output to product boxes, and boxes drawn on a copy for people.

Torch-free (numpy and PIL only): the ingress imports it to draw and to check product lists, and the unit
tests drive :func:`product_boxes` with known detector outputs.

OWLv2 scores every query box against every text query independently (a sigmoid per class, trained as
multi-label detection), so each product is thresholded on its own: one box may be both "monitor" and
"screen" if both are asked for. Its boxes are ``(cx, cy, w, h)`` relative to the *padded square* the image
processor made (the image at the top left, grey padding to the right or below), so they scale by the
longer side, and boxes that reach into the padding are clipped to the image.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from deskgen.contracts import LocatedProduct, ProductBox
from deskgen.errors import InvalidParameter
from deskgen.limits import MAX_INSTANCES, MAX_PRODUCT_CHARS, MAX_PRODUCTS
from deskgen_client.rules import PRODUCT_PATTERN, PRODUCT_RULE

if TYPE_CHECKING:
    from PIL import Image

#: A product name: visible text without commas (a form may list products comma-separated) or control
#: characters. Stated in the OpenAPI document; :func:`clean_products` applies the same rule.
#: A box smaller than this (pixels, either side) after clipping to the image is dropped: it lay in the padding.
MIN_BOX_SIDE_PX = 1.0


def clean_products(products: Sequence[str], *, field: str = "products") -> tuple[str, ...]:
    """Strip each name, drop repeats (case-insensitive; the first spelling stays), and check the bounds:
    400 naming the item for a bad name, or the list for too many."""
    cleaned: list[str] = []
    seen: set[str] = set()
    for i, raw in enumerate(products):
        name = raw.strip()
        if not name or len(name) > MAX_PRODUCT_CHARS or not re.fullmatch(PRODUCT_PATTERN, name):
            raise InvalidParameter(f"`{field}[{i}]` is {raw[:60]!r}: a product must be {PRODUCT_RULE}.", field=f"{field}[{i}]")
        if name.casefold() not in seen:
            seen.add(name.casefold())
            cleaned.append(name)
    if len(cleaned) > MAX_PRODUCTS:
        raise InvalidParameter(f"`{field}` names {len(cleaned)} products; at most {MAX_PRODUCTS}.", field=field)
    return tuple(cleaned)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(x, -60.0, 60.0)))


def _iou(box: np.ndarray, others: np.ndarray) -> np.ndarray:
    x0 = np.maximum(box[0], others[:, 0])
    y0 = np.maximum(box[1], others[:, 1])
    x1 = np.minimum(box[2], others[:, 2])
    y1 = np.minimum(box[3], others[:, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (others[:, 2] - others[:, 0]) * (others[:, 3] - others[:, 1])
    return inter / np.maximum(area + areas - inter, 1e-9)


def non_max_suppression(boxes: np.ndarray, scores: np.ndarray, iou: float, limit: int) -> list[int]:
    """Indices of the boxes kept, best first: greedily, a box overlapping a kept one by more than ``iou``
    (intersection over union) is the same object seen again and dropped."""
    order = list(np.argsort(-scores, kind="stable"))
    kept: list[int] = []
    while order and len(kept) < limit:
        best = order.pop(0)
        kept.append(int(best))
        if order:
            overlaps = _iou(boxes[best], boxes[order])
            order = [i for i, o in zip(order, overlaps, strict=True) if o <= iou]
    return kept


def product_boxes(
    logits: np.ndarray,
    boxes: np.ndarray,
    products: Sequence[str],
    *,
    width: int,
    height: int,
    threshold: float,
    nms_iou: float = 0.3,
    max_instances: int = 4,
) -> tuple[LocatedProduct, ...]:
    """Per product: the instances whose score passes ``threshold`` (at most ``max_instances``, overlapping
    detections merged by :func:`non_max_suppression`), in pixels and normalised to [0, 1], best first;
    ``found`` is False when none passes.

    ``logits``: (queries, >= len(products)) raw class logits, column j for ``products[j]`` (extra columns
    are padding queries of a batch and ignored); ``boxes``: (queries, 4) ``(cx, cy, w, h)`` relative to the
    square of side ``max(width, height)``."""
    if logits.ndim != 2 or boxes.shape != (logits.shape[0], 4) or logits.shape[1] < len(products):
        raise ValueError(f"detector output shapes do not match: logits {logits.shape}, boxes {boxes.shape}, "
                         f"{len(products)} products")  # fmt: skip
    if not 1 <= max_instances <= MAX_INSTANCES:
        raise ValueError(f"max_instances must be 1..{MAX_INSTANCES} but is {max_instances}")
    side = float(max(width, height))
    cx, cy, w, h = (boxes[:, i].astype(np.float64) for i in range(4))
    corners = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1) * side
    corners[:, [0, 2]] = np.clip(corners[:, [0, 2]], 0.0, float(width))
    corners[:, [1, 3]] = np.clip(corners[:, [1, 3]], 0.0, float(height))
    inside = ((corners[:, 2] - corners[:, 0]) >= MIN_BOX_SIDE_PX) & ((corners[:, 3] - corners[:, 1]) >= MIN_BOX_SIDE_PX)
    scores = _sigmoid(logits[:, : len(products)].astype(np.float64))
    scale = np.array([width, height, width, height], dtype=np.float64)
    located = []
    for j, product in enumerate(products):
        candidates = np.flatnonzero((scores[:, j] > threshold) & inside)
        keep = non_max_suppression(corners[candidates], scores[candidates, j], nms_iou, max_instances)
        instances = tuple(
            ProductBox(
                box=tuple(round(float(v), 1) for v in corners[candidates[k]]),  # type: ignore[arg-type]
                box_normalized=tuple(round(float(v), 4) for v in corners[candidates[k]] / scale),  # type: ignore[arg-type]
                score=round(float(scores[candidates[k], j]), 4),
            )
            for k in keep
        )
        located.append(LocatedProduct(product=product, found=bool(instances), instances=instances))
    return tuple(located)


#: Box colours of the annotated preview, one per product in turn (readable on light and dark images).
PALETTE = ("#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45")


def annotate(image: Image.Image, products: Sequence[LocatedProduct]) -> Image.Image:
    """A copy of ``image`` with each found instance's box and a label ("monitor 0.43") drawn on it."""
    from PIL import ImageDraw

    copy = image.convert("RGB")
    draw = ImageDraw.Draw(copy)
    line = max(1, round(max(copy.size) / 256))
    for i, item in enumerate(products):
        colour = PALETTE[i % len(PALETTE)]
        for instance in item.instances:
            x0, y0, x1, y1 = instance.box
            draw.rectangle((x0, y0, x1, y1), outline=colour, width=line)
            label = f"{item.product} {instance.score:.2f}"
            left, top, right, bottom = draw.textbbox((x0, y0), label)
            lift = min(bottom - top + 2, y0)  # above the box where it fits, inside it otherwise
            draw.rectangle((left, top - lift, right + 2, bottom - lift), fill=colour)
            draw.text((x0 + 1, y0 - lift), label, fill="white")
    return copy
