"""The OWLv2 locator on the tiny detector: loads through from_pretrained, batches product lists of different
lengths exactly like single calls, answers boxes inside each image."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from deskgen.errors import ModelFilesMissing
from deskgen.locator import LocateSettings, Locator
from deskgen.tools.samples import desk_scene

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def locator(tiny_models: Path) -> Locator:
    return Locator.from_pretrained(str(tiny_models / "owlv2"))


def test_a_batch_equals_single_calls_whatever_the_list_lengths(locator: Locator) -> None:
    images = [desk_scene(np.random.default_rng(1), 96), Image.new("RGB", (120, 60), (40, 90, 160))]
    products = [("monitor", "keyboard", "lamp"), ("mug",)]
    batch = locator.detect_batch(images, products)
    for image, names, (logits, boxes) in zip(images, products, batch, strict=True):
        ((single_logits, single_boxes),) = locator.detect_batch([image], [names])
        assert logits.shape == (36, len(names)) and boxes.shape == (36, 4)  # a 6x6 grid of query boxes
        np.testing.assert_allclose(logits, single_logits, atol=1e-4)
        np.testing.assert_allclose(boxes, single_boxes, atol=1e-5)


def test_every_box_lies_inside_its_image_and_a_threshold_above_the_best_score_finds_nothing(locator: Locator) -> None:
    images = [Image.new("RGB", (160, 90), (200, 180, 150)), Image.new("RGB", (48, 100), (10, 10, 10))]
    products = [("monitor", "chair"), ("plant",)]
    found = locator.locate_batch(images, products, LocateSettings(threshold=0.0, max_instances=3))
    for image, items in zip(images, found, strict=True):
        for item in items:
            assert item.found and 1 <= len(item.instances) <= 3
            for instance in item.instances:
                x0, y0, x1, y1 = instance.box
                assert 0 <= x0 < x1 <= image.width and 0 <= y0 < y1 <= image.height
    # The threshold decides, per product, against the scores actually produced: just under a product's best
    # score finds it, just over it finds nothing (scores are reported to 4 decimals). Each side can fail.
    best = {(i, item.product): max(x.score for x in item.instances) for i, items in enumerate(found) for item in items}
    for (i, product), score in best.items():
        assert 0.0 < score < 1.0, (product, score)  # the tiny detector's sigmoid scores: room on both sides
        under = locator.locate_batch([images[i]], [(product,)], LocateSettings(threshold=score - 1e-4))
        at = locator.locate_batch([images[i]], [(product,)], LocateSettings(threshold=score + 1e-4))
        assert under[0][0].found and max(x.score for x in under[0][0].instances) == pytest.approx(score, abs=1e-6)
        assert not at[0][0].found, (product, score)


def test_long_product_names_are_cut_to_the_text_tower_and_empty_batches_are_fine(locator: Locator) -> None:
    image = Image.new("RGB", (64, 64))
    ((logits, _),) = locator.detect_batch([image], [("an ergonomic mesh office chair with a tall adjustable headrest",)])
    assert logits.shape == (36, 1)
    assert locator.detect_batch([image], [()])[0][0].shape == (0, 0)


def test_a_missing_folder_names_its_path(tmp_path: Path) -> None:
    with pytest.raises(ModelFilesMissing, match="OWLv2 locator model not found"):
        Locator.from_pretrained(str(tmp_path / "nowhere"))
