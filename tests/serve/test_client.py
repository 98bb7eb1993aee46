"""The Python client and the ``deskgen`` command line against the real app: the CLI run as a user runs it
(the installed script, ``DESKGEN_URL`` set), the library sync and async, typed errors with the server's
JSON, progress from the event stream, and retries of real 503s after their ``Retry-After``."""

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

from deskgen.client import (
    AsyncDeskgen,
    Captioned,
    Classified,
    Deskgen,
    Done,
    InvalidRequest,
    NotADesk,
    Overloaded,
    ProgressEvent,
    RetryPolicy,
    Started,
    Step,
)
from deskgen.pngmeta import read_png_metadata

from .helpers import text2img

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


def png_size(path: Path) -> tuple[int, int]:
    image = Image.open(io.BytesIO(path.read_bytes()))
    assert image.format == "PNG"
    image.verify()
    return image.size


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
    assert re.search(r"timings      generate \d+\.\d{3} s · total \d+\.\d{3} s", run.stdout), run.stdout
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
    assert stderr[3:] == ["steps [###############---------------] 1/2  50%", "steps [##############################] 2/2 100%"]
    assert "seed         42\n" in run.stdout and f"ott_3d ({OTT_3D})" in run.stdout
    assert re.search(r"desk score   [01]\.\d{3}\n", run.stdout)
    assert re.search(r"timings      classify \d+\.\d{3} s · caption \d+\.\d{3} s · generate \d+\.\d{3} s · total", run.stdout)


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
    assert [type(e) for e in events] == [Classified, Captioned, Started, Step, Step, Step, Done]
    assert [(e.step, e.total) for e in events if isinstance(e, Step)] == [(1, 3), (2, 3), (3, 3)]
    classified, captioned, started = events[0], events[1], events[2]
    assert isinstance(classified, Classified) and classified.score >= classified.threshold
    assert isinstance(captioned, Captioned) and captioned.prompt == streamed.prompt and "retro" in streamed.prompt
    assert isinstance(started, Started) and started.mix_id == OTT_3D
    assert events[-1] == Done(streamed)
    assert streamed.request_id == rid and plain.request_id != rid  # the request id given is the image id
    assert (streamed.seed, streamed.steps, streamed.mix.id, streamed.mix.name, streamed.mix.source) == (7, 3, OTT_3D, "ott_3d", "request")
    assert set(streamed.timings) == {"classify_s", "caption_s", "generate_s", "total_s"}
    assert streamed.desk_score == classified.score and streamed.keywords
    assert streamed.png == plain.png  # same request, same bytes, streamed or not
    assert Image.open(io.BytesIO(streamed.png)).size == (64, 64)


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
    assert set(mixes.adapters) == {"dalle", "ott", "3d"} and mixes.named["ott_3d"].id == OTT_3D
    assert mixes.named["ott_3d"].weights == {"ott": 0.7, "3d": 0.5}


def test_async_client_does_what_the_sync_client_does(serve_app: dict[str, Any]) -> None:
    async def run() -> tuple[Any, Any, list[int], Any]:
        steps: list[int] = []

        async def on_event(event: ProgressEvent) -> None:
            if isinstance(event, Step):
                steps.append(event.step)

        async with AsyncDeskgen(serve_app["url"]) as client:
            plain, streamed, mixes = await asyncio.gather(
                client.text2img("a desk with a lamp", mix="dalle_only", seed=11, steps=2),
                client.text2img("a desk with a lamp", mix="dalle_only", seed=11, steps=2, on_event=on_event),
                client.mixes(),
            )
        return plain, streamed, steps, mixes

    plain, streamed, steps, mixes = asyncio.run(run())
    with Deskgen(serve_app["url"]) as client:
        sync = client.text2img("a desk with a lamp", mix="dalle_only", seed=11, steps=2)
        assert mixes == client.mixes()
    assert steps == [1, 2]
    assert plain.png == streamed.png == sync.png and plain.mix == sync.mix and plain.seed == sync.seed == 11
    assert len({plain.request_id, streamed.request_id, sync.request_id}) == 3


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
    with ThreadPoolExecutor(3) as pool, Deskgen(url, max_retries=0) as no_retry:
        blockers = [pool.submit(slow, 100 + i, steps) for i in range(3)]
        time.sleep(0.5)  # the blockers reach the generator first (a probe ahead of them would be queued)
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
