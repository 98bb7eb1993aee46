"""Product location in the real app: boxes for every product asked in JSON, PNG metadata and the SSE
``located`` event; the captioned objects by default; off per request; the annotated copy; ``/v1/locate``
for any image; the found fraction in the exposure and the report by concept; and a locator that is slow or
killed never holds the image back.

The session's app runs the Locator at threshold 0 (tests/serve/conftest.py): the tiny detector's random
scores then never decide whether a product is found. The test that reconfigures it restores the session's
config in ``finally``, so the file runs in any order with the rest of the tier."""

from __future__ import annotations

import base64
import copy
import io
import os
import signal
import time
from typing import Any

import httpx
import pytest
from PIL import Image

from deskgen.pngmeta import PRODUCTS_KEY, read_png_text

from .conftest import APP, deploy, deployment
from .helpers import assert_error, generate, parse_sse, text2img

pytestmark = pytest.mark.serve

ASKED = ["monitor", "keyboard", "desk lamp"]


def assert_boxes_inside(products: dict[str, Any], asked: list[str], width: int, height: int) -> None:
    assert products["status"] == "ok" and products["reason"] is None, products
    assert (products["width"], products["height"]) == (width, height)
    assert [item["product"] for item in products["items"]] == asked
    for item in products["items"]:
        assert item["found"] and item["instances"], item
        for instance in item["instances"]:
            x0, y0, x1, y1 = instance["box"]
            assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height, instance
            nx0, ny0, nx1, ny1 = instance["box_normalized"]
            assert 0 <= nx0 < nx1 <= 1 and 0 <= ny0 < ny1 <= 1
            assert nx0 == pytest.approx(x0 / width, abs=1e-3) and ny1 == pytest.approx(y1 / height, abs=1e-3)
            assert 0.0 <= instance["score"] <= 1.0
    assert products["found_fraction"] == 1.0


def test_a_generation_answers_boxes_inside_the_image_for_every_product_asked(client: httpx.Client, desk_photo: bytes) -> None:
    r = generate(client, desk_photo, "application/json", products=",".join(ASKED), concept="gaming-rgb", seed=7, width=96)
    assert r.status_code == 200, r.text
    answer = r.json()
    assert_boxes_inside(answer["products"], ASKED, 96, 64)
    assert answer["products"]["source"] == "request" and answer["concept"] == "gaming-rgb"
    assert r.headers["x-deskgen-products"] == "ok" and r.headers["x-deskgen-products-found"] == "3/3"
    assert answer["timings"]["locate_s"] > 0 and "annotated_b64" not in answer
    png = base64.b64decode(answer["image_b64"])
    assert read_png_text(png, PRODUCTS_KEY) == answer["products"]  # the PNG carries them too
    print("\n[locate] one JSON answer:", {k: answer[k] for k in ("products", "concept", "prompt", "timings")})


def test_without_a_list_the_captioned_objects_are_located(client: httpx.Client, desk_photo: bytes) -> None:
    answer = generate(client, desk_photo, "application/json").json()
    keywords = [k["name"] for k in answer["keywords"]][:8]
    assert keywords, answer["keywords"]
    assert answer["products"]["source"] == "captions"
    assert_boxes_inside(answer["products"], keywords, 64, 64)


def test_sse_sends_located_before_done_and_png_answers_carry_the_products(client: httpx.Client, desk_photo: bytes) -> None:
    r = generate(client, desk_photo, "text/event-stream", products="monitor,mug")
    assert r.status_code == 200, r.text
    events = parse_sse(r.text)
    names = [name for name, _ in events]
    assert names[:3] == ["classified", "captioned", "started"] and names[-2:] == ["located", "done"], names
    located, done = events[-2][1], events[-1][1]
    assert_boxes_inside(located, ["monitor", "mug"], 64, 64)
    assert done["products"] == located
    png = client.post("/v1/text2img", json={"prompt": "a desk with a monitor", "steps": 1, "products": ["monitor"]})
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    assert png.headers["x-deskgen-products-found"] == "1/1"
    assert_boxes_inside(read_png_text(png.content, PRODUCTS_KEY), ["monitor"], 64, 64)


def test_text2img_locates_the_objects_its_prompt_names_and_a_request_can_turn_it_off(client: httpx.Client) -> None:
    answer = text2img(client, "application/json", prompt="a tidy desk with a monitor, a lamp and a plant").json()
    assert answer["products"]["source"] == "prompt"
    assert_boxes_inside(answer["products"], ["monitor", "lamp", "plant"], 64, 64)
    off = text2img(client, "application/json", locate=False)
    assert off.status_code == 200 and off.headers["x-deskgen-products"] == "off"
    assert off.json()["products"] == {"status": "off", "items": [], "reason": "turned off by the request (`locate: false`)",
                                      "threshold": None, "width": None, "height": None, "source": None, "found_fraction": None}  # fmt: skip


def test_annotate_adds_a_copy_with_the_boxes_drawn(client: httpx.Client) -> None:
    answer = text2img(client, "application/json", products=["monitor"], annotate=True, seed=3).json()
    original = Image.open(io.BytesIO(base64.b64decode(answer["image_b64"])))
    drawn = Image.open(io.BytesIO(base64.b64decode(answer["annotated_b64"])))
    assert drawn.size == original.size == (64, 64)
    assert drawn.convert("RGB").tobytes() != original.convert("RGB").tobytes()


def test_v1_locate_finds_products_in_any_image_and_names_bad_fields(client: httpx.Client, desk_photo: bytes) -> None:
    r = client.post("/v1/locate", files={"image": ("desk.jpg", desk_photo, "image/jpeg")},
                    data={"products": "monitor, keyboard,Monitor", "annotate": "true"})  # fmt: skip
    assert r.status_code == 200, r.text
    assert_boxes_inside(r.json()["products"], ["monitor", "keyboard"], 128, 128)  # the repeat dropped
    assert Image.open(io.BytesIO(base64.b64decode(r.json()["annotated_b64"]))).size == (128, 128)
    as_json = client.post("/v1/locate", json={"image_b64": base64.b64encode(desk_photo).decode(), "products": ["lamp"]})
    assert_boxes_inside(as_json.json()["products"], ["lamp"], 128, 128)
    photo = {"image": ("desk.jpg", desk_photo, "image/jpeg")}
    assert_error(client.post("/v1/locate", files=photo), 400, "invalid_parameter", "products", "required")
    assert_error(client.post("/v1/locate", files=photo, data={"products": ",".join(f"p{i}" for i in range(17))}),
                 400, "invalid_parameter", "products", "at most 16")  # fmt: skip
    assert_error(client.post("/v1/locate", json={"image_b64": base64.b64encode(desk_photo).decode(), "products": ["ok", "x" * 49]}),
                 400, "invalid_parameter", "products.1")  # fmt: skip
    assert_error(client.post("/v1/locate", files={"image": ("a.txt", b"not an image", "text/plain")}, data={"products": "mug"}),
                 415, "unsupported_media_type", "image")  # fmt: skip
    assert_error(generate(client, desk_photo, products="tab\tin name"), 400, "invalid_parameter", "products.0")


def test_the_found_fraction_reaches_the_report_by_concept(client: httpx.Client) -> None:
    experiment = client.get("/v1/experiments").json()["current"]
    r = text2img(client, "application/json", concept="cozy-wood", user_id="locate-report", products=["monitor", "plant"])
    arm = r.json()["mix"]["arm"]
    assert r.status_code == 200 and arm is not None
    report = client.get(f"/v1/experiments/{experiment}").json()
    (mine,) = [a for a in report["arms"] if a["arm"] == arm]
    cozy = mine["by_concept"]["cozy-wood"]
    assert cozy["exposures"] >= 1 and cozy["located_images"] >= 1 and cozy["mean_found_fraction"] == 1.0
    assert mine["guardrails"]["located_images"] >= 1
    page = client.get(f"/v1/experiments/{experiment}", headers={"Accept": "text/html"}).text
    assert "By concept" in page and "cozy-wood" in page


def locator_pid() -> int:
    from ray import serve

    return int(serve.get_deployment_handle("Locator", APP).stats.remote().result()["pid"])


def test_a_slow_or_killed_locator_never_holds_the_image_back(client: httpx.Client, serve_app: dict[str, Any]) -> None:
    config = copy.deepcopy(serve_app["config"])
    deployment(config, "Ingress")["user_config"]["locate_timeout_s"] = 1.0
    deployment(config, "Locator")["user_config"]["threshold"] = 1.0  # nothing passes: "not found"
    deploy(config)
    pid = locator_pid()
    try:
        deadline = time.monotonic() + 60
        while (answer := text2img(client, "application/json", products=["monitor"]).json())["products"]["threshold"] != 1.0:
            assert time.monotonic() < deadline, answer["products"]
            time.sleep(0.2)
        assert answer["products"]["items"] == [{"product": "monitor", "found": False, "instances": []}]
        assert answer["products"]["found_fraction"] == 0.0
        # A locator that does not answer (its process stopped): the image goes out after locate_timeout_s.
        os.kill(pid, signal.SIGSTOP)
        try:
            slow = text2img(client, "application/json", products=["monitor"])
        finally:
            os.kill(pid, signal.SIGCONT)
        assert slow.status_code == 200 and base64.b64decode(slow.json()["image_b64"]).startswith(b"\x89PNG")
        assert slow.json()["products"]["status"] == "timeout" and "1.0 s" in slow.json()["products"]["reason"]
        # A locator that died: the call fails, or waits for the replacement past locate_timeout_s.
        os.kill(pid, signal.SIGKILL)
        for accept in ("application/json", "text/event-stream"):
            r = text2img(client, accept, products=["monitor"])
            assert r.status_code == 200, r.text
            products = r.json()["products"] if accept == "application/json" else parse_sse(r.text)[-1][1]["products"]
            assert products["status"] in ("failed", "timeout") and products["reason"], products
        assert client.get("/readyz").status_code == 200  # the locator is optional for readiness
    finally:
        deploy(serve_app["config"])
        deadline = time.monotonic() + 120
        while (r := text2img(client, "application/json", products=["monitor"])).json()["products"]["status"] != "ok":
            assert time.monotonic() < deadline, r.json()["products"]
            time.sleep(0.5)
    assert locator_pid() != pid
