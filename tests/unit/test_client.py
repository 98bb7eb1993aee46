"""The client's pure parts, without a server: the SSE parser and the generation stream (fed the frames the
ingress's own encoder writes), the product locations (the ingress's own ``ProductLocation`` through JSON),
Retry-After and RateLimit-* parsing, the error mapping (fed the bodies the ingress's own error mapping
builds), the retry rule, request building, and the CLI's parser, bar and product summary. A refused
connection (a closed local port) shows the retry loop without any server; ``/v1/locate`` is answered by an
``httpx.MockTransport``."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import re
import socket
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import httpx
import pytest

from deployments.http_errors import error_for
from deployments.http_io import sse
from deskgen import errors as server_errors
from deskgen.contracts import GeneratedImage, LocatedProduct
from deskgen.generator.params import GenerationParams
from deskgen.limits import REQUEST_ID_PATTERN
from deskgen_client import (
    AsyncDeskgen,
    Captioned,
    Classified,
    Concepts,
    Conflict,
    DeadlineExceeded,
    Deskgen,
    DeskgenConnectionError,
    DeskgenError,
    Done,
    InvalidRequest,
    Located,
    LocateResult,
    NotADesk,
    NotFound,
    OtherEvent,
    Overloaded,
    PayloadTooLarge,
    ProductBox,
    ProductLocation,
    RateLimited,
    RetryPolicy,
    ServerError,
    Started,
    Step,
    Unauthorized,
    UnsupportedMediaType,
)
from deskgen_client.cli import (
    EXIT_NO_ANSWER,
    EXIT_USAGE,
    ProgressBar,
    build_parser,
    generation_options,
    main,
    show_products,
    show_result,
)
from deskgen_client.core import (
    API_KEY_ENV,
    DEADLINE_MARGIN_S,
    URL_ENV,
    ClientCore,
    GenerationStream,
    attempt_request_id,
    sniff_image_type,
)
from deskgen_client.errors import error_from_response, parse_rate_limit, parse_retry_after
from deskgen_client.retry import retryable
from deskgen_client.sse import ServerSentEvent, SSEParser, parse_events

pytestmark = pytest.mark.unit

PNG = b"\x89PNG\r\n\x1a\n" + b"\0" * 16


# -- server-sent events ---------------------------------------------------------------------------------


def test_sse_parser_reads_the_ingress_frames() -> None:
    body = sse("step", {"step": 1, "total": 2}) + sse("step", {"step": 2, "total": 2})
    assert parse_events(body.decode()) == [
        ServerSentEvent("step", '{"step": 1, "total": 2}'), ServerSentEvent("step", '{"step": 2, "total": 2}'),
    ]  # fmt: skip


def test_sse_parser_follows_the_whatwg_rules() -> None:
    text = (
        ": a comment line, ignored\r\n"
        "event: captioned\r\n"
        "data: first line\r\n"
        "data:second line, no space after the colon\r\n"
        "id: 7\r\n"
        "retry: 1500\r\n"
        "colour: an unknown field, ignored\r\n"
        "\r\n"
        "event: no-data\n"   # a block without data is not an event
        "\n"
        "data: unnamed\n"    # an event without a name is a `message`
        "\n"
        "event: cut\n"       # never closed by a blank line: not dispatched
        "data: partial"
    )
    events = parse_events(text)
    assert events == [
        ServerSentEvent("captioned", "first line\nsecond line, no space after the colon", "7", 1500),
        ServerSentEvent("message", "unnamed", "7", 1500),
    ]


def test_sse_parser_is_fed_line_by_line() -> None:
    parser = SSEParser()
    assert parser.feed("event: step") is None
    assert parser.feed('data: {"step": 1}') is None
    assert parser.feed("") == ServerSentEvent("step", '{"step": 1}')
    assert parser.feed("") is None  # a second blank line dispatches nothing


#: What the locator answers for a 64x64 image asked for a monitor (two instances), a keyboard and a mug.
LOCATED = ProductLocation(
    status="ok", threshold=0.1, width=64, height=64, source="request",
    items=(
        LocatedProduct(product="monitor", found=True, instances=(
            ProductBox(box=(8.0, 4.0, 40.0, 30.0), box_normalized=(0.125, 0.0625, 0.625, 0.46875), score=0.91),
            ProductBox(box=(42.0, 4.0, 60.0, 28.0), box_normalized=(0.65625, 0.0625, 0.9375, 0.4375), score=0.4))),
        LocatedProduct(product="keyboard", found=True, instances=(
            ProductBox(box=(10.0, 40.0, 50.0, 52.0), box_normalized=(0.15625, 0.625, 0.78125, 0.8125), score=0.77),)),
        LocatedProduct(product="mug", found=False),
    ),
)  # fmt: skip


def wire(located: ProductLocation) -> dict[str, Any]:
    """``located`` as an HTTP client reads it: the ingress's JSON of it, through JSON."""
    return dict(json.loads(located.model_dump_json()))


def done_payload(request_id: str = "rid-1", desk: bool = True, located: ProductLocation | None = LOCATED,
                 annotated: bytes | None = None) -> dict[str, Any]:  # fmt: skip
    """The JSON answer exactly as the ingress builds it (``deployments.render.json_result`` over the fields of
    ``GenerationRun.answer``, with the ``products`` and ``annotated_b64`` its locate step adds)."""
    from deployments.render import json_result

    params = GenerationParams(prompt="a tidy desk", negative_prompt="blurry", seed=42, steps=2, guidance=5.0, width=64, height=64)
    metadata = {"mix_id": "3d:0.5+ott:0.7", "timings": {"denoise_s": 0.5, "decode_s": 0.1}}
    info: dict[str, Any] = {
        "mix": {"id": "3d:0.5+ott:0.7", "name": "ott_3d", "weights": {"3d": 0.5, "ott": 0.7}, "source": "request", "arm": None},
        "timings": {"classify_s": 0.01, "caption_s": 0.2, "generate_s": 0.7, "total_s": 0.95},
    }
    if desk:
        info |= {"desk_score": 0.93, "captions": {"unconditional": "a desk"}, "keywords": [{"name": "desk", "count": 3}],
                 "style": "retro", "concept": "gaming-rgb"}  # fmt: skip
    if located is not None:
        info["timings"]["locate_s"] = 0.05
        info["products"] = located.model_dump(mode="json")
    if annotated is not None:
        info["annotated_b64"] = base64.b64encode(annotated).decode()
    answer = json_result(GeneratedImage(png=PNG, params=params, metadata=metadata, replica="r1"), info, request_id)
    return dict(json.loads(json.dumps(answer)))


def stream_lines(*frames: bytes) -> list[str]:
    return b"".join(frames).decode().split("\n")


def test_generation_stream_gives_typed_events_then_the_result() -> None:
    lines = stream_lines(
        sse("classified", {"score": 0.93, "threshold": 0.5}),
        sse("captioned", {"captions": {"unconditional": "a desk"}, "keywords": [{"name": "desk", "count": 3}], "prompt": "p"}),
        sse("started", Started(mix_id="3d:0.5+ott:0.7", replica="r1", queued_s=0.25)),
        *(sse("step", Step(step=i, total=2)) for i in (1, 2)),
        sse("located", LOCATED),
        sse("done", done_payload()),
    )
    stream = GenerationStream("rid-1")
    events = [e for e in (stream.feed(line) for line in lines) if e is not None]
    assert [type(e) for e in events] == [Classified, Captioned, Started, Step, Step, Located, Done]
    assert events[0] == Classified(score=0.93, threshold=0.5)
    assert events[2] == Started(mix_id="3d:0.5+ott:0.7", replica="r1", queued_s=0.25)
    assert [(e.step, e.total) for e in events if isinstance(e, Step)] == [(1, 2), (2, 2)]
    result = stream.result
    assert stream.finished and events[-1] == Done(result=result)
    assert result.png == PNG and result.request_id == result.image_id == "rid-1"
    assert (result.seed, result.steps, result.width, result.height, result.guidance) == (42, 2, 64, 64, 5.0)
    assert result.mix.id == "3d:0.5+ott:0.7" and result.mix.name == "ott_3d" and result.mix.weights == {"3d": 0.5, "ott": 0.7}
    assert result.mix.label == "ott_3d (3d:0.5+ott:0.7)" and result.mix.source == "request"
    assert result.timings["total_s"] == 0.95 and result.metadata["timings"]["denoise_s"] == 0.5
    assert result.desk_score == 0.93 and result.keywords[0].name == "desk" and result.style == "retro"
    assert result.prompt == "a tidy desk" and result.negative_prompt == "blurry"
    assert result.model_extra == {} and result.media_type == "image/png"  # every field the server sent is named
    located = events[-2]
    assert isinstance(located, Located) and located.products == result.products
    assert result.products is not None and result.products.found_fraction == pytest.approx(2 / 3)
    assert result.timings["locate_s"] == 0.05 and result.concept == "gaming-rgb" and result.annotated is None


# -- product locations -------------------------------------------------------------------------------------


def test_product_location_reads_the_ingress_answer() -> None:
    products = ProductLocation.model_validate(wire(LOCATED))
    assert (products.status, products.ok, products.reason) == ("ok", True, None)
    assert (products.threshold, products.width, products.height, products.source) == (0.1, 64, 64, "request")
    assert products.found_fraction == pytest.approx(2 / 3) == LOCATED.found_fraction
    assert [item.product for item in products.items] == ["monitor", "keyboard", "mug"]
    assert [item.product for item in products.found_items] == ["monitor", "keyboard"] and products.missing == ("mug",)
    monitor = products.get("Monitor ")  # as the server compares names: stripped, case-insensitive
    assert monitor is not None and monitor.found and len(monitor.instances) == 2
    assert monitor.best == ProductBox(box=(8.0, 4.0, 40.0, 30.0), box_normalized=(0.125, 0.0625, 0.625, 0.46875), score=0.91)
    assert products.found("keyboard") and not products.found("mug") and not products.found("lamp")
    assert products.boxes("keyboard")[0].box == (10.0, 40.0, 50.0, 52.0) and products.boxes("mug") == ()
    assert products.get("lamp") is None and products.get("mug") is not None and products.get("mug").best is None  # type: ignore[union-attr]


def test_product_location_off_failed_and_absent() -> None:
    off = ProductLocation.model_validate(wire(ProductLocation(status="off", reason="turned off by the request (`locate: false`)")))
    assert (off.status, off.ok, off.items, off.found_fraction, off.threshold, off.source) == ("off", False, (), None, None, None)
    assert off.reason is not None and "locate: false" in off.reason and not off.found("monitor")
    timeout = ProductLocation.model_validate(wire(ProductLocation(status="timeout", reason="no answer within 10.0 s", source="captions")))
    assert timeout.status == "timeout" and timeout.source == "captions" and timeout.found_fraction is None
    # An answer from a server that does not locate products: no `products`, read as None.
    older = done_payload(located=None)
    assert "products" not in older
    from deskgen_client import GenerationResult

    assert GenerationResult.model_validate(older).products is None


def test_a_generation_answer_with_products_and_the_annotated_copy(tmp_path: Any) -> None:
    from deskgen_client import GenerationResult

    drawn = b"\x89PNG\r\n\x1a\n" + b"\1" * 16
    result = GenerationResult.model_validate(done_payload(annotated=drawn))
    assert result.annotated == drawn and result.png == PNG
    assert result.products is not None and result.products.status == "ok"
    assert result.products == ProductLocation.model_validate(wire(LOCATED))
    assert result.save_annotated(tmp_path / "boxes.png").read_bytes() == drawn
    with pytest.raises(ValueError, match="annotate=True"):
        GenerationResult.model_validate(done_payload()).save_annotated(tmp_path / "none.png")


def test_concepts_read_the_ingress_listing() -> None:
    from deployments.ingress_models import IngressConfig

    listing = json.loads(json.dumps(IngressConfig().listing(datetime(2030, 1, 7, 9, 0, tzinfo=UTC))))  # a Monday
    concepts = Concepts.model_validate(listing)
    assert "gaming-rgb" in concepts.concepts and concepts.concepts["gaming-rgb"]["prompt"].startswith("gaming desk")
    assert concepts.weekday == listing["weekday"] and concepts.today == listing["today"] and concepts.timezone
    assert concepts.schedule == listing["schedule"]


def test_generation_stream_error_events_raise_typed_errors() -> None:
    # A 503 raised by a stage after the stream began: the body carries its status.
    status, body, _ = error_for(server_errors.RecorderBacklog("the store is behind: retry."), 5)
    stream = GenerationStream("rid-2")
    with pytest.raises(Overloaded) as raised:
        for line in stream_lines(sse("step", {"step": 1, "total": 2}), sse("error", body | {"status": status})):
            stream.feed(line)
    assert raised.value.status == 503 and raised.value.code == "recorder_backlog" and raised.value.request_id == "rid-2"
    # The deadline's error event has no status: it is the 504 the JSON answer would have been.
    stream = GenerationStream("rid-3")
    with pytest.raises(DeadlineExceeded) as late:
        for line in stream_lines(sse("error", {"error": {"code": "timeout", "message": "too slow"}})):
            stream.feed(line)
    assert late.value.status == 504 and late.value.code == "timeout"


def test_generation_stream_cut_short_unknown_and_malformed_events() -> None:
    stream = GenerationStream("rid-4")
    events = [stream.feed(line) for line in stream_lines(sse("queued", {"position": 3}), sse("step", {"step": 1, "total": 3}))]
    assert OtherEvent(event="queued", data={"position": 3}) in events
    assert not stream.finished
    with pytest.raises(DeskgenConnectionError) as cut:
        _ = stream.result
    assert cut.value.code == "stream_ended" and cut.value.sent and cut.value.request_id == "rid-4"
    stream = GenerationStream()
    with pytest.raises(DeskgenError, match="unexpected body") as bad:
        for line in stream_lines(sse("step", {"stage": 1})):
            stream.feed(line)
    assert bad.value.code == "unexpected_answer"


# -- Retry-After and RateLimit-* ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [("5", 5.0), (" 7 ", 7.0), ("0", 0.0), ("2.5", 2.5), (None, None), ("", None), ("-1", None), ("soon", None),
     ("inf", None), ("nan", None)],
)  # fmt: skip
def test_retry_after_delta_seconds(value: str | None, expected: float | None) -> None:
    assert parse_retry_after(value) == expected


def test_retry_after_http_date() -> None:
    now = datetime(2030, 1, 1, 12, 0, 0, tzinfo=UTC)
    later = format_datetime(now + timedelta(seconds=30), usegmt=True)  # "Tue, 01 Jan 2030 12:00:30 GMT"
    assert parse_retry_after(later, now=now.timestamp()) == 30.0
    earlier = format_datetime(now - timedelta(seconds=30), usegmt=True)
    assert parse_retry_after(earlier, now=now.timestamp()) == 0.0


def test_rate_limit_headers() -> None:
    split = parse_rate_limit({"RateLimit-Limit": "100", "RateLimit-Remaining": "0", "RateLimit-Reset": "30",
                              "RateLimit-Policy": "100;w=60"})  # fmt: skip
    assert split is not None and (split.limit, split.remaining, split.reset, split.policy) == (100, 0, 30.0, "100;w=60")
    combined = parse_rate_limit({"ratelimit": "limit=10, remaining=2, reset=5"})
    assert combined is not None and (combined.limit, combined.remaining, combined.reset) == (10, 2, 5.0)
    draft = parse_rate_limit({"RateLimit": '"default";r=0;t=12'})
    assert draft is not None and (draft.remaining, draft.reset) == (0, 12.0)
    assert parse_rate_limit({"Content-Type": "application/json"}) is None


# -- error mapping ---------------------------------------------------------------------------------------


def answered(exc: BaseException, request_id: str = "rid-9") -> DeskgenError:
    """The client's error for the answer the ingress gives ``exc`` (``json_error``'s status, body, headers)."""
    status, body, headers = error_for(exc, 5)
    body["request_id"] = request_id
    return error_from_response(status, {**headers, "X-Request-Id": request_id}, json.dumps(body).encode())


@pytest.mark.parametrize(
    ("exc", "cls", "status"),
    [
        (server_errors.InvalidParameter("`width` must be a multiple of 8 but is 65.", field="width"), InvalidRequest, 400),
        (server_errors.UnknownMix("no mix 'neon'", field="mix"), NotFound, 404),
        (server_errors.UnknownImage("no image", field="image_id"), NotFound, 404),
        (server_errors.FeedbackConflict("another user", field="user_id"), Conflict, 409),
        (server_errors.PayloadTooLarge("too big", field="image"), PayloadTooLarge, 413),
        (server_errors.NotAnImage("not an image", field="image"), UnsupportedMediaType, 415),
        (server_errors.NotADeskSetup("not a desk", field="image", score=0.12, threshold=0.5), NotADesk, 422),
        (server_errors.RecorderUnavailable("store down"), Overloaded, 503),
        (TimeoutError(), DeadlineExceeded, 504),
        (RuntimeError("boom"), ServerError, 500),
    ],
)
def test_every_server_error_maps_to_its_typed_client_error(exc: BaseException, cls: type[DeskgenError], status: int) -> None:
    error = answered(exc)
    assert type(error) is cls and error.status == status and error.request_id == "rid-9"
    if isinstance(exc, server_errors.DeskgenError):
        assert (error.code, error.message, error.field) == (exc.code, exc.message, exc.field)
    assert error.retry_after == (5.0 if status == 503 else None)


def test_not_a_desk_keeps_its_score_and_a_400_names_its_field() -> None:
    error = answered(server_errors.NotADeskSetup("`image` does not look like a desk setup", field="image", score=0.12, threshold=0.5))
    assert isinstance(error, NotADesk) and error.score == 0.12 and error.threshold == 0.5 and error.field == "image"
    assert "HTTP 422 not_a_desk_setup [image]" in str(error)
    bad = answered(server_errors.InvalidParameter("`steps`: at most 150", field="steps"))
    assert isinstance(bad, InvalidRequest) and bad.field == "steps" and bad.error["message"] == "`steps`: at most 150"


def test_overload_backpressure_and_auth_and_rate_limit_answers() -> None:
    from ray.serve.exceptions import BackPressureError

    overloaded = answered(BackPressureError(num_queued_requests=2, max_queued_requests=2))
    assert isinstance(overloaded, Overloaded) and overloaded.code == "overloaded" and overloaded.retry_after == 5.0
    # The API-key answers (401 challenge, 429 with RateLimit-*): mapped by status whatever their codes.
    unauthorized = error_from_response(401, {"WWW-Authenticate": 'Bearer realm="deskgen"'},
                                       b'{"error": {"code": "unauthorized", "message": "a key is required"}}')  # fmt: skip
    assert isinstance(unauthorized, Unauthorized) and unauthorized.www_authenticate == 'Bearer realm="deskgen"'
    limited = error_from_response(429, {"Retry-After": "2", "RateLimit-Limit": "10", "RateLimit-Remaining": "0",
                                        "RateLimit-Reset": "2"}, b'{"error": {"code": "rate_limited", "message": "slow down"}}')  # fmt: skip
    assert isinstance(limited, RateLimited) and limited.retry_after == 2.0
    assert limited.rate_limit is not None and (limited.rate_limit.limit, limited.rate_limit.remaining) == (10, 0)


def test_answers_that_are_not_the_json_error_still_get_their_class() -> None:
    page = error_from_response(502, {"Content-Type": "text/html"}, b"<html>bad gateway</html>", request_id="rid-5")
    assert type(page) is ServerError and page.code == "http_502" and "bad gateway" in page.message
    assert page.request_id == "rid-5"
    odd = error_from_response(418, {}, b'{"detail": "teapot"}')
    assert type(odd) is DeskgenError and odd.code == "http_418" and odd.status == 418


# -- the retry rule ----------------------------------------------------------------------------------------


def test_retry_policy_retries_only_429_503_and_unsent_connections() -> None:
    policy = RetryPolicy(max_retries=3, backoff_s=1.0, max_backoff_s=8.0, max_retry_after_s=30.0)
    overloaded = Overloaded("busy", status=503, code="overloaded", retry_after=5.0)
    assert policy.delay(0, overloaded) == 5.0  # Retry-After honoured exactly
    assert policy.delay(3, overloaded) is None  # bounded: 3 retries, then the error
    assert policy.delay(0, RateLimited("slow", status=429, retry_after=2.0)) == 2.0
    # A Retry-After longer than the client may wait is not cut short: the error is raised at once.
    assert policy.delay(0, Overloaded("busy", status=503, retry_after=31.0)) is None
    for never in (InvalidRequest("bad", status=400), NotADesk("no", status=422), Unauthorized("key", status=401),
                  DeadlineExceeded("late", status=504), ServerError("boom", status=500),
                  DeskgenConnectionError("reset after sending", sent=True)):  # fmt: skip
        assert not retryable(never) and policy.delay(0, never) is None, never
    assert retryable(DeskgenConnectionError("refused", sent=False))
    # A deployment without a product locator answers /v1/locate 503 with Retry-After: it stays without one.
    no_locator = answered(server_errors.LocatorUnavailable("`products`: this deployment has no product locator.", field="products"))
    assert isinstance(no_locator, Overloaded) and no_locator.retry_after == 5.0 and no_locator.code == "locator_unavailable"
    assert not retryable(no_locator) and policy.delay(0, no_locator) is None


def test_backoff_without_retry_after_grows_with_jitter_and_is_capped() -> None:
    import random

    policy = RetryPolicy(max_retries=10, backoff_s=0.5, max_backoff_s=4.0)
    rng = random.Random(7)
    error = Overloaded("busy", status=503)  # no Retry-After
    for retries_done, ceiling in [(0, 0.5), (1, 1.0), (2, 2.0), (3, 4.0), (6, 4.0)]:
        delays = {policy.delay(retries_done, error, rng) for _ in range(50)}
        assert all(d is not None and ceiling / 2 <= d <= ceiling for d in delays), (retries_done, delays)
        assert len(delays) > 1  # jittered
    with pytest.raises(ValueError, match="max_retries"):
        RetryPolicy(max_retries=-1)


def test_each_attempt_has_its_own_valid_request_id() -> None:
    assert attempt_request_id("img-1", 0) == "img-1"
    assert attempt_request_id("img-1", 2) == "img-1.r2"
    long = "x" * 64
    assert len(attempt_request_id(long, 11)) == 64 and attempt_request_id(long, 11).endswith(".r11")
    assert all(re.fullmatch(REQUEST_ID_PATTERN, attempt_request_id(long, n)) for n in range(20))


# -- request building ----------------------------------------------------------------------------------


def test_core_builds_generate_as_multipart_with_headers_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(URL_ENV, "http://deskgen.example:9000/")
    monkeypatch.setenv(API_KEY_ENV, "k-123")
    core = ClientCore()
    assert core.base_url == "http://deskgen.example:9000"
    call = core.generate(b"\xff\xd8\xff\xe0jpeg", {"mix": "ott_3d", "seed": 42, "guidance": 4.5, "timeout_s": 20},
                         "img-7", stream=True)  # fmt: skip
    with httpx.Client(timeout=httpx.Timeout(60, connect=3)) as http:
        built = core.build(http, call.request, attempt=1)
    assert str(built.url) == "http://deskgen.example:9000/v1/generate" and built.method == "POST"
    assert built.headers["authorization"] == "Bearer k-123"
    assert built.headers["accept"] == "text/event-stream" and built.headers["x-request-id"] == "img-7.r1"
    assert built.extensions["timeout"]["read"] == 20 + DEADLINE_MARGIN_S and built.extensions["timeout"]["connect"] == 3
    body = built.read()
    assert built.headers["content-type"].startswith("multipart/form-data")
    for part in (b'name="mix"\r\n\r\nott_3d', b'name="seed"\r\n\r\n42', b'name="guidance"\r\n\r\n4.5',
                 b'name="image"; filename="photo"', b"Content-Type: image/jpeg"):  # fmt: skip
        assert part in body, part


def test_core_builds_text2img_json_and_an_explicit_key_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(API_KEY_ENV, "from-env")
    core = ClientCore("http://h:1", api_key="")  # an explicit empty key: none sent
    call = core.text2img("a desk", {"steps": 2, "width": 64}, None, stream=False)
    with httpx.Client() as http:
        built = core.build(http, call.request, attempt=0)
    assert "authorization" not in built.headers and built.headers["accept"] == "application/json"
    assert json.loads(built.read()) == {"prompt": "a desk", "steps": 2, "width": 64}
    assert re.fullmatch(REQUEST_ID_PATTERN, built.headers["x-request-id"])
    with pytest.raises(ValueError, match="request_id"):
        core.text2img("a desk", {}, "no spaces allowed", stream=False)
    with pytest.raises(ValueError, match="like, dislike"):
        core.feedback("img-1", "love", None, None)  # type: ignore[arg-type]


def test_core_sends_products_locate_annotate_and_concept() -> None:
    core = ClientCore("http://h:1")
    call = core.generate(b"\xff\xd8\xffjpeg", {"products": ["monitor", "desk lamp"], "locate": True, "annotate": False,
                                                "concept": "auto"}, None, stream=False)  # fmt: skip
    with httpx.Client() as http:
        body = core.build(http, call.request, attempt=0).read()
    # A form lists the products as the field repeated, booleans as the words pydantic reads.
    assert body.count(b'name="products"') == 2
    for part in (b'name="products"\r\n\r\nmonitor\r\n', b'name="products"\r\n\r\ndesk lamp\r\n',
                 b'name="locate"\r\n\r\ntrue\r\n', b'name="annotate"\r\n\r\nfalse\r\n', b'name="concept"\r\n\r\nauto\r\n'):  # fmt: skip
        assert part in body, part
    call = core.text2img("a desk", {"products": "monitor, keyboard,", "locate": False, "annotate": True}, None, stream=True)
    with httpx.Client() as http:
        sent = json.loads(core.build(http, call.request, attempt=0).read())
    assert sent == {"prompt": "a desk", "products": ["monitor", "keyboard"], "locate": False, "annotate": True}
    # A comma inside a listed name would split it on the wire: refused before anything is sent.
    with pytest.raises(ValueError, match=r"`products\[1\]` is 'lamp,plant'"):
        core.generate(PNG, {"products": ["mug", "lamp,plant"]}, None, stream=False)


def locate_answer(request: httpx.Request) -> httpx.Response:
    """A /v1/locate that answers what the ingress would for the products the request names."""
    body = request.read()
    asked = re.findall(rb'name="products"\r\n\r\n([^\r]*)\r\n', body)
    assert request.url.path == "/v1/locate" and b'name="image"; filename="photo"' in body, body[:300]
    items = tuple(item for item in LOCATED.items if item.product.encode() in asked)
    answer: dict[str, Any] = {"products": ProductLocation(status="ok", items=items, threshold=0.1, width=64, height=64,
                                                        source="request").model_dump(mode="json")}  # fmt: skip
    if b'name="annotate"\r\n\r\ntrue' in body:
        answer["annotated_b64"] = base64.b64encode(PNG).decode()
    return httpx.Response(200, content=json.dumps(answer).encode(), headers={"Content-Type": "application/json"})


def test_locate_sends_the_image_and_products_and_reads_the_boxes() -> None:
    http = httpx.Client(base_url="http://h:1", transport=httpx.MockTransport(locate_answer))
    with Deskgen("http://h:1", http_client=http) as client:
        result = client.locate(PNG, ["monitor", "mug"])
        drawn = client.locate(PNG, "keyboard", annotate=True)
    http.close()
    assert isinstance(result, LocateResult) and result.annotated is None
    assert [i.product for i in result.products.items] == ["monitor", "mug"] and result.products.found_fraction == 0.5
    assert result.products.boxes("monitor")[1].score == 0.4
    assert drawn.annotated == PNG and drawn.products.found("keyboard") and drawn.annotated_b64 is not None

    async def run() -> LocateResult:
        async with AsyncDeskgen("http://h:1", http_client=httpx.AsyncClient(transport=httpx.MockTransport(locate_answer))) as aclient:
            return await aclient.locate(PNG, ["keyboard"], annotate=True)

    assert asyncio.run(run()) == drawn


def test_sniffed_photo_types() -> None:
    assert sniff_image_type(b"\xff\xd8\xff\xdb") == "image/jpeg"
    assert sniff_image_type(PNG) == "image/png"
    assert sniff_image_type(b"RIFF\0\0\0\0WEBPVP8 ") == "image/webp"
    assert sniff_image_type(b"hello") == "application/octet-stream"


# -- a refused connection: retried (nothing was sent), bounded, then a typed error ------------------------


@pytest.fixture()
def closed_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def test_refused_connection_is_retried_then_raised(closed_port: str, caplog: pytest.LogCaptureFixture) -> None:
    policy = RetryPolicy(max_retries=2, backoff_s=0.01, max_backoff_s=0.02)
    with caplog.at_level(logging.INFO, logger="deskgen.client"), Deskgen(closed_port, retry=policy) as client:
        with pytest.raises(DeskgenConnectionError) as raised:
            client.mixes()
    assert not raised.value.sent and raised.value.request_id is not None and raised.value.request_id.endswith(".r2")
    assert [r.getMessage().split("; ")[-1][:9] for r in caplog.records] == ["retry 1/2", "retry 2/2"]


def test_async_client_retries_the_same_way(closed_port: str, caplog: pytest.LogCaptureFixture) -> None:
    async def run() -> DeskgenConnectionError:
        async with AsyncDeskgen(closed_port, retry=RetryPolicy(max_retries=1, backoff_s=0.01, max_backoff_s=0.02)) as client:
            try:
                await client.text2img("a desk", steps=1)
            except DeskgenConnectionError as error:
                return error
        raise AssertionError("no error")

    with caplog.at_level(logging.INFO, logger="deskgen.client"):
        error = asyncio.run(run())
    assert not error.sent and error.request_id is not None and error.request_id.endswith(".r1")
    assert len(caplog.records) == 1


# -- the CLI ------------------------------------------------------------------------------------------------


def test_cli_parses_the_documented_command_lines() -> None:
    args = build_parser().parse_args(["generate", "desk.jpg", "--mix", "ott_3d", "--seed", "42", "-o", "out.png"])
    assert args.command == "generate" and str(args.photo) == "desk.jpg" and args.output == "out.png"
    assert generation_options(args) == {"mix": "ott_3d", "seed": 42}
    args = build_parser().parse_args(["text2img", "a desk", "--steps", "2", "--width", "64", "--timeout", "9", "--json"])
    assert generation_options(args) == {"steps": 2, "width": 64, "timeout_s": 9.0} and args.json
    args = build_parser().parse_args(["text2img", "a desk", "--products", "monitor, desk lamp", "--no-locate", "--concept", "auto"])
    assert generation_options(args) == {"products": ["monitor", "desk lamp"], "locate": False, "concept": "auto"}
    args = build_parser().parse_args(["generate", "desk.jpg", "--annotate", "boxes.png", "--products", "mug"])
    assert generation_options(args) == {"products": ["mug"], "annotate": True} and args.annotate == "boxes.png"
    args = build_parser().parse_args(["locate", "photo.png", "--products", "monitor,keyboard", "--annotate", "a.png", "--json"])
    assert (str(args.image), args.products, args.annotate, args.json) == ("photo.png", ["monitor", "keyboard"], "a.png", True)
    for wrong in (["locate", "photo.png"], ["locate", "photo.png", "--products", " , "]):
        with pytest.raises(SystemExit):
            build_parser().parse_args(wrong)
    args = build_parser().parse_args(["feedback", "img-1", "like", "--user-id", "u-1"])
    assert (args.image_id, args.event, args.user_id) == ("img-1", "like", "u-1")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["feedback", "img-1", "love"])


def test_progress_bar_is_driven_by_the_step_events() -> None:
    out = io.StringIO()
    bar = ProgressBar(out, width=10)
    located = Located(products=ProductLocation.model_validate(wire(LOCATED)))
    for event in (Classified(score=0.9, threshold=0.5), Started(mix_id="ott:1.0", replica="r1", queued_s=0.0),
                  Step(step=1, total=2), Step(step=2, total=2), located):
        bar(event)
    assert out.getvalue().splitlines() == [
        "desk score 0.900 (threshold 0.5)",
        "generating with ott:1.0 on r1 (queued 0.00 s)",
        "steps [#####-----] 1/2  50%",
        "steps [##########] 2/2 100%",
        "products: 2/3 found (threshold 0.1, from the request)",
    ]


def test_cli_summary_prints_each_product_with_its_best_box() -> None:
    out = io.StringIO()
    show_products(ProductLocation.model_validate(wire(LOCATED)), out)
    assert out.getvalue().splitlines() == [
        "products     2/3 found (threshold 0.1, from the request)",
        "  monitor   box (8, 4)-(40, 30) px  score 0.910  (+1 more)",
        "  keyboard  box (10, 40)-(50, 52) px  score 0.770",
        "  mug       not found",
    ]
    out = io.StringIO()
    show_products(ProductLocation.model_validate(wire(ProductLocation(status="timeout", reason="no answer within 10.0 s"))), out)
    assert out.getvalue() == "products     timeout (no answer within 10.0 s)\n"


def test_cli_writes_the_annotated_copy_or_says_why_there_is_none(tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    from deskgen_client import GenerationResult

    drawn = b"\x89PNG\r\n\x1a\n" + b"\2" * 16
    result = GenerationResult.model_validate(done_payload(annotated=drawn))
    assert show_result(result, tmp_path / "out.png", tmp_path / "boxes.png", as_json=False) == 0
    out = capsys.readouterr().out
    assert (tmp_path / "out.png").read_bytes() == PNG and (tmp_path / "boxes.png").read_bytes() == drawn
    assert "timings      classify 0.010 s · caption 0.200 s · generate 0.700 s · total 0.950 s · locate 0.050 s\n" in out
    assert out.endswith("  mug       not found\nannotated    " + str(tmp_path / "boxes.png") + "\n"), out
    # Located but not drawn (the locator timed out): the image is written, the copy is not, stderr says why.
    late = GenerationResult.model_validate(done_payload(located=ProductLocation(status="timeout", reason="no answer within 10.0 s")))
    assert show_result(late, tmp_path / "late.png", tmp_path / "late-boxes.png", as_json=True) == 0
    captured = capsys.readouterr()
    assert (tmp_path / "late.png").exists() and not (tmp_path / "late-boxes.png").exists()
    assert "no annotated image to write to" in captured.err and "products timeout: no answer within 10.0 s" in captured.err
    answer = json.loads(captured.out)
    assert answer["output"] == str(tmp_path / "late.png") and "annotated" not in answer and "image_b64" not in answer


def test_cli_refuses_annotate_without_locating_before_sending(closed_port: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["text2img", "a desk", "--url", closed_port, "--no-locate", "--annotate", "boxes.png"]) == EXIT_USAGE
    assert "--annotate draws the located products" in capsys.readouterr().err
    assert main(["locate", "photo.png", "--url", closed_port, "--products", "mug", "--annotate", "/no/such/dir/a.png"]) == EXIT_USAGE
    assert "--annotate /no/such/dir/a.png: the folder '/no/such/dir' does not exist." in capsys.readouterr().err


def test_cli_without_a_server_exits_3_with_the_reason(closed_port: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["mixes", "--url", closed_port, "--retries", "0"]) == EXIT_NO_ANSWER
    assert "ConnectError" in capsys.readouterr().err


def test_done_payload_base64_is_the_png() -> None:
    assert base64.b64decode(done_payload(desk=False)["image_b64"]) == PNG
