"""The HTTP ingress: FastAPI on ``@serve.ingress``, holding handles to the three stages.

It validates every request once, with errors that name the field; picks the LoRA mix (explicit,
the ``serve_multiplexed_model_id`` header, or the A/B split in ``user_config``); routes generation
with ``multiplexed_model_id`` so a mix lands on a replica that already holds it; and answers PNG,
JSON or server-sent events by the ``Accept`` header. It never imports TensorFlow or torch.
"""

# No `from __future__ import annotations`: Serve pickles this class by value, and FastAPI must
# resolve the route annotations (Request) in the replica, where string annotations cannot be.

import asyncio
import base64
import binascii
import functools
import hashlib
import json
import logging
import random
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Literal, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from deskgen.contracts import (
    CaptionResult,
    GateVerdict,
    GeneratedImage,
    GenerationEvent,
    GenerationRequest,
)
from deskgen.errors import DeskgenError, InvalidParameter, NotADeskSetup, NotAnImage, PayloadTooLarge
from deskgen.generator.params import GenerationParams
from deskgen.images import decode_image
from deskgen.limits import (
    DEFAULT_SIZE_LIMITS,
    DEFAULT_UPLOAD_LIMITS,
    MAX_GUIDANCE,
    MAX_MIX_SPEC_CHARS,
    MAX_PROMPT_CHARS,
    MAX_SEED,
    MAX_STYLE_CHARS,
    MAX_TIMEOUT_S,
    MAX_USER_ID_CHARS,
    MIN_GUIDANCE,
    SIDE_MULTIPLE,
    SizeLimits,
)
from deskgen.loras import LoraRegistry
from deskgen.mixes import NAMED_MIXES, Mix, MixCatalog
from deskgen.paths import resolve
from deskgen.prompt import DEFAULT_NEGATIVE_PROMPT

log = logging.getLogger("ray.serve")
T = TypeVar("T")

#: The prompt /v1/generate validates its options with before the captions exist (replaced by theirs).
PENDING_PROMPT = "(from the captions)"
REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
OutputFormat = Literal["png", "json", "sse"]


# ----------------------------------------------------------------------------------------------
# Configuration (user_config) and request models
# ----------------------------------------------------------------------------------------------


class IngressConfig(BaseModel):
    """The ingress's ``user_config``: mix catalogue, A/B split, defaults and limits.

    Every field can change with ``serve deploy`` of a new config; replicas are not restarted
    (Serve calls ``reconfigure``)."""

    model_config = ConfigDict(extra="forbid")

    mixes: dict[str, dict[str, float]] = Field(default_factory=lambda: {k: dict(v) for k, v in NAMED_MIXES.items()})
    default_mix: str = "mix"
    ab_split: dict[str, float] = Field(
        default_factory=dict, description="arm (a named mix) -> share; shares are normalised; empty = default_mix"
    )
    ab_salt: str = Field("deskgen-ab-v1", description="change it to reshuffle which users land in which arm")
    default_steps: int = Field(30, ge=1)
    default_guidance: float = Field(5.0, ge=MIN_GUIDANCE, le=MAX_GUIDANCE)
    default_width: int = Field(1024, ge=SIDE_MULTIPLE)
    default_height: int = Field(1024, ge=SIDE_MULTIPLE)
    min_side: int = Field(DEFAULT_SIZE_LIMITS.min_side, ge=SIDE_MULTIPLE)
    max_side: int = Field(DEFAULT_SIZE_LIMITS.max_side, ge=SIDE_MULTIPLE)
    max_steps: int = Field(DEFAULT_SIZE_LIMITS.max_steps, ge=1)
    max_upload_bytes: int = Field(DEFAULT_UPLOAD_LIMITS.max_upload_bytes, ge=1024)
    max_pixels: int = Field(DEFAULT_UPLOAD_LIMITS.max_pixels, ge=1)
    request_timeout_s: float = Field(120.0, gt=0, le=MAX_TIMEOUT_S)
    retry_after_s: int = Field(5, ge=1)
    catalog_ttl_s: float = Field(
        5.0, ge=0.0, le=3600.0, description="how long the adapter list read from lora_dir is reused"
    )

    @field_validator("ab_split")
    @classmethod
    def _shares_positive(cls, split: dict[str, float]) -> dict[str, float]:
        for arm, share in split.items():
            if not share > 0:
                raise ValueError(f"the share of arm {arm!r} must be > 0 but is {share}")
        return split

    @model_validator(mode="after")
    def _arms_are_named_mixes(self) -> "IngressConfig":
        for arm in [*self.ab_split, self.default_mix]:
            if arm not in self.mixes:
                raise ValueError(f"{arm!r} is not one of the named mixes {sorted(self.mixes)}")
        return self

    @property
    def limits(self) -> SizeLimits:
        return SizeLimits(min_side=self.min_side, max_side=self.max_side, max_steps=self.max_steps)


class GenerationOptions(BaseModel):
    """Options shared by /v1/generate and /v1/text2img. Omitted values take the configured defaults."""

    model_config = ConfigDict(extra="forbid")

    mix: str | None = Field(None, max_length=MAX_MIX_SPEC_CHARS, description="a named mix, `adapter:weight+...`, or `base`")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="random when omitted (and reported)")
    steps: int | None = Field(None, ge=1)
    guidance: float | None = Field(None, ge=MIN_GUIDANCE, le=MAX_GUIDANCE, allow_inf_nan=False)
    width: int | None = Field(None, ge=SIDE_MULTIPLE, description=f"a multiple of {SIDE_MULTIPLE}")
    height: int | None = Field(None, ge=SIDE_MULTIPLE, description=f"a multiple of {SIDE_MULTIPLE}")
    negative_prompt: str | None = Field(None, max_length=MAX_PROMPT_CHARS)
    user_id: str | None = Field(None, min_length=1, max_length=MAX_USER_ID_CHARS, description="makes the A/B arm sticky")
    timeout_s: float | None = Field(None, gt=0, le=MAX_TIMEOUT_S, description="deadline for this request")


class GenerateForm(GenerationOptions):
    """/v1/generate: the photo (multipart `image`, or `image_b64` in JSON) plus options."""

    style: str | None = Field(None, max_length=MAX_STYLE_CHARS, description="a style concept woven into the prompt")
    image_b64: str | None = Field(None, description="JSON only: the photo, base64")


class Text2ImgRequest(GenerationOptions):
    """/v1/text2img: a prompt straight to the generator."""

    prompt: str = Field(..., min_length=1, max_length=MAX_PROMPT_CHARS)


class ImageForm(BaseModel):
    """/v1/classify and /v1/caption: just the photo (and, for caption, a style)."""

    model_config = ConfigDict(extra="forbid")

    image_b64: str | None = None
    style: str | None = Field(None, max_length=MAX_STYLE_CHARS)


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------


def error_body(code: str, message: str, field: str | None = None, **extra: Any) -> dict[str, Any]:
    error: dict[str, Any] = {"code": code, "message": message}
    if field is not None:
        error["field"] = field
    error.update(extra)
    return {"error": error}


def error_response(status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(body, status_code=status, headers=headers)


def validation_error(exc: ValidationError | RequestValidationError) -> InvalidParameter:
    """The first pydantic error as one precise message: field, rule, value."""
    first = exc.errors()[0]
    field = ".".join(str(p) for p in first.get("loc", ()) if p not in ("body", "query")) or None
    if first.get("type") == "extra_forbidden":
        return InvalidParameter(f"`{field}` is not a known field.", field=field)
    value = first.get("input")
    shown = f" but is {value!r}" if not isinstance(value, (dict, list)) and value is not None else ""
    return InvalidParameter(f"`{field}`: {first.get('msg', 'invalid')}{shown}.", field=field)


def unwrap(exc: BaseException) -> BaseException:
    """The original exception behind a RayTaskError from a replica."""
    from ray.exceptions import RayTaskError

    while isinstance(exc, RayTaskError) and getattr(exc, "cause", None) is not None:
        exc = exc.cause
    return exc


def choose_format(accept: str) -> OutputFormat:
    accept = accept.lower()
    if "text/event-stream" in accept:
        return "sse"
    if "application/json" in accept:
        return "json"
    return "png"


def pick_arm(split: dict[str, float], user_id: str | None, salt: str) -> str:
    """An arm of ``split`` in proportion to its share: sticky per ``user_id`` (a hash), random without."""
    if user_id is None:
        u = random.random()
    else:
        digest = hashlib.sha256(f"{salt}:{user_id}".encode()).digest()
        u = int.from_bytes(digest[:8], "big") / 2**64
    total = sum(split.values())
    cumulative = 0.0
    for arm, share in split.items():
        cumulative += share / total
        if u < cumulative:
            return arm
    return next(reversed(split))


def sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


async def read_body(request: Request, limit: int, field: str) -> bytes:
    """The request body, refusing more than ``limit`` bytes before reading them all."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"`{field}`: the request body must be at most {limit} bytes but is {declared}.", field=field)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"`{field}`: the request body must be at most {limit} bytes.", field=field)
        chunks.append(chunk)
    body = b"".join(chunks)
    request._body = body  # lets request.form() parse what was already read
    return body


def _image_body(model: type[BaseModel]) -> dict[str, Any]:
    schema = model.model_json_schema()
    form_schema = {
        "type": "object",
        "properties": {"image": {"type": "string", "format": "binary"}}
        | {k: v for k, v in schema.get("properties", {}).items() if k != "image_b64"},
        "required": ["image"],
    }
    return {
        "requestBody": {
            "required": True,
            "content": {"multipart/form-data": {"schema": form_schema}, "application/json": {"schema": schema}},
        }
    }


def _json_body(model: type[BaseModel]) -> dict[str, Any]:
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": model.model_json_schema()}}}}


api = FastAPI(
    title="deskgen",
    version="1.0.0",
    description="Upload a desk photo, get a new desk-setup image in a LoRA style mix.",
)


def _given(value: T | None, default: T) -> T:
    return default if value is None else value


def _awaitable(call: Any) -> Awaitable[Any]:
    if asyncio.iscoroutine(call) or isinstance(call, asyncio.Future):
        return call  # type: ignore[no-any-return]

    async def wait() -> Any:
        return await call

    return wait()


def _request_id(request: Request) -> str:
    rid: str | None = getattr(request.state, "request_id", None)
    if rid is None:
        given = request.headers.get("x-request-id", "")
        rid = given if REQUEST_ID_RE.fullmatch(given) else uuid.uuid4().hex
        request.state.request_id = rid
    return rid


# Errors: every error is JSON {"error": {"code", "message", "field"?}, "request_id"}. Routes catch
# their own (see json_errors); handlers here cover what fails before a route runs.

def error_for(exc: BaseException, retry_after_s: int) -> tuple[int, dict[str, Any], dict[str, str]]:
    """HTTP status, JSON body and extra headers for an exception (already unwrapped)."""
    from ray.exceptions import ActorDiedError, ActorUnavailableError
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

    retry = {"Retry-After": str(retry_after_s)}
    if isinstance(exc, DeskgenError):
        return exc.status, {"error": exc.to_dict()}, {}
    if isinstance(exc, (ValidationError, RequestValidationError)):
        err = validation_error(exc)
        return err.status, {"error": err.to_dict()}, {}
    if isinstance(exc, BackPressureError):
        return 503, error_body("overloaded", "deskgen is at capacity: retry after Retry-After seconds."), retry
    if isinstance(exc, (ActorDiedError, ActorUnavailableError, DeploymentUnavailableError)):
        return 503, error_body("unavailable", f"a stage replica is unavailable ({type(exc).__name__}): retry."), retry
    if isinstance(exc, TimeoutError):
        return 504, error_body("timeout", "the request did not finish within its deadline (`timeout_s`)."), {}
    log.error("unexpected error: %r", exc, exc_info=exc)
    return 500, error_body("internal", f"internal error: {type(exc).__name__}"), {}


def json_error(request: Request, exc: BaseException, retry_after_s: int = 5) -> JSONResponse:
    status, body, headers = error_for(unwrap(exc), retry_after_s)
    body["request_id"] = _request_id(request)
    return error_response(status, body, headers | {"X-Request-Id": body["request_id"]})


def json_errors(route: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """Answer any exception a route raises as JSON with its status (Retry-After from the live config)."""

    @functools.wraps(route)
    async def wrapper(self: "IngressRoutes", request: Request) -> Any:
        try:
            return await route(self, request)
        except Exception as exc:
            return json_error(request, exc, self.config.retry_after_s)

    return wrapper


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return json_error(request, exc)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    body = error_body(code, str(exc.detail)) | {"request_id": _request_id(request)}
    return error_response(exc.status_code, body, dict(exc.headers or {}))


# ----------------------------------------------------------------------------------------------
# The ingress deployment
# ----------------------------------------------------------------------------------------------

class IngressRoutes:
    """Routes, validation, A/B arm choice and response formats. Holds no model.

    A plain class, wrapped into the ``Ingress`` deployment at the end of the module: Serve then
    pickles it by reference, so the replica imports this module whole (a class decorated in place
    is pickled by value at decoration time and misses everything defined after it)."""

    def __init__(
        self,
        classifier: DeploymentHandle,
        captioner: DeploymentHandle,
        generator: DeploymentHandle,
        lora_dir: str | None = None,
    ) -> None:
        self.classifier = classifier
        self.captioner = captioner
        self.generator = generator
        self.config = IngressConfig()
        #: The adapters are the ``*.safetensors`` files in the generators' ``lora_dir``, listed here
        #: without asking a GPU replica (and re-listed every ``catalog_ttl_s``, so a file added there is
        #: usable without a restart). Where the folder is not visible from the ingress's node, the
        #: list comes from a Generator replica instead (same refresh).
        self.lora_dir = resolve(lora_dir) if lora_dir else None
        self._adapters: tuple[str, ...] | None = None
        self._adapters_at = 0.0
        self._catalog: MixCatalog | None = None

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        self.config = IngressConfig.model_validate(user_config)
        self._catalog = None  # rebuilt against the new named mixes on next use
        log.info("ingress config: default_mix=%s ab_split=%s", self.config.default_mix, self.config.ab_split)

    # -- mixes ---------------------------------------------------------------------------------

    async def adapters(self) -> tuple[str, ...]:
        now = time.monotonic()
        if self._adapters is not None and now - self._adapters_at < self.config.catalog_ttl_s:
            return self._adapters
        if self.lora_dir is not None and self.lora_dir.is_dir():
            names = tuple(LoraRegistry(self.lora_dir).names())
        else:
            info = await self.generator.info.remote()
            names = tuple(info["adapters"])
        if names != self._adapters:
            self._catalog = None
        self._adapters, self._adapters_at = names, now
        return names

    async def catalog(self) -> MixCatalog:
        adapters = await self.adapters()
        if self._catalog is None:
            self._catalog = MixCatalog(list(adapters), self.config.mixes)
        return self._catalog

    async def choose_mix(self, requested: str | None, user_id: str | None) -> tuple[Mix, dict[str, Any]]:
        """The mix to use and how it was chosen: ``request``, ``header``, ``ab`` or ``default``."""
        catalog = await self.catalog()
        header_mix = serve.get_multiplexed_model_id() or None
        if requested is not None and header_mix is not None and catalog.resolve(requested).id != catalog.resolve(header_mix, field="serve_multiplexed_model_id").id:
            raise InvalidParameter(
                f"`mix` is {requested!r} but the serve_multiplexed_model_id header is {header_mix!r}: send one.",
                field="mix",
            )
        if requested is not None:
            name, source, arm = requested, "request", None
        elif header_mix is not None:
            name, source, arm = header_mix, "header", None
        elif self.config.ab_split:
            arm = pick_arm(self.config.ab_split, user_id, self.config.ab_salt)
            name, source = arm, "ab"
        else:
            name, source, arm = self.config.default_mix, "default", None
        field = "serve_multiplexed_model_id" if source == "header" else "mix"
        mix = catalog.resolve(name, field=field)
        named = name if name in catalog.named else None
        return mix, {"id": mix.id, "name": named, "weights": mix.as_dict(), "source": source, "arm": arm}

    # -- request parsing -----------------------------------------------------------------------

    async def parse(self, request: Request, model: type[T], *, image: Literal["required", "none"]) -> tuple[T, bytes | None]:
        """Validate a multipart or JSON request into ``model``; return it and the raw image bytes."""
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        limit = self.config.max_upload_bytes * 4 // 3 + 64 * 1024  # base64 and form overhead
        body = await read_body(request, limit, "image" if image == "required" else "body")
        raw_image: bytes | None = None
        if content_type == "multipart/form-data":
            form = await request.form(max_files=2, max_fields=32)
            fields: dict[str, Any] = {}
            for key, value in form.multi_items():
                if isinstance(value, UploadFile):
                    if key != "image" or image == "none":
                        raise InvalidParameter(f"`{key}` is not a known file field.", field=key)
                    raw_image = await value.read()
                elif key == "image":
                    raise InvalidParameter(
                        "`image` must be a file part (curl: -F image=@desk.jpg), not a text field.", field="image"
                    )
                else:
                    fields[key] = value
        elif content_type == "application/json":
            try:
                fields = json.loads(body or b"null")
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise InvalidParameter(f"`body` is not valid JSON: {exc}.", field="body") from None
            if not isinstance(fields, dict):
                raise InvalidParameter("`body` must be a JSON object.", field="body")
        else:
            raise NotAnImage(
                f"`Content-Type` must be multipart/form-data or application/json but is {content_type or 'missing'!r}.",
                field="Content-Type",
            )
        try:
            parsed = model.model_validate(fields)  # type: ignore[attr-defined]
        except ValidationError as exc:
            raise validation_error(exc) from None
        b64 = getattr(parsed, "image_b64", None)
        if b64 is not None:
            if raw_image is not None:
                raise InvalidParameter("send the photo once: `image` or `image_b64`, not both.", field="image_b64")
            try:
                raw_image = base64.b64decode(b64, validate=True)
            except (binascii.Error, ValueError):
                raise InvalidParameter("`image_b64` is not valid base64.", field="image_b64") from None
        if image == "required" and raw_image is None:
            raise InvalidParameter(
                "`image` is required: a multipart file field `image`, or `image_b64` in a JSON body.", field="image"
            )
        return parsed, raw_image

    def params(self, options: GenerationOptions, prompt: str, negative_prompt: str | None) -> GenerationParams:
        """Fill omitted options from the configured defaults and check them against the live limits."""
        c = self.config
        params = GenerationParams(
            prompt=prompt,
            # An explicit "" means no negative prompt; omitted means the captioner's or the default.
            negative_prompt=_given(options.negative_prompt, _given(negative_prompt, DEFAULT_NEGATIVE_PROMPT)),
            seed=_given(options.seed, random.randint(0, MAX_SEED)),
            steps=_given(options.steps, c.default_steps),
            guidance=_given(options.guidance, c.default_guidance),
            width=_given(options.width, c.default_width),
            height=_given(options.height, c.default_height),
        )
        return params.validate(c.limits)

    # -- stage calls -----------------------------------------------------------------------------

    async def classify_or_reject(self, image: Any) -> GateVerdict:
        verdict: GateVerdict = await self.classifier.classify.remote(image)
        if not verdict.is_desk:
            raise NotADeskSetup(
                f"`image` does not look like a desk setup: its score {verdict.score:.4f} is below "
                f"the threshold {verdict.threshold}.",
                field="image",
                score=verdict.score,
                threshold=verdict.threshold,
            )
        return verdict

    # -- routes ----------------------------------------------------------------------------------

    @api.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        """Liveness of the ingress itself (and which replica answered)."""
        return {"status": "ok", "replica": serve.get_replica_context().replica_id.unique_id}

    @api.get("/readyz")
    async def readyz(self) -> JSONResponse:
        """Ready when every stage answers a ping within 5 s."""
        stages = {"classifier": self.classifier, "captioner": self.captioner, "generator": self.generator}
        results: dict[str, str] = {}
        for name, handle in stages.items():
            try:
                results[name] = await asyncio.wait_for(_awaitable(handle.ping.remote()), 5.0)
            except Exception as exc:
                results[name] = f"unavailable: {type(unwrap(exc)).__name__}"
        ready = all(v == "ok" for v in results.values())
        return JSONResponse({"ready": ready, "stages": results}, status_code=200 if ready else 503)

    @api.get("/v1/mixes")
    @json_errors
    async def mixes(self, request: Request) -> dict[str, Any]:
        """Adapters, named mixes (with canonical ids) and the live A/B split."""
        catalog = await self.catalog()
        total = sum(self.config.ab_split.values())
        return {
            "adapters": sorted(catalog.available),
            "named_mixes": {n: {"id": m.id, "weights": m.as_dict()} for n, m in catalog.named.items()},
            "default_mix": self.config.default_mix,
            "ab_split": {arm: share / total for arm, share in self.config.ab_split.items()},
            "ab_salt": self.config.ab_salt,
        }

    @api.get("/v1/limits")
    async def limits(self) -> dict[str, Any]:
        """The live request limits and defaults (the ingress's ``user_config`` plus the fixed bounds of
        :mod:`deskgen.limits`): what a client may send without a 400."""
        c = self.config
        return {
            "min_side": c.min_side,
            "max_side": c.max_side,
            "side_multiple": SIDE_MULTIPLE,
            "max_steps": c.max_steps,
            "max_seed": MAX_SEED,
            "guidance": [MIN_GUIDANCE, MAX_GUIDANCE],
            "max_prompt_chars": MAX_PROMPT_CHARS,
            "max_style_chars": MAX_STYLE_CHARS,
            "max_user_id_chars": MAX_USER_ID_CHARS,
            "max_mix_spec_chars": MAX_MIX_SPEC_CHARS,
            "max_upload_bytes": c.max_upload_bytes,
            "max_pixels": c.max_pixels,
            "max_timeout_s": MAX_TIMEOUT_S,
            "request_timeout_s": c.request_timeout_s,
            "defaults": {
                "steps": c.default_steps,
                "guidance": c.default_guidance,
                "width": c.default_width,
                "height": c.default_height,
                "mix": c.default_mix,
            },
        }

    @api.post("/v1/classify", openapi_extra=_image_body(ImageForm))
    @json_errors
    async def classify(self, request: Request) -> dict[str, Any]:
        """Desk score of a photo (200 either way; /v1/generate answers 422 below the threshold)."""
        _, raw = await self.parse(request, ImageForm, image="required")
        image = self.decode(raw)
        verdict: GateVerdict = await self.deadline(self.classifier.classify.remote(image), None)
        return verdict.public()

    @api.post("/v1/caption", openapi_extra=_image_body(ImageForm))
    @json_errors
    async def caption(self, request: Request) -> dict[str, Any]:
        """Captions, ranked keywords and the prompt a photo would give."""
        form, raw = await self.parse(request, ImageForm, image="required")
        image = self.decode(raw)
        result: CaptionResult = await self.deadline(self.captioner.caption.remote(image, form.style), None)
        return result.public()

    @api.post("/v1/text2img", openapi_extra=_json_body(Text2ImgRequest))
    @json_errors
    async def text2img(self, request: Request) -> Response:
        """A prompt straight to the generator (no gate, no captions)."""
        started = time.perf_counter()
        body, _ = await self.parse(request, Text2ImgRequest, image="none")
        params = self.params(body, body.prompt, None)
        mix, mix_info = await self.choose_mix(body.mix, body.user_id)
        output = choose_format(request.headers.get("accept", ""))
        info: dict[str, Any] = {"mix": mix_info, "timings": {}}
        return await self.respond(request, output, params, mix, info, body.timeout_s, started, prelude=[])

    @api.post("/v1/generate", openapi_extra=_image_body(GenerateForm))
    @json_errors
    async def generate(self, request: Request) -> Response:
        """classify -> caption -> prompt -> generate. PNG by default; JSON or SSE by `Accept`."""
        started = time.perf_counter()
        form, raw = await self.parse(request, GenerateForm, image="required")
        # 0. Everything that can refuse the request, before any model runs: the options against the
        #    live limits (the prompt comes from the captions later), the mix, the photo.
        self.params(form, PENDING_PROMPT, None)
        mix, mix_info = await self.choose_mix(form.mix, form.user_id)
        image = self.decode(raw)
        output = choose_format(request.headers.get("accept", ""))
        timeout = form.timeout_s or self.config.request_timeout_s
        deadline = started + timeout

        # 1. Gate: not a desk setup -> 422 with the score.
        t = time.perf_counter()
        verdict = await self.deadline(self.classify_or_reject(image), deadline)
        classify_s = time.perf_counter() - t
        # 2. Captions -> keywords -> prompt.
        t = time.perf_counter()
        captioned: CaptionResult = await self.deadline(self.captioner.caption.remote(image, form.style), deadline)
        caption_s = time.perf_counter() - t
        params = self.params(form, captioned.prompt, captioned.negative_prompt)
        info = {
            "desk_score": verdict.score,
            "captions": captioned.captions,
            "keywords": captioned.keyword_dicts(),
            "style": form.style,
            "mix": mix_info,
            "timings": {"classify_s": classify_s, "caption_s": caption_s},
        }
        prelude = []
        if output == "sse":
            prelude = [
                sse("classified", {"score": verdict.score, "threshold": verdict.threshold}),
                sse("captioned", {k: info[k] for k in ("captions", "keywords")} | {"prompt": params.prompt}),
            ]
        # 3. Generate, routed by the mix's multiplexed id.
        return await self.respond(request, output, params, mix, info, timeout, started, prelude=prelude)

    # -- generation and responses ------------------------------------------------------------------

    def decode(self, raw: bytes | None) -> Any:
        return decode_image(raw or b"", field="image", max_bytes=self.config.max_upload_bytes, max_pixels=self.config.max_pixels)

    async def deadline(self, call: Awaitable[T], deadline: float | None, *, cancel: Callable[[], Any] | None = None) -> T:
        """Await a stage call within the request deadline. Past it, cancel the call in its replica
        (a generation stops at its next step) and raise TimeoutError, answered 504."""
        if deadline is None:
            deadline = time.perf_counter() + self.config.request_timeout_s
        try:
            return await asyncio.wait_for(_awaitable(call), max(deadline - time.perf_counter(), 0.001))
        except TimeoutError:
            cancel = cancel or getattr(call, "cancel", None)
            if cancel is not None:
                cancel()
            raise

    async def respond(
        self,
        request: Request,
        output: OutputFormat,
        params: GenerationParams,
        mix: Mix,
        info: dict[str, Any],
        timeout_s: float | None,
        started: float,
        *,
        prelude: list[bytes],
    ) -> Response:
        request_id = _request_id(request)
        deadline = started + (timeout_s or self.config.request_timeout_s)
        handle = self.generator.options(multiplexed_model_id=mix.id)
        generation = GenerationRequest(params=params, limits=self.config.limits)
        if output == "sse":
            stream: Any = handle.options(stream=True).generate_stream.remote(generation)
            # Pull the first event before answering, so an error still gets its status code.
            first = await self.deadline(stream.__anext__(), deadline, cancel=stream.cancel)
            return StreamingResponse(
                self.sse_events(stream, first, prelude, info, request_id, started, deadline),
                media_type="text/event-stream",
                headers={"X-Request-Id": request_id, "X-Deskgen-Mix": mix.id, "Cache-Control": "no-cache"},
            )
        t = time.perf_counter()
        result: GeneratedImage = await self.deadline(handle.generate.remote(generation), deadline)
        info["timings"]["generate_s"] = time.perf_counter() - t
        info["timings"]["total_s"] = time.perf_counter() - started
        headers = {
            "X-Request-Id": request_id,
            "X-Deskgen-Mix": mix.id,
            "X-Deskgen-Mix-Source": info["mix"]["source"],
            "X-Deskgen-Seed": str(params.seed),
            "X-Deskgen-Replica": result.replica,
            "Server-Timing": ", ".join(f"{k.removesuffix('_s')};dur={v * 1000:.1f}" for k, v in info["timings"].items()),
        }
        if info["mix"]["arm"] is not None:
            headers["X-Deskgen-AB-Arm"] = info["mix"]["arm"]
        if "desk_score" in info:
            headers["X-Deskgen-Desk-Score"] = f"{info['desk_score']:.6f}"
        if output == "json":
            return JSONResponse(self.json_result(result, info, request_id), headers=headers)
        return Response(result.png, media_type="image/png", headers=headers)

    def json_result(self, result: GeneratedImage, info: dict[str, Any], request_id: str) -> dict[str, Any]:
        params = result.params
        return {
            "request_id": request_id,
            "image_b64": base64.b64encode(result.png).decode(),
            "media_type": "image/png",
            **info,
            "prompt": params.prompt,
            "negative_prompt": params.negative_prompt,
            "seed": params.seed,
            "steps": params.steps,
            "guidance": params.guidance,
            "width": params.width,
            "height": params.height,
            "metadata": result.metadata,
        }

    async def sse_events(
        self,
        stream: Any,
        first: GenerationEvent,
        prelude: list[bytes],
        info: dict[str, Any],
        request_id: str,
        started: float,
        deadline: float,
    ) -> AsyncIterator[bytes]:
        for chunk in prelude:
            yield chunk
        event: GenerationEvent | None = first
        t = time.perf_counter()
        try:
            while event is not None:
                if isinstance(event, GeneratedImage):
                    info["timings"]["generate_s"] = time.perf_counter() - t
                    info["timings"]["total_s"] = time.perf_counter() - started
                    yield sse(event.event, self.json_result(event, info, request_id))
                    return
                yield sse(event.event, event.public())
                try:
                    event = await self.deadline(stream.__anext__(), deadline, cancel=stream.cancel)
                except StopAsyncIteration:
                    event = None
        except TimeoutError:
            yield sse("error", error_body("timeout", f"the request did not finish within its deadline of {deadline - started:.1f} s."))
        except Exception as exc:
            status, body, _ = error_for(unwrap(exc), self.config.retry_after_s)
            yield sse("error", body | {"status": status})


Ingress = serve.deployment(name="Ingress", ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=64)(
    serve.ingress(api)(IngressRoutes)
)
