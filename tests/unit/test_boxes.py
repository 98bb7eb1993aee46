"""Box post-processing on known detector outputs: scaling from OWLv2's padded square, clipping, thresholds,
overlapping detections merged, several instances; product lists; the annotated preview."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from deskgen.boxes import annotate, clean_products, non_max_suppression, product_boxes
from deskgen.contracts import LocatedProduct, ProductBox, ProductLocation
from deskgen.errors import InvalidParameter
from deskgen.limits import MAX_PRODUCT_CHARS, MAX_PRODUCTS

pytestmark = pytest.mark.unit


def logit(p: float) -> float:
    return float(np.log(p / (1 - p)))


def test_boxes_scale_by_the_longer_side_and_clip_to_the_image() -> None:
    # A 200x100 image is padded to a 200x200 square below: box coordinates are relative to that square.
    boxes = np.array([
        [0.25, 0.25, 0.2, 0.1],   # inside: x 30..70, y 40..60
        [0.5, 0.45, 0.4, 0.2],    # reaches into the padding (y 70..110): clipped to y <= 100
        [0.5, 0.8, 0.2, 0.2],     # wholly in the padding (y 140..180): dropped
    ])  # fmt: skip
    logits = np.full((3, 1), logit(0.9))
    (monitor,) = product_boxes(logits, boxes, ["monitor"], width=200, height=100, threshold=0.5, nms_iou=0.3)
    assert monitor.found and [i.box for i in monitor.instances] == [(30.0, 40.0, 70.0, 60.0), (60.0, 70.0, 140.0, 100.0)]
    assert monitor.instances[0].box_normalized == (0.15, 0.4, 0.35, 0.6)
    assert monitor.instances[1].box_normalized == (0.3, 0.7, 0.7, 1.0)
    for instance in monitor.instances:
        x0, y0, x1, y1 = instance.box
        assert 0 <= x0 < x1 <= 200 and 0 <= y0 < y1 <= 100
        assert all(0.0 <= v <= 1.0 for v in instance.box_normalized)
        assert instance.score == pytest.approx(0.9)


def test_a_tall_image_scales_by_its_height_and_clips_on_the_right() -> None:
    boxes = np.array([[0.5, 0.5, 0.5, 0.5]])  # the padded square is 120x120; the image 60 wide
    (lamp,) = product_boxes(np.array([[logit(0.6)]]), boxes, ["lamp"], width=60, height=120, threshold=0.5)
    assert lamp.instances[0].box == (30.0, 30.0, 60.0, 90.0)
    assert lamp.instances[0].box_normalized == (0.5, 0.25, 1.0, 0.75)


def test_each_product_is_thresholded_on_its_own_and_not_found_is_explicit() -> None:
    boxes = np.array([[0.2, 0.2, 0.1, 0.1], [0.7, 0.7, 0.1, 0.1]])
    logits = np.array([[logit(0.8), logit(0.3), logit(0.05)],
                       [logit(0.25), logit(0.6), logit(0.1)]])  # fmt: skip
    monitor, lamp, plant = product_boxes(logits, boxes, ["monitor", "lamp", "plant"], width=100, height=100, threshold=0.2)
    assert [i.score for i in monitor.instances] == [0.8, 0.25]  # best first
    assert [i.score for i in lamp.instances] == [0.6, 0.3]
    assert not plant.found and plant.instances == ()
    # The threshold is strict: a score equal to it is not a find.
    (exactly,) = product_boxes(np.array([[0.0]]), boxes[:1], ["mug"], width=100, height=100, threshold=0.5)
    assert not exactly.found


def test_overlapping_detections_of_one_object_merge_and_two_objects_stay_two() -> None:
    boxes = np.array([
        [0.30, 0.5, 0.2, 0.3],    # monitor 1
        [0.31, 0.5, 0.2, 0.3],    # monitor 1 again, slightly shifted (IoU ~0.9): merged
        [0.70, 0.5, 0.2, 0.3],    # monitor 2
        [0.71, 0.5, 0.2, 0.3],    # monitor 2 again
    ])  # fmt: skip
    logits = np.array([[logit(0.7)], [logit(0.9)], [logit(0.6)], [logit(0.5)]])
    (monitor,) = product_boxes(logits, boxes, ["monitor"], width=100, height=100, threshold=0.1, nms_iou=0.3)
    assert [i.score for i in monitor.instances] == [0.9, 0.6]  # the best of each pair
    assert monitor.instances[0].box[0] == pytest.approx(21.0) and monitor.instances[1].box[0] == pytest.approx(60.0)
    (capped,) = product_boxes(logits, boxes, ["monitor"], width=100, height=100, threshold=0.1, nms_iou=1.0, max_instances=3)
    assert [i.score for i in capped.instances] == [0.9, 0.7, 0.6]  # nothing merged, at most three


def test_padding_columns_of_a_batch_are_ignored_and_bad_shapes_refused() -> None:
    boxes = np.array([[0.5, 0.5, 0.2, 0.2]])
    (mug,) = product_boxes(np.array([[logit(0.9), logit(0.99)]]), boxes, ["mug"], width=10, height=10, threshold=0.5)
    assert mug.instances[0].score == 0.9
    with pytest.raises(ValueError, match="shapes"):
        product_boxes(np.zeros((1, 1)), boxes, ["mug", "lamp"], width=10, height=10, threshold=0.5)
    with pytest.raises(ValueError, match="max_instances"):
        product_boxes(np.zeros((1, 1)), boxes, ["mug"], width=10, height=10, threshold=0.5, max_instances=0)


def test_non_max_suppression_keeps_the_best_of_each_cluster() -> None:
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30]], dtype=float)
    assert non_max_suppression(boxes, np.array([0.5, 0.9, 0.4]), iou=0.5, limit=5) == [1, 2]
    assert non_max_suppression(boxes, np.array([0.5, 0.9, 0.4]), iou=0.5, limit=1) == [1]


def test_product_lists_are_stripped_deduplicated_and_bounded() -> None:
    assert clean_products([" monitor ", "Lamp", "MONITOR", "lamp", "desk mat"]) == ("monitor", "Lamp", "desk mat")
    with pytest.raises(InvalidParameter) as bad:
        clean_products(["monitor", "  "])
    assert bad.value.field == "products[1]"
    for name in ("a,b", "x" * (MAX_PRODUCT_CHARS + 1), "tab\there"):
        with pytest.raises(InvalidParameter):
            clean_products([name])
    with pytest.raises(InvalidParameter) as many:
        clean_products([f"thing {i}" for i in range(MAX_PRODUCTS + 1)])
    assert many.value.field == "products"


def test_found_fraction_counts_products_not_instances() -> None:
    box = ProductBox(box=(0, 0, 1, 1), box_normalized=(0, 0, 0.1, 0.1), score=0.5)
    items = (LocatedProduct(product="monitor", found=True, instances=(box, box)), LocatedProduct(product="lamp", found=False),
             LocatedProduct(product="mug", found=True, instances=(box,)))
    assert ProductLocation(status="ok", items=items).found_fraction == pytest.approx(2 / 3)
    assert ProductLocation(status="timeout", reason="slow").found_fraction is None
    assert ProductLocation(status="ok").found_fraction is None
    assert ProductLocation(status="ok", items=items).model_dump(mode="json")["found_fraction"] == pytest.approx(2 / 3)


def test_the_annotated_copy_draws_found_boxes_and_leaves_the_original() -> None:
    image = Image.new("RGB", (64, 48), "white")
    box = ProductBox(box=(10.0, 20.0, 40.0, 40.0), box_normalized=(0.15, 0.41, 0.62, 0.83), score=0.77)
    drawn = np.asarray(annotate(image, [LocatedProduct(product="monitor", found=True, instances=(box,)),
                                        LocatedProduct(product="lamp", found=False)]))
    assert np.asarray(image).min() == 255  # the original is untouched
    assert drawn.shape == (48, 64, 3)
    assert tuple(drawn[30, 10]) != (255, 255, 255) and tuple(drawn[30, 40]) != (255, 255, 255)  # the box's sides
    assert tuple(drawn[30, 25]) == (255, 255, 255)  # its inside


def test_the_form_pattern_for_products_states_exactly_what_the_server_accepts() -> None:
    """The multipart schema's pattern (what schemathesis and clients read) against the server's own parsing
    and validation, on seeded random texts of names, spaces, tabs, commas and long runs."""
    import random
    import re

    from pydantic import ValidationError

    from deployments.ingress_models import OPTIONAL_PRODUCT_LIST_PATTERN, PRODUCT_LIST_PATTERN, form_values
    from deskgen_client.protocol import GenerateRequest, LocateRequest

    pieces = ["monitor", "desk lamp", " ", ",", ", ", "\t", "x" * 47, "y", "\x1f", "é", "\u3000"]
    rng = random.Random(7)
    texts = ["", " , ", ",".join(["p"] * 16), ",".join(["p"] * 17), "x" * 48, "x" * 49]
    texts += ["".join(rng.choice(pieces) for _ in range(rng.randint(1, 12))) for _ in range(3000)]
    for text in texts:
        for model, pattern in ((LocateRequest, PRODUCT_LIST_PATTERN), (GenerateRequest, OPTIONAL_PRODUCT_LIST_PATTERN)):
            try:
                model.model_validate(form_values({"products": text}))
                accepted = True
            except ValidationError:
                accepted = False
            assert accepted == bool(re.fullmatch(pattern, text)), (model.__name__, text)
    assert form_values({"products": ["monitor, lamp", " mug "], "locate": "false", "annotate": "yes"}) == {
        "products": ["monitor", "lamp", "mug"], "locate": False, "annotate": "yes"}  # "yes" is then refused
