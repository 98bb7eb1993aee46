"""The Python client and the ``deskgen`` command line against the real app: the CLI run as a user runs it
(the installed script, ``DESKGEN_URL`` set), the library sync and async, typed errors with the server's
JSON, progress from the event stream, products located in generated images and in any image (the session's
app runs the Locator at threshold 0, so every product asked for is found), and retries of real 503s
after their ``Retry-After``."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import math
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from deskgen.pngmeta import PRODUCTS_KEY, read_png_metadata, read_png_text
from deskgen_client import (
    AsyncDeskgen,
    Captioned,
    Classified,
    Deskgen,
    Done,
    InvalidRequest,
    Located,
    NotADesk,
    NotFound,
    Overloaded,
    ProductLocation,
    ProgressEvent,
    RetryPolicy,
    Started,
    Step,
    UnsupportedMediaType,
)

from .helpers import door, text2img, wait_until

pytestmark = pytest.mark.serve

OTT_3D = "3d:0.5+ott:0.7"


def deskgen_cli(serve_app: dict[str, Any], *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run the installed ``deskgen`` script (``make install`` puts it in the venv) as a user would."""
    script = Path(sys.executable).with_name("deskgen")
    if not script.exists():
        pytest.fail(f"{script} is missing: `make install` (or `pip install -e .`) installs the deskgen command")
    env = {k: v for k, v in os.environ.items() if k not in ("DESKGEN_API_KEY", "DESKGEN_URL")}
    env["DESKGEN_URL"] = serve_app["url"]
    return subprocess.run([str(script), *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=180, check=False)


def png_size(path: Path | bytes) -> tuple[int, int]:
    image = Image.open(io.BytesIO(path if isinstance(path, bytes) else path.read_bytes()))
    assert image.format == "PNG"
    image.verify()
    return image.size


def pixels(png: bytes) -> bytes:
    return Image.open(io.BytesIO(png)).convert("RGB").tobytes()


def assert_all_found(products: ProductLocation | None, asked: list[str], size: tuple[int, int], source: str) -> None:
    """Every product asked for found (threshold 0), in order, with boxes inside the image."""
    assert products is not None and products.ok and products.reason is None, products
    assert [item.product for item in products.items] == asked and products.found_fraction == 1.0
    assert (products.width, products.height) == size and products.source == source and products.threshold == 0.0
    for name in asked:
        assert products.found(name) and products.boxes(name), name
        for instance in products.boxes(name):
            x0, y0, x1, y1 = instance.box
            assert 0 <= x0 < x1 <= size[0] and 0 <= y0 < y1 <= size[1], instance
            assert instance.box_normalized[2] == pytest.approx(x1 / size[0], abs=1e-3) and 0 <= instance.score <= 1


#: A summary line of one found product: its name (padded), its best box in pixels and its score.
FOUND_LINE = r"  {name} +box \(\d+, \d+\)-\(\d+, \d+\) px  score [01]\.\d{{3}}"


# -- the command line ---------------------------------------------------------------------------------------


def test_cli_text2img_writes_a_png_of_the_asked_size(serve_app: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "desk.png"
    run = deskgen_cli(serve_app, "text2img", "a minimalist desk setup, warm light", "--mix", "ott_3d", "--seed", "5",
                      "--steps", "2", "--width", "128", "--height", "64", "-o", str(out))  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert png_size(out) == (128, 64)
    meta = read_png_metadata(out.read_bytes())
    assert (meta["seed"], meta["mix_id"], meta["steps"]) == (5, OTT_3D, 2)
    assert f"wrote        {out} (128x64 PNG" in run.stdout
    assert f"mix          ott_3d ({OTT_3D}), chosen by request" in run.stdout
    assert "seed         5\n" in run.stdout
    assert re.search(r"timings      generate \d+\.\d{3} s · locate \d+\.\d{3} s · total \d+\.\d{3} s", run.stdout), run.stdout
    assert re.search(r"generator  activate .* denoise .* decode", run.stdout), run.stdout
    # The bar, driven by the step events, on stderr (one line per step: stderr is not a terminal here).
    assert re.findall(r"steps \[[#-]+\] (\d)/2", run.stderr) == ["1", "2"], run.stderr
    image_id = re.search(r"image id     (\S+)", run.stdout)
    assert image_id is not None and read_png_metadata(out.read_bytes())["prompt"] == "a minimalist desk setup, warm light"


def test_cli_generate_from_a_photo_follows_progress_and_prints_the_recipe(
    serve_app: dict[str, Any], desk_photo: bytes, tmp_path: Path
) -> None:
    photo = tmp_path / "desk.jpg"
    photo.write_bytes(desk_photo)
    run = deskgen_cli(serve_app, "generate", "desk.jpg", "--mix", "ott_3d", "--seed", "42", "--steps", "2", "-o", "out.png",
                      cwd=tmp_path)  # fmt: skip
    assert run.returncode == 0, run.stderr
    print(f"$ deskgen generate desk.jpg --mix ott_3d --seed 42 --steps 2 -o out.png\n{run.stderr}{run.stdout}")
    assert png_size(tmp_path / "out.png") == (64, 64)
    stderr = run.stderr.splitlines()
    assert stderr[0].startswith("desk score ") and stderr[1].startswith("prompt: ") and "desk" in stderr[1]
    assert stderr[2].startswith(f"generating with {OTT_3D} on ")
    assert stderr[3:5] == ["steps [###############---------------] 1/2  50%", "steps [##############################] 2/2 100%"]
    assert re.fullmatch(r"products: \d+/\d+ found \(threshold 0, from the captions\)", stderr[5]) and len(stderr) == 6, stderr
    assert "seed         42\n" in run.stdout and f"ott_3d ({OTT_3D})" in run.stdout
    assert re.search(r"desk score   [01]\.\d{3}\n", run.stdout)
    assert re.search(r"timings      classify \d+\.\d{3} s · caption \d+\.\d{3} s · generate \d+\.\d{3} s · locate \d+\.\d{3} s · total", run.stdout)


def test_cli_generate_with_products_prints_their_boxes_and_writes_the_annotated_copy(
    serve_app: dict[str, Any], desk_photo: bytes, tmp_path: Path
) -> None:
    (tmp_path / "desk.jpg").write_bytes(desk_photo)
    command = ["generate", "desk.jpg", "--products", "monitor,keyboard", "--concept", "gaming-rgb", "--seed", "42",
               "--steps", "2", "-o", "out.png", "--annotate", "boxes.png"]  # fmt: skip
    run = deskgen_cli(serve_app, *command, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    print(f"$ deskgen {' '.join(command)}\n{run.stderr}{run.stdout}")
    assert run.stderr.splitlines()[-1] == "products: 2/2 found (threshold 0, from the request)"
    lines = run.stdout.splitlines()
    at = lines.index("products     2/2 found (threshold 0, from the request)")
    assert re.fullmatch(FOUND_LINE.format(name="monitor"), lines[at + 1].split("  (+")[0]), lines[at + 1]
    assert re.fullmatch(FOUND_LINE.format(name="keyboard"), lines[at + 2].split("  (+")[0]), lines[at + 2]
    assert lines[at + 3] == "annotated    boxes.png"
    assert "gaming desk" in read_png_metadata((tmp_path / "out.png").read_bytes())["prompt"]  # the concept was sent
    # The annotated copy: the same size, boxes drawn over the image; the image itself carries the products.
    out, boxes = (tmp_path / "out.png").read_bytes(), (tmp_path / "boxes.png").read_bytes()
    assert png_size(boxes) == png_size(out) == (64, 64) and pixels(boxes) != pixels(out)
    located = read_png_text(out, PRODUCTS_KEY)
    assert [item["product"] for item in located["items"]] == ["monitor", "keyboard"] and located["found_fraction"] == 1.0
    # --no-locate: the summary says so and nothing is drawn.
    off = deskgen_cli(serve_app, "text2img", "a desk", "--steps", "1", "--no-locate", "--no-progress", "-o", "off.png", cwd=tmp_path)
    assert off.returncode == 0, off.stderr
    assert "products     off (turned off by the request (`locate: false`))\n" in off.stdout


def test_cli_locate_prints_boxes_writes_the_annotated_copy_and_names_bad_products(
    serve_app: dict[str, Any], desk_photo: bytes, tmp_path: Path
) -> None:
    (tmp_path / "photo.jpg").write_bytes(desk_photo)
    command = ["locate", "photo.jpg", "--products", "monitor,desk lamp,Monitor", "--annotate", "boxes.png"]
    run = deskgen_cli(serve_app, *command, cwd=tmp_path)
    assert run.returncode == 0 and run.stderr == "", run.stderr
    print(f"$ deskgen {' '.join(command)}\n{run.stdout}")
    lines = run.stdout.splitlines()
    assert lines[0] == "products     2/2 found (threshold 0, from the request)"  # the repeat dropped by the server
    assert re.fullmatch(FOUND_LINE.format(name="monitor"), lines[1].split("  (+")[0]), lines[1]
    assert re.fullmatch(FOUND_LINE.format(name="desk lamp"), lines[2].split("  (+")[0]), lines[2]
    assert lines[3:] == ["annotated    boxes.png"]
    boxes = (tmp_path / "boxes.png").read_bytes()
    assert png_size(boxes) == (128, 128) and pixels(boxes) != Image.open(io.BytesIO(desk_photo)).convert("RGB").tobytes()
    as_json = deskgen_cli(serve_app, "locate", "photo.jpg", "--products", "keyboard", "--json", cwd=tmp_path)
    assert as_json.returncode == 0, as_json.stderr
    answer = json.loads(as_json.stdout)
    assert answer["products"]["items"][0]["product"] == "keyboard" and answer["products"]["found_fraction"] == 1.0
    assert (answer["products"]["width"], answer["products"]["height"]) == (128, 128) and "annotated_b64" not in answer
    too_long = deskgen_cli(serve_app, "locate", "photo.jpg", "--products", f"mug,{'x' * 49}", cwd=tmp_path)
    assert too_long.returncode == 1 and "HTTP 400 invalid_parameter [products.1]" in too_long.stderr, too_long.stderr
    (tmp_path / "notes.txt").write_text("not an image")
    text = deskgen_cli(serve_app, "locate", "notes.txt", "--products", "mug", cwd=tmp_path)
    assert text.returncode == 1 and "HTTP 415 unsupported_media_type [image]" in text.stderr, text.stderr


def test_cli_errors_exit_1_with_the_servers_message(serve_app: dict[str, Any], not_a_desk: bytes, tmp_path: Path) -> None:
    (tmp_path / "cat.png").write_bytes(not_a_desk)
    run = deskgen_cli(serve_app, "generate", str(tmp_path / "cat.png"), "--steps", "1", "-o", str(tmp_path / "no.png"))
    assert run.returncode == 1 and not (tmp_path / "no.png").exists()
    assert "HTTP 422 not_a_desk_setup [image]: `image` does not look like a desk setup: its score" in run.stderr, run.stderr
    assert re.search(r"\(request id \S+\)", run.stderr)
    bad = deskgen_cli(serve_app, "text2img", "a desk", "--width", "500", "--json", "-o", str(tmp_path / "no.png"))
    assert bad.returncode == 1 and "HTTP 400 invalid_parameter [width]" in bad.stderr and "500" in bad.stderr
    assert json.loads(bad.stdout)["error"]["field"] == "width"
    missing = deskgen_cli(serve_app, "generate", str(tmp_path / "absent.jpg"))
    assert missing.returncode == 2 and "absent.jpg" in missing.stderr


def test_cli_mixes_limits_and_feedback(serve_app: dict[str, Any], tmp_path: Path) -> None:
    mixes = deskgen_cli(serve_app, "mixes")
    assert mixes.returncode == 0, mixes.stderr
    assert "adapters     3d, dalle, ott" in mixes.stdout and re.search(rf"ott_3d\s+{re.escape(OTT_3D)}", mixes.stdout)
    listed = json.loads(deskgen_cli(serve_app, "mixes", "--json").stdout)
    assert listed["named_mixes"]["ott_3d"]["id"] == OTT_3D
    concepts = deskgen_cli(serve_app, "concepts")
    assert concepts.returncode == 0, concepts.stderr
    assert re.search(r"^  gaming-rgb +gaming desk setup, RGB lighting", concepts.stdout, re.M), concepts.stdout
    assert json.loads(deskgen_cli(serve_app, "concepts", "--json").stdout)["concepts"]["cozy-wood"]["prompt"].startswith("warm")
    limits = json.loads(deskgen_cli(serve_app, "limits", "--json").stdout)
    assert limits["max_side"] == 512 and limits["defaults"]["steps"] == 2  # the serve tier's overrides

    made = deskgen_cli(serve_app, "text2img", "a desk", "--steps", "1", "--user-id", "cli-user", "--no-progress",
                       "--json", "-o", str(tmp_path / "fb.png"))  # fmt: skip
    assert made.returncode == 0 and made.stderr == "", made.stderr
    image_id = json.loads(made.stdout)["request_id"]
    first = deskgen_cli(serve_app, "feedback", image_id, "download", "--user-id", "cli-user")
    assert first.returncode == 0 and first.stdout == f"download recorded for image {image_id}\n", first.stderr
    again = deskgen_cli(serve_app, "feedback", image_id, "download", "--user-id", "cli-user")
    assert again.stdout == f"download already recorded (a repeat counts once) for image {image_id}\n"
    unknown = deskgen_cli(serve_app, "feedback", "no-such-image", "like")
    assert unknown.returncode == 1 and "HTTP 404 unknown_image [image_id]" in unknown.stderr


# -- the library ----------------------------------------------------------------------------------------------


def test_generate_streams_every_step_in_order_and_matches_the_json_answer(
    serve_app: dict[str, Any], desk_photo: bytes
) -> None:
    events: list[ProgressEvent] = []
    rid = f"lib-gen-{time.time_ns()}"
    with Deskgen(serve_app["url"]) as client:
        streamed = client.generate(desk_photo, mix="ott_3d", seed=7, steps=3, style="retro", request_id=rid, on_event=events.append)
        plain = client.generate(desk_photo, mix="ott_3d", seed=7, steps=3, style="retro")
    assert [type(e) for e in events] == [Classified, Captioned, Started, Step, Step, Step, Located, Done]
    assert [(e.step, e.total) for e in events if isinstance(e, Step)] == [(1, 3), (2, 3), (3, 3)]
    classified, captioned, started = events[0], events[1], events[2]
    assert isinstance(classified, Classified) and classified.score >= classified.threshold
    assert isinstance(captioned, Captioned) and captioned.prompt == streamed.prompt and "retro" in streamed.prompt
    assert isinstance(started, Started) and started.mix_id == OTT_3D
    assert events[-1] == Done(streamed) and events[-2] == Located(streamed.products)  # type: ignore[arg-type]
    assert streamed.request_id == rid and plain.request_id != rid  # the request id given is the image id
    assert (streamed.seed, streamed.steps, streamed.mix.id, streamed.mix.name, streamed.mix.source) == (7, 3, OTT_3D, "ott_3d", "request")
    assert set(streamed.timings) == {"classify_s", "caption_s", "generate_s", "locate_s", "total_s"}
    keywords = [k.name for k in streamed.keywords][:8]
    assert_all_found(streamed.products, keywords, (64, 64), "captions")  # without a list: the captioned objects
    assert streamed.products == plain.products
    assert streamed.desk_score == classified.score and streamed.keywords
    assert streamed.png == plain.png  # same request, same bytes, streamed or not
    assert Image.open(io.BytesIO(streamed.png)).size == (64, 64)


def test_generate_and_text2img_locate_the_products_asked_and_draw_them(serve_app: dict[str, Any], desk_photo: bytes) -> None:
    events: list[ProgressEvent] = []
    with Deskgen(serve_app["url"]) as client:
        result = client.generate(desk_photo, products=["monitor", "keyboard", "desk lamp"], concept="gaming-rgb",
                                 annotate=True, seed=7, on_event=events.append)  # fmt: skip
        from_prompt = client.text2img("a tidy desk with a monitor, a lamp and a plant", steps=1, products="mug, plant")
        off = client.text2img("a desk with a monitor", steps=1, locate=False, annotate=True)
        located = client.locate(result.png, ["monitor", "Monitor", "plant"], annotate=True)
        concepts = client.concepts()
        with pytest.raises(InvalidRequest) as bad:
            client.text2img("a desk", steps=1, products=["tab\tin name"])
        with pytest.raises(NotFound) as unknown:
            client.text2img("a desk", steps=1, concept="no-such-concept")
        with pytest.raises(UnsupportedMediaType):
            client.locate(b"not an image", ["mug"])
    assert_all_found(result.products, ["monitor", "keyboard", "desk lamp"], (64, 64), "request")
    assert result.concept == "gaming-rgb" and "gaming desk" in result.prompt and "locate_s" in result.timings
    assert events[-2] == Located(result.products)  # type: ignore[arg-type]
    assert result.annotated is not None and png_size(result.annotated) == (64, 64) and pixels(result.annotated) != pixels(result.png)
    assert read_png_text(result.png, PRODUCTS_KEY) == result.products.model_dump(mode="json")  # the PNG carries them too
    assert_all_found(from_prompt.products, ["mug", "plant"], (64, 64), "request")
    assert off.products is not None and (off.products.status, off.products.items, off.annotated) == ("off", (), None)
    # /v1/locate on the image just made: the repeat dropped, the boxes of the same image.
    assert_all_found(located.products, ["monitor", "plant"], (64, 64), "request")
    assert located.annotated is not None and png_size(located.annotated) == (64, 64)
    assert set(concepts.concepts) >= {"gaming-rgb", "cozy-wood"} and concepts.today in (None, *concepts.concepts)
    assert bad.value.field == "products.0" and unknown.value.field == "concept"


def test_not_a_desk_and_a_bad_parameter_raise_typed_errors(serve_app: dict[str, Any], not_a_desk: bytes) -> None:
    with Deskgen(serve_app["url"]) as client:
        with pytest.raises(NotADesk) as rejected:
            client.generate(not_a_desk, steps=1)
        with pytest.raises(NotADesk) as rejected_streaming:  # the stream answers the 422 before any event
            client.generate(not_a_desk, steps=1, on_event=lambda event: None)
        with pytest.raises(InvalidRequest) as invalid:
            client.text2img("a desk", steps=1, width=500)
    for error in (rejected.value, rejected_streaming.value):
        assert error.status == 422 and error.code == "not_a_desk_setup" and error.field == "image"
        assert error.score is not None and error.threshold is not None and error.score < error.threshold
        assert error.request_id and error.retry_after is None
    assert invalid.value.status == 400 and invalid.value.field == "width"
    assert "multiple of 8" in invalid.value.message and "500" in invalid.value.message
    assert invalid.value.body["request_id"] == invalid.value.request_id


def test_feedback_is_201_then_a_duplicate_200(serve_app: dict[str, Any]) -> None:
    with Deskgen(serve_app["url"]) as client:
        result = client.text2img("a desk setup", steps=1, user_id="lib-user")
        first = client.feedback(result.image_id, "like", user_id="lib-user", value=5)
        again = client.feedback(result.image_id, "like", user_id="lib-user", value=5)
        mixes = client.mixes()
    assert (first.status, first.duplicate) == (201, False) and first.image_id == result.image_id
    assert (again.status, again.duplicate) == (200, True)
    assert set(mixes.adapters) == {"dalle", "ott", "3d"} and mixes.named_mixes["ott_3d"].id == OTT_3D
    assert mixes.named_mixes["ott_3d"].weights == {"ott": 0.7, "3d": 0.5}


def test_async_client_does_what_the_sync_client_does(serve_app: dict[str, Any], desk_photo: bytes) -> None:
    async def run() -> tuple[Any, Any, list[int], Any, Any, Any, Any]:
        steps: list[int] = []
        located: list[Located] = []

        async def on_event(event: ProgressEvent) -> None:
            if isinstance(event, Step):
                steps.append(event.step)
            elif isinstance(event, Located):
                located.append(event)

        async with AsyncDeskgen(serve_app["url"]) as client:
            plain, streamed, mixes, generated = await asyncio.gather(
                client.text2img("a desk with a lamp", mix="dalle_only", seed=11, steps=2, products=["lamp", "monitor"]),
                client.text2img("a desk with a lamp", mix="dalle_only", seed=11, steps=2, products=["lamp", "monitor"],
                                on_event=on_event),
                client.mixes(),
                client.generate(desk_photo, steps=1, products=["keyboard"], annotate=True),
            )
            found = await client.locate(desk_photo, "monitor,keyboard", annotate=True)
            concepts = await client.concepts()
        assert located == [Located(streamed.products)]
        return plain, streamed, steps, mixes, generated, found, concepts

    plain, streamed, steps, mixes, generated, found, concepts = asyncio.run(run())
    with Deskgen(serve_app["url"]) as client:
        sync = client.text2img("a desk with a lamp", mix="dalle_only", seed=11, steps=2, products=["lamp", "monitor"])
        assert mixes == client.mixes() and concepts == client.concepts()
        assert found.products == client.locate(desk_photo, ["monitor", "keyboard"]).products  # the same boxes
    assert steps == [1, 2]
    assert plain.png == streamed.png == sync.png and plain.mix == sync.mix and plain.seed == sync.seed == 11
    assert len({plain.request_id, streamed.request_id, sync.request_id}) == 3
    assert plain.products == streamed.products == sync.products
    assert_all_found(sync.products, ["lamp", "monitor"], (64, 64), "request")
    assert_all_found(generated.products, ["keyboard"], (64, 64), "request")
    assert generated.annotated is not None and png_size(generated.annotated) == (64, 64)
    assert_all_found(found.products, ["monitor", "keyboard"], (128, 128), "request")
    assert found.annotated is not None and png_size(found.annotated) == (128, 128)


# -- retries of real 503s ---------------------------------------------------------------------------------


def test_503_is_retried_after_retry_after_bounded_and_each_attempt_has_its_own_id(
    serve_app: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    """The generator takes 1 request and queues 2 (the serve tier's config): three slow generations fill
    it, and the ingress answers 503 with a Retry-After (whole seconds, at most its ``retry_after_s``, 5)
    to the next one."""
    url = serve_app["url"]

    def slow(seed: int, steps: int) -> float:
        with httpx.Client(base_url=url, timeout=120) as c:
            started = time.perf_counter()
            response = text2img(c, mix="ott_3d", steps=steps, width=256, height=256, seed=seed)
            assert response.status_code == 200, response.text
            return time.perf_counter() - started

    # Each blocker should hold the generator for ~3 s on this machine: long enough that the queue stays
    # full while the probes below run, short enough that three drain well within the retry budget.
    slow(1, 2)  # warm: the mix active, 256 px compiled; the next one measures steady state
    per_step = slow(2, 10) / 10
    steps = max(1, min(150, math.ceil(3.0 / per_step)))
    with ThreadPoolExecutor(3) as pool, Deskgen(url, max_retries=0) as no_retry, httpx.Client(base_url=url) as http:
        blockers = [pool.submit(slow, 100 + i, steps) for i in range(3)]
        # The blockers are in before any probe (a probe ahead of one would take its place in the queue).
        wait_until(lambda: door(http)["in_flight"] == 3, "the three blockers never held the door",
                   lambda: door(http))  # fmt: skip
        # 1. Wait for the queue to be full: a client without retries gets the 503 as a typed error.
        deadline = time.monotonic() + 30
        while True:
            try:
                no_retry.text2img("probe", mix="ott_3d", steps=1)
            except Overloaded as error:
                overloaded = error
                break
            assert time.monotonic() < deadline, "the generator queue never filled"
        assert (overloaded.status, overloaded.code) == (503, "overloaded")
        assert overloaded.retry_after is not None and 1.0 <= overloaded.retry_after <= 5.0
        assert overloaded.request_id and "capacity" in overloaded.message

        # 2. Retry-After longer than the caller allows: raised at once, never called back early.
        impatient = Deskgen(url, retry=RetryPolicy(max_retries=3, max_retry_after_s=0.5))
        started = time.perf_counter()
        with impatient, pytest.raises(Overloaded):
            impatient.text2img("impatient", mix="ott_3d", steps=1)
        assert time.perf_counter() - started < 2.0

        # 3. Retried after Retry-After until the queue has room, within max_retries.
        rid = f"retry-{time.time_ns()}"
        started = time.perf_counter()
        with caplog.at_level(logging.INFO, logger="deskgen.client"), Deskgen(url, max_retries=10) as patient:
            result = patient.text2img("a patient desk", mix="ott_3d", steps=1, request_id=rid)
            elapsed = time.perf_counter() - started
            retries = [r.getMessage() for r in caplog.records if r.name == "deskgen.client"]
            # Each attempt had its own id: the delivered image is recorded under the one that succeeded.
            assert patient.feedback(result.image_id, "select").status == 201
        durations = [b.result() for b in blockers]
    assert 1 <= len(retries) <= 10, retries
    assert all("HTTP 503 overloaded" in m for m in retries), retries
    waits = [float(m.rsplit(" in ", 1)[1].removesuffix(" s")) for m in retries]
    assert all(1.0 <= w <= 5.0 and w == int(w) for w in waits), waits  # the server's whole seconds, honoured
    assert elapsed >= sum(waits), (elapsed, waits)
    assert result.request_id == f"{rid}.r{len(retries)}"
    print(f"blockers {steps} steps: {[f'{d:.1f}' for d in durations]} s; retried {len(retries)}x after {waits} s, {elapsed:.1f} s in all")


def test_jobs_through_the_client_and_the_cli(serve_app: dict[str, Any], desk_photo: bytes, tmp_path: Path) -> None:
    """``client.jobs``: a batch job followed by its events to the end, its images; a photo job; a cancel;
    a synchronous call with an idempotency key made once however often it is sent. The CLI's ``jobs
    submit --watch`` writes the images, ``jobs get`` and ``jobs cancel`` print the job."""
    from deskgen_client import JobEvent

    from .conftest import generator_info

    small = {"prompt": "a tidy desk setup", "steps": 2, "width": 64, "height": 64, "locate": False}
    with Deskgen(serve_app["url"]) as client:
        job = client.jobs.create(text2img=small, batch={"seeds": [11, 12]})
        seen: list[JobEvent] = []
        done = client.jobs.wait(job.id, on_event=seen.append)
        assert done.status == "succeeded" and [i.result["seed"] for i in done.images] == [11, 12]
        names = [e.name for e in seen]
        assert names[0] == "queued" and names[-1] == "succeeded" and names.count("image") == 2
        png = client.jobs.image(job.id, 1)
        assert Image.open(io.BytesIO(png)).size == (64, 64)
        photo_job = client.jobs.create(generate={"steps": 2, "width": 64, "height": 64}, photo=desk_photo, wait_s=60)
        assert photo_job.status == "succeeded" and photo_job.images[0].result["captions"]
        long = client.jobs.create(text2img={**small, "steps": 150})
        assert client.jobs.cancel(long.id).status in ("canceled", "running", "queued")
        assert client.jobs.wait(long.id, timeout_s=60).status == "canceled"
        before = generator_info()["generations"]
        first = client.text2img("a desk", idempotency_key="client-key-1", steps=1, width=64, height=64, locate=False)
        again = client.text2img("a desk", idempotency_key="client-key-1", steps=1, width=64, height=64, locate=False)
        assert again.request_id == first.request_id and generator_info()["generations"] - before == 1
        with pytest.raises(ValueError, match="stream"):
            client.text2img("a desk", idempotency_key=True, on_event=print)

    async def the_async_twin() -> None:
        async with AsyncDeskgen(serve_app["url"]) as aclient:
            ajob = await aclient.jobs.create(text2img=small, batch={"seeds": [21, 22]})
            events = [event.name async for event in aclient.jobs.events(ajob.id)]
            assert events[0] == "queued" and events[-1] == "succeeded"
            finished = await aclient.jobs.wait(ajob.id, timeout_s=60)
            assert [i.result["seed"] for i in finished.images] == [21, 22]
            assert (await aclient.jobs.image(ajob.id, 0)).startswith(b"\x89PNG")

    asyncio.run(the_async_twin())
    out = tmp_path / "batch"
    run = deskgen_cli(serve_app, "jobs", "submit", "a desk at dawn", "--seeds", "1", "2", "--steps", "2", "--width", "64",
                      "--height", "64", "--no-locate", "--watch", "--output-prefix", str(out))  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "batch-0.png").exists() and (tmp_path / "batch-1.png").exists()
    assert "steps [" in run.stderr and "succeeded" in run.stdout
    job_id = re.search(r"job (job_[0-9a-f]{24})", run.stdout).group(1)  # type: ignore[union-attr]
    got = deskgen_cli(serve_app, "jobs", "get", job_id, "--json")
    assert got.returncode == 0 and json.loads(got.stdout)["status"] == "succeeded"
    queued = deskgen_cli(serve_app, "jobs", "submit", "a desk", "--steps", "150", "--width", "64", "--height", "64")
    queued_id = re.search(r"job (job_[0-9a-f]{24})", queued.stdout).group(1)  # type: ignore[union-attr]
    canceled = deskgen_cli(serve_app, "jobs", "cancel", queued_id)
    assert canceled.returncode == 0 and queued_id in canceled.stdout
    missing = deskgen_cli(serve_app, "jobs", "get", "job_000000000000000000000000")
    assert missing.returncode == 1 and "unknown_job" in missing.stderr
    usage = deskgen_cli(serve_app, "jobs", "submit")
    assert usage.returncode == 2 and "prompt" in usage.stderr
