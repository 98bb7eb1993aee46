"""The HTTP API of the real app on a real local Ray: happy paths, every error code, A/B, SSE."""

from __future__ import annotations

import base64
import io
import json
import re
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from PIL import Image

from deskgen.pngmeta import read_png_metadata
from deskgen.prompts.captions import DEFAULT_PREFIXES

from .conftest import TIER_CACHE, generator_info
from .helpers import assert_error, generate, parse_sse, text2img

pytestmark = pytest.mark.serve

OTT_3D = "3d:0.5+ott:0.7"


def test_the_request_id_is_the_clients_echoed_once_or_refused(client: httpx.Client) -> None:
    rid = f"client-{time.time_ns()}"
    response = client.post("/v1/text2img", json={"prompt": "desk", "steps": 1}, headers={"X-Request-Id": rid, "Accept": "application/json"})
    assert response.status_code == 200, response.text
    assert response.headers.get_list("x-request-id") == [rid] and response.json()["request_id"] == rid
    bad = client.post("/v1/text2img", json={"prompt": "desk", "steps": 1}, headers={"X-Request-Id": "no spaces/allowed"})
    assert_error(bad, 400, "invalid_parameter", "X-Request-Id", "1-64 characters")


# -- the full pipeline --------------------------------------------------------------------------


def test_generate_returns_png_with_metadata(client: httpx.Client, desk_photo: bytes) -> None:
    response = generate(client, desk_photo, mix="ott_3d", seed=7)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    assert response.headers["x-deskgen-mix"] == OTT_3D
    assert response.headers["x-deskgen-seed"] == "7"
    assert len(response.headers["x-request-id"]) >= 8 and "," not in response.headers["x-request-id"]
    assert float(response.headers["x-deskgen-desk-score"]) >= 0.5
    image = Image.open(io.BytesIO(response.content))
    assert image.format == "PNG" and image.size == (64, 64)
    meta = read_png_metadata(response.content)
    assert meta["mix_id"] == OTT_3D and meta["seed"] == 7 and meta["steps"] == 2
    assert set(meta["adapters"]) == {"ott", "3d"} and all(len(h) == 64 for h in meta["adapters"].values())
    assert "desk" in meta["prompt"]


def test_generate_json_reports_every_stage(client: httpx.Client, desk_photo: bytes) -> None:
    response = generate(client, desk_photo, accept="application/json", mix="dalle_only", seed=3, style="cyberpunk")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["desk_score"] >= 0.5
    assert body["captions"]["unconditional"]
    assert [c["prefix"] for c in body["captions"]["conditional"]] == list(DEFAULT_PREFIXES)
    captioned = client.post("/v1/caption", files={"image": ("d.jpg", desk_photo, "image/jpeg")}, data={"style": "cyberpunk"})
    assert body["keywords"] == captioned.json()["keywords"] and body["prompt"] == captioned.json()["prompt"]
    assert "cyberpunk" in body["prompt"]
    assert body["mix"] == {"id": "dalle:1.0", "name": "dalle_only", "weights": {"dalle": 1.0}, "source": "request", "arm": None}
    assert body["seed"] == 3
    assert set(body["timings"]) == {"classify_s", "caption_s", "generate_s", "locate_s", "total_s"}
    png = base64.b64decode(body["image_b64"])
    assert read_png_metadata(png)["prompt"] == body["prompt"]


def test_json_body_with_base64_image_gives_the_same_image(client: httpx.Client, desk_photo: bytes) -> None:
    multipart = generate(client, desk_photo, mix="ott_3d", seed=11)
    as_json = client.post(
        "/v1/generate", json={"image_b64": base64.b64encode(desk_photo).decode(), "mix": "ott:0.7+3d:0.5", "seed": 11}
    )
    assert as_json.status_code == 200, as_json.text
    assert as_json.headers["x-deskgen-mix"] == OTT_3D
    assert as_json.content == multipart.content  # same seed + same mix -> identical bytes


def test_not_a_desk_setup_is_422_with_its_score(client: httpx.Client, not_a_desk: bytes) -> None:
    error = assert_error(generate(client, not_a_desk), 422, "not_a_desk_setup", "image", "score", "threshold")
    assert 0.0 <= error["score"] < error["threshold"] == 0.5


def test_classify_and_caption_alone(client: httpx.Client, desk_photo: bytes, not_a_desk: bytes) -> None:
    files = {"image": ("d.jpg", desk_photo, "image/jpeg")}
    desk = client.post("/v1/classify", files=files).json()
    other = client.post("/v1/classify", files={"image": ("x.png", not_a_desk, "image/png")}).json()
    assert desk["is_desk"] is True and other["is_desk"] is False and desk["score"] > other["score"]
    caption = client.post("/v1/caption", files=files, data={"style": "retro"})
    assert caption.status_code == 200, caption.text
    body = caption.json()
    assert len(body["captions"]["conditional"]) == len(DEFAULT_PREFIXES)
    assert "retro" in body["prompt"] and body["negative_prompt"].startswith("blurry")


# -- mixes and A/B ------------------------------------------------------------------------------


def test_mixes_lists_adapters_named_mixes_and_split(client: httpx.Client) -> None:
    body = client.get("/v1/mixes").json()
    assert body["adapters"] == ["3d", "dalle", "ott"]
    assert body["named_mixes"]["ott_3d"] == {"id": OTT_3D, "weights": {"3d": 0.5, "ott": 0.7}}
    assert body["named_mixes"]["mix"]["id"] == "3d:0.4+dalle:0.6+ott:0.4"
    assert body["ab_split"] == pytest.approx({"ott_3d": 0.7, "dalle_ott": 0.3}) and next(iter(body["ab_split"])) == "ott_3d"


def test_explicit_mix_is_honoured_in_every_spelling(client: httpx.Client) -> None:
    named = text2img(client, mix="ott_3d", seed=5)
    adhoc = text2img(client, mix="3d:.5+ott:0.70", seed=5)
    header = client.post(
        "/v1/text2img",
        json={"prompt": "a tidy desk setup", "steps": 1, "seed": 5},
        headers={"serve_multiplexed_model_id": "ott_3d"},
    )
    for response, source in ((named, "request"), (adhoc, "request"), (header, "header")):
        assert response.status_code == 200, response.text
        assert response.headers["x-deskgen-mix"] == OTT_3D
        assert response.headers["x-deskgen-mix-source"] == source
        assert "x-deskgen-ab-arm" not in response.headers
    assert named.content == adhoc.content == header.content
    other = text2img(client, mix="dalle_only", seed=5)
    assert other.content != named.content


def test_ab_split_is_within_tolerance_and_sticky(client: httpx.Client) -> None:
    def arm(user: str | None) -> str:
        response = text2img(client, user_id=user, seed=1) if user else text2img(client, seed=1)
        assert response.status_code == 200, response.text
        assert response.headers["x-deskgen-mix-source"] == "ab"
        return response.headers["x-deskgen-ab-arm"]

    users = [f"user-{i}" for i in range(300)]
    # 2 clients: the test config lets the generator hold 1 running + 2 queued, so none is refused.
    with ThreadPoolExecutor(2) as pool:
        arms = list(pool.map(arm, users))
        anonymous = list(pool.map(arm, [None] * 100))
    share = arms.count("ott_3d") / len(arms)
    assert 0.62 <= share <= 0.78, share  # 70/30 split, +-3 standard deviations for n=300
    assert set(arms) == {"dalle_ott", "ott_3d"}
    assert 0.5 <= anonymous.count("ott_3d") / 100 <= 0.9
    # Sticky: every user gets the same arm again.
    again = [arm(u) for u in users[:20]]
    assert again == arms[:20]


def test_alternating_mixes_never_reload_the_base(client: httpx.Client) -> None:
    before = generator_info()
    for i in range(6):
        response = text2img(client, mix=("dalle_only", "ott_only")[i % 2], seed=i)
        assert response.status_code == 200, response.text
    after = generator_info()
    assert before["base_loads"] == after["base_loads"] == 1
    assert after["replica"] == before["replica"]
    # Each mix is loaded (its adapters activated) at most once; later requests hit the cache.
    assert after["mix_loads"] - before["mix_loads"] <= 2
    assert {"dalle:1.0", "ott:1.0"} <= set(after["cached_mixes"])


def test_the_generator_caches_as_many_mixes_as_configured(client: httpx.Client) -> None:
    """``args.generator_cache.mixes`` sizes Serve's multiplexed LRU (the tier sets 3, serve_config.yaml 4): after
    one more mix than that, the least recently used one is evicted and loaded again when asked for."""
    assert generator_info()["cache"] == {"mixes": TIER_CACHE["mixes"], "keep_adapters": TIER_CACHE["mixes"]}
    names = ["dalle_only", "ott_only", "3d_only", "dalle_3d"][: TIER_CACHE["mixes"] + 1]
    ids = []
    for seed, name in enumerate(names):
        response = text2img(client, mix=name, seed=seed)
        assert response.status_code == 200, response.text
        ids.append(response.headers["x-deskgen-mix"])
    info = generator_info()
    assert sorted(info["cached_mixes"]) == sorted(ids[1:]), info["cached_mixes"]  # the first one went
    loads = info["mix_loads"]
    assert text2img(client, mix=names[0], seed=9).status_code == 200
    again = generator_info()
    assert again["mix_loads"] == loads + 1 and ids[0] in again["cached_mixes"] and ids[1] not in again["cached_mixes"]


# -- streaming ------------------------------------------------------------------------------------


def test_sse_streams_ordered_steps_and_the_final_image(client: httpx.Client, desk_photo: bytes) -> None:
    response = generate(client, desk_photo, accept="text/event-stream", mix="ott_3d", seed=7, steps=4)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    events = parse_sse(response.text)
    names = [name for name, _ in events]
    assert names == ["classified", "captioned", "started", "step", "step", "step", "step", "located", "done"]
    assert [data["step"] for name, data in events if name == "step"] == [1, 2, 3, 4]
    done = events[-1][1]
    png = base64.b64decode(done["image_b64"])
    assert Image.open(io.BytesIO(png)).size == (64, 64)
    assert read_png_metadata(png)["mix_id"] == OTT_3D


def test_sse_errors_keep_their_status(client: httpx.Client, not_a_desk: bytes) -> None:
    assert_error(generate(client, not_a_desk, accept="text/event-stream"), 422, "not_a_desk_setup", "image")


# -- errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "field", "fragments"),
    [
        ({"width": 500}, "width", ("multiple of 8", "500")),
        ({"steps": 0}, "steps", ("greater than or equal to 1", "0")),
        ({"steps": 151}, "steps", ("150", "151")),
        ({"guidance": "lots"}, "guidance", ("number", "lots")),
        ({"seed": -1}, "seed", ("-1",)),
        ({"stpes": 3}, "stpes", ("not a known field",)),
        ({"mix": "ott:3"}, "mix", ("[0, 2]", "3")),
    ],
)
def test_bad_parameters_are_400_naming_the_field(
    client: httpx.Client, desk_photo: bytes, fields: dict[str, Any], field: str, fragments: tuple[str, ...]
) -> None:
    assert_error(generate(client, desk_photo, **fields), 400, "invalid_parameter", field, *fragments)


def test_missing_or_malformed_image_is_400(client: httpx.Client) -> None:
    assert_error(client.post("/v1/generate", data={"seed": "1"}, files={}), 415, "unsupported_media_type", "Content-Type")
    assert_error(client.post("/v1/generate", json={"seed": 1}), 400, "invalid_parameter", "image", "required")
    assert_error(client.post("/v1/generate", json={"image_b64": "%%%"}), 400, "invalid_parameter", "image_b64", "base64")
    assert_error(client.post("/v1/generate", content=b"{nope", headers={"Content-Type": "application/json"}), 400, "invalid_parameter", "body")
    assert_error(client.post("/v1/text2img", json={"prompt": ""}), 400, "invalid_parameter", "prompt")
    as_text = client.post("/v1/generate", files={"image": (None, "desk.jpg")})  # a text part, no file
    assert_error(as_text, 400, "invalid_parameter", "image", "file part")


def test_unknown_mix_and_adapter_are_404(client: httpx.Client) -> None:
    assert_error(text2img(client, mix="vaporwave"), 404, "unknown_mix", "mix", "vaporwave", "ott_3d")
    assert_error(text2img(client, mix="ott:0.5+neon:1"), 404, "unknown_mix", "mix", "neon", "'dalle'")
    assert_error(text2img(client, mix="../etc:1"), 400, "invalid_parameter", "mix", "letters, digits", "'../etc:1'")


def test_too_large_is_413(client: httpx.Client) -> None:
    big = b"\xff\xd8" + b"\0" * (11 * 1024 * 1024)
    response = client.post("/v1/classify", files={"image": ("big.jpg", big, "image/jpeg")})
    assert_error(response, 413, "payload_too_large", "image", "bytes")


def test_a_client_that_sends_30_mb_before_reading_gets_the_413(serve_app: dict[str, Any]) -> None:
    """Python's urllib sends the whole body, then reads: the answer must be the JSON 413, not a reset."""
    import urllib.error
    import urllib.request

    body = b"\xff\xd8" + b"\0" * (30 * 1024 * 1024)
    request = urllib.request.Request(f"{serve_app['url']}/v1/text2img", data=body,
                                     headers={"Content-Type": "application/json"})  # fmt: skip
    with pytest.raises(urllib.error.HTTPError) as answered:
        urllib.request.urlopen(request, timeout=120)
    assert answered.value.code == 413
    error = json.loads(answered.value.read())["error"]
    assert error["code"] == "payload_too_large" and error["field"] == "body"


@pytest.mark.parametrize(
    ("name", "route", "request_kwargs", "status", "field"),
    [
        ("JSON nested 100,000 levels", "/v1/text2img",
         {"content": b"[" * 100_000 + b"]" * 100_000, "headers": {"Content-Type": "application/json"}}, 400, "body"),
        ("5,000 multipart fields", "/v1/generate",
         {"files": {"image": ("d.jpg", b"\xff\xd8", "image/jpeg")}, "data": {f"f{i}": "x" for i in range(5000)}}, 400, "body"),
        ("a 1 MB prompt", "/v1/text2img", {"json": {"prompt": "desk " * 200_000}}, 400, "prompt"),
        ("invalid UTF-8 in JSON", "/v1/text2img",
         {"content": b'{"prompt": "\xff\xfe"}', "headers": {"Content-Type": "application/json"}}, 400, "body"),
        ("a key given twice", "/v1/text2img",
         {"content": b'{"prompt": "a", "prompt": "b"}', "headers": {"Content-Type": "application/json"}}, 400, "prompt"),
        ("a form field with an empty name", "/v1/generate",
         {"files": {"image": ("d.jpg", b"\xff\xd8", "image/jpeg")}, "data": {"": "x"}}, 400, ""),
        ("feedback nested deep", "/v1/feedback",
         {"content": b'{"image_id": ' + b"[" * 5000 + b"]" * 5000 + b"}", "headers": {"Content-Type": "application/json"}},
         400, "body"),
    ],
)  # fmt: skip
def test_hostile_bodies_are_4xx_naming_the_field_never_500(
    client: httpx.Client, name: str, route: str, request_kwargs: dict[str, Any], status: int, field: str
) -> None:
    error = assert_error(client.post(route, **request_kwargs), status, "invalid_parameter", field)
    assert "None" not in error["message"], (name, error)


def test_not_an_image_is_415(client: httpx.Client) -> None:
    response = client.post("/v1/classify", files={"image": ("notes.txt", b"just some text", "image/png")})
    assert_error(response, 415, "unsupported_media_type", "image", "not a decodable image")
    response = client.post("/v1/classify", content=b"raw", headers={"Content-Type": "text/plain"})
    assert_error(response, 415, "unsupported_media_type", "Content-Type", "text/plain")


def test_unknown_route_is_json_404(client: httpx.Client) -> None:
    assert_error(client.get("/v1/nothing"), 404, "not_found")


def test_timeout_is_504_and_the_generation_is_cancelled(client: httpx.Client) -> None:
    before = generator_info()["generations"]
    started = time.perf_counter()
    response = text2img(client, steps=150, width=512, height=512, timeout_s=0.5)
    assert_error(response, 504, "timeout")
    assert time.perf_counter() - started < 10  # answered at the deadline, not after the 150 steps
    # The cancelled generation stops at its next step, so the replica is free again at once.
    assert text2img(client, seed=2).status_code == 200
    assert generator_info()["generations"] == before + 1


def test_overload_is_503_with_retry_after(client: httpx.Client, serve_app: dict[str, Any]) -> None:
    def slow(i: int) -> httpx.Response:
        with httpx.Client(base_url=serve_app["url"], timeout=120) as c:
            return text2img(c, steps=30, width=256, height=256, seed=i)

    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(slow, range(8)))
    statuses = sorted(r.status_code for r in responses)
    assert set(statuses) == {200, 503}, statuses
    rejected = next(r for r in responses if r.status_code == 503)
    assert_error(rejected, 503, "overloaded")
    # Refused at the door (admission control) or by the generator's router: either way a wait of 1 s up
    # to the configured retry_after_s (5).
    assert 1 <= int(rejected.headers["retry-after"]) <= 5


# -- health and docs --------------------------------------------------------------------------------


def test_health_ready_and_docs(client: httpx.Client) -> None:
    assert client.get("/healthz").json()["status"] == "ok"
    ready = client.get("/readyz").json()
    assert ready["ready"] is True
    assert ready["stages"] == {"classifier": "ok", "captioner": "ok", "generator": "ok", "recorder": "ok", "locator": "ok"}
    assert ready["exposures"]["refused"] == 0
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/v1/generate", "/v1/classify", "/v1/caption", "/v1/text2img", "/v1/mixes", "/healthz", "/readyz",
            "/v1/feedback", "/v1/experiments", "/v1/experiments/{experiment_id}"} <= set(paths)  # fmt: skip
    assert "multipart/form-data" in paths["/v1/generate"]["post"]["requestBody"]["content"]
    # /docs works offline: its script and style come from deskgen, nothing from a CDN.
    page = client.get("/docs")
    assert page.status_code == 200 and "swagger-ui-bundle.js" in page.text
    assert re.findall(r"""(?:src|href)=['"]([^'"]+)""", page.text) and not re.search(r"""(?:src|href)=['"]https?://""", page.text)
    for asset in re.findall(r"""(?:src|href)=['"]([^'"]+)""", page.text):
        assert client.get(asset).status_code == 200, asset


def test_negative_prompt_default_and_explicit_empty(client: httpx.Client) -> None:
    default = read_png_metadata(text2img(client, seed=1).content)
    empty = read_png_metadata(text2img(client, seed=1, negative_prompt="").content)
    assert default["negative_prompt"].startswith("blurry, low quality")
    assert empty["negative_prompt"] == ""
