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
import datetime as dt
import logging
import os
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal, TypeVar

import swagger_ui_bundle
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.staticfiles import StaticFiles

from deployments import metrics
from deployments.access import AccessMiddleware, api_key_of, door
from deployments.allocation import Allocator
from deployments.http_errors import (
    check_request_id,
    error_body,
    error_for,
    error_response,
    json_error,
    json_errors,
    request_id_of,
    unwrap,
    validation_error,
)
from deployments.http_io import (
    OutputFormat,
    awaitable,
    choose_format,
    image_body,
    json_body,
    json_object,
    read_body,
    sse,
    wants_html,
)
from deployments.ingress_models import (
    FORM_SCHEMAS,
    LOCATE_FORM_SCHEMAS,
    CaptionForm,
    ClassifyForm,
    FeedbackRequest,
    GenerateForm,
    GenerationOptions,
    IngressConfig,
    LocateForm,
    Text2ImgRequest,
    form_values,
)
from deployments.logs import stamp_library_logs
from deployments.openapi import (
    FEEDBACK_ANSWERS,
    answers,
    contract,
    generation_answers,
    page_or_json,
)
from deskgen.boxes import annotate, clean_products
from deskgen.concepts import Concept, with_negative, woven_prompt, woven_style
from deskgen.contracts import (
    CaptionResult,
    GateVerdict,
    GeneratedImage,
    GenerationEvent,
    GenerationRequest,
    Located,
    ProductSource,
)
from deskgen.errors import (
    AdapterUnavailable,
    InvalidParameter,
    LocatorUnavailable,
    NotADeskSetup,
    NotAnImage,
    RecorderUnavailable,
    UnknownExperiment,
    UnknownImage,
)
from deskgen.experiments.buffer import ExposureBuffer, Reservation
from deskgen.experiments.page import render_experiment_list_page, render_report_page
from deskgen.experiments.records import Experiment, Exposure, Feedback, Sender
from deskgen.generator.params import GenerationParams
from deskgen.images import decode_image
from deskgen.limits import MAX_FORM_FIELDS, MAX_FORM_FILES, MAX_SEED
from deskgen.loras import LORA_SUFFIX, LoraRegistry
from deskgen.mixes import Mix, MixCatalog
from deskgen.paths import resolve
from deskgen.pngmeta import PRODUCTS_KEY, encode_png, with_text
from deskgen.prompts.build import DEFAULT_NEGATIVE_PROMPT
from deskgen.prompts.captions import rank_keywords

log = logging.getLogger("ray.serve")
#: Stages /readyz reports without waiting for them: generation goes on while they are down.
OPTIONAL_STAGES = frozenset({"recorder", "locator"})
T = TypeVar("T")

#: A request's concept preset: its name (``auto`` resolved) and the preset.
Chosen = tuple[str, Concept]

#: The prompt /v1/generate validates its options with before the captions exist (replaced by theirs).
PENDING_PROMPT = "(from the captions)"


@dataclass(frozen=True)
class LocatePlan:
    """What a generation asks of the locator: the products (and where the list came from) and whether to
    draw them; ``off`` says why it is not asked at all."""

    products: tuple[str, ...] = ()
    source: ProductSource | None = None
    annotate: bool = False
    off: str | None = None


api = FastAPI(
    title="deskgen",
    version="1.0.0",
    description="Upload a desk photo, get a new desk-setup image in a LoRA style mix.",
    docs_url=None,  # served below from local assets: deskgen runs where no CDN can be reached
    redoc_url=None,
)
# The door first (innermost), so the request metrics (outermost) count its refusals too.
api.add_middleware(AccessMiddleware, routes=api.router.routes)
api.add_middleware(metrics.RequestMetricsMiddleware)
api.mount("/docs/assets", StaticFiles(directory=swagger_ui_bundle.swagger_ui_path), name="docs-assets")
#: The web page for people (deployments/web/: no build step, no CDN), found next to this module.
WEB_DIR = Path(__file__).resolve().parent / "web"
api.mount("/ui", StaticFiles(directory=WEB_DIR), name="ui")


def _openapi(config: IngressConfig | None = None) -> dict[str, Any]:
    """The document for ``config`` (built again by each reconfigure: it states the live limits and keys)."""
    if config is not None or api.openapi_schema is None:
        config = config or IngressConfig()
        api.openapi_schema = None
        api.openapi_schema = contract(FastAPI.openapi(api), config.limits, config.max_upload_bytes, keys=bool(config.api_keys))
    return api.openapi_schema


api.openapi = _openapi  # type: ignore[method-assign]


@api.get("/", include_in_schema=False)
async def page() -> HTMLResponse:
    """The web page: try a photo or a prompt, watch it generate, compare mixes, send feedback. It uses only
    the public API (its assets under /ui/)."""
    return HTMLResponse((WEB_DIR / "index.html").read_text(encoding="utf-8"), headers={"Cache-Control": "no-cache"})


@api.get("/docs", include_in_schema=False)
async def docs() -> HTMLResponse:
    """Swagger UI for the OpenAPI document, with its script and style served by deskgen itself."""
    return get_swagger_ui_html(
        openapi_url="/openapi.json", title="deskgen API", swagger_js_url="/docs/assets/swagger-ui-bundle.js",
        swagger_css_url="/docs/assets/swagger-ui.css", swagger_favicon_url="/docs/assets/favicon-32x32.png",
    )  # fmt: skip


def _given(value: T | None, default: T) -> T:
    return default if value is None else value


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return json_error(request, exc)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    body = error_body(code, str(exc.detail)) | {"request_id": request_id_of(request)}
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
        recorder: DeploymentHandle,
        lora_dir: str | None = None,
        locator: DeploymentHandle | None = None,
    ) -> None:
        stamp_library_logs()
        self.classifier = classifier
        self.captioner = captioner
        self.generator = generator
        self.recorder = recorder
        #: Finds products in generated images; a generation never waits on it past ``locate_timeout_s``.
        self.locator = locator
        self.config = IngressConfig()
        #: Exposures wait here for the recorder: a request never waits on the database.
        self.exposures = ExposureBuffer(
            self.write_exposures, capacity=self.config.exposure_buffer, flush_interval_s=self.config.exposure_flush_s,
            on_settled=self.exposure_settled,
        )
        #: The adapters are the ``*.safetensors`` files in the generators' ``lora_dir``, listed here
        #: without asking a GPU replica (and re-listed every ``catalog_ttl_s``, so a file added there is
        #: usable without a restart). Where the folder is not visible from the ingress's node, the
        #: list comes from a Generator replica instead (same refresh).
        self.lora_dir = resolve(lora_dir) if lora_dir else None
        self._adapters: tuple[str, ...] | None = None
        #: Adapter files present but unusable (deskgen.loras.lora_file_problem), with the reason.
        self._unavailable: dict[str, str] = {}
        self._adapters_at = 0.0
        self._registry: LoraRegistry | None = None  # caches each file's header check
        #: Adapters a generator replica refused (AdapterUnavailable): name -> (file version, reason).
        self._replica_unavailable: dict[str, tuple[tuple[int, int] | None, str]] = {}
        self._catalog: MixCatalog | None = None
        #: Canonical mix id -> its name in the catalogue (the ``mix`` label of the metrics).
        self._mix_names: dict[str, str] = {}
        #: Which arm a user gets (sticky; under Thompson allocation the weights come from the store).
        self.allocator = Allocator(self.recorder_method)

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        self.config = IngressConfig.model_validate(user_config)
        self._catalog = None  # rebuilt against the new named mixes on next use
        self.exposures.capacity = self.config.exposure_buffer
        self.exposures.flush_interval_s = self.config.exposure_flush_s
        door.configure(self.config.api_keys, shed_load=self.config.shed_load, retry_after_s=self.config.retry_after_s)
        _openapi(self.config)  # the document states the live limits and whether keys are required
        if self.config.api_keys:
            log.info("API keys: %d configured (%s)", len(self.config.api_keys), ", ".join(k.name for k in self.config.api_keys))
        else:
            log.warning("API keys: none configured, so the API is open to anyone who reaches it "
                        "(add user_config.api_keys; mint one with `python -m deskgen.apikeys NAME`)")
        log.info("ingress config: default_mix=%s ab_split=%s experiment=%s", self.config.default_mix,
                 self.config.ab_split, self.config.experiment.id)  # fmt: skip

    async def __del__(self) -> None:
        # A replica being replaced (serve deploy, downscale) hands its buffered exposures over first.
        await self.exposures.close(timeout_s=10.0)

    # -- mixes ---------------------------------------------------------------------------------

    async def adapters(self) -> tuple[str, ...]:
        now = time.monotonic()
        if self._adapters is not None and now - self._adapters_at < self.config.catalog_ttl_s:
            return self._adapters
        if self.lora_dir is not None and self.lora_dir.is_dir():
            # The same header check a generator replica runs at start (no torch here): a bad file is listed
            # as unavailable and a mix naming it answered 422, not a 500 from the replica.
            if self._registry is None or self._registry.folder != self.lora_dir.resolve():
                self._registry = LoraRegistry(self.lora_dir)
            present = self._registry.names()
            # What only a replica can tell (the key mapping onto the model needs torch) is merged in once a
            # replica refused a file (self.deadline notes it), for as long as that file is unchanged.
            unavailable = self._replica_verdicts(present) | self._registry.problems()
            names = tuple(n for n in present if n not in unavailable)
        else:
            info = await self.generator.info.remote()
            names, unavailable = tuple(info["adapters"]), dict(info.get("unavailable", {}))
        if names != self._adapters or unavailable != self._unavailable:
            self._catalog = None
        self._adapters, self._unavailable, self._adapters_at = names, unavailable, now
        return names

    def _file_version(self, name: str) -> tuple[int, int] | None:
        try:
            stat = (self.lora_dir / f"{name}{LORA_SUFFIX}").stat() if self.lora_dir is not None else None
        except OSError:
            return None
        return (stat.st_size, stat.st_mtime_ns) if stat is not None else None

    def note_unavailable(self, exc: AdapterUnavailable) -> None:
        """A generator replica refused an adapter: list it as unavailable until its file changes, and
        re-read the catalogue on the next request (polling the replicas instead would queue calls behind
        their generations)."""
        name, reason = str(exc.extra.get("adapter", "")), str(exc.extra.get("reason", ""))
        if name:
            self._replica_unavailable[name] = (self._file_version(name), reason)
            self._adapters_at = float("-inf")

    def _replica_verdicts(self, present: list[str]) -> dict[str, str]:
        for name, (version, _) in list(self._replica_unavailable.items()):
            if name not in present or version != self._file_version(name):
                del self._replica_unavailable[name]  # gone or replaced: the replica checks it again
        return {name: reason for name, (_, reason) in self._replica_unavailable.items()}

    async def catalog(self) -> MixCatalog:
        adapters = await self.adapters()
        if self._catalog is None:
            self._catalog = MixCatalog(list(adapters), self.config.mixes, unavailable=self._unavailable)
            self._mix_names = {m.id: n for n, m in reversed(self._catalog.named.items())}
        return self._catalog

    async def choose_mix(
        self, requested: str | None, user_id: str | None, concept: Chosen | None = None
    ) -> tuple[Mix, dict[str, Any]]:
        """The mix to use and how it was chosen: ``request``, ``header``, ``concept`` (the concept preset's
        mix), ``ab`` or ``default``."""
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
        elif concept is not None and concept[1].mix is not None:
            name, source, arm = concept[1].mix, "concept", None
        elif self.config.ab_split:
            arm = await self.allocator.arm(self.config.experiment, user_id)
            name, source = arm, "ab"
        else:
            name, source, arm = self.config.default_mix, "default", None
        field = "serve_multiplexed_model_id" if source == "header" else "mix"
        mix = catalog.resolve(name, field=field)
        named = name if name in catalog.named else None
        return mix, {"id": mix.id, "name": named, "weights": mix.as_dict(), "source": source, "arm": arm}

    # -- the experiment loop -------------------------------------------------------------------

    def begin_exposure(
        self, request: Request, mix_info: dict[str, Any], user_id: str | None, style: str | None, concept: Chosen | None
    ) -> Reservation:
        """Take the request's place in the exposure buffer (503 when full, before any model runs). The
        outcome is settled once: ``ok`` at delivery, or the error code the client got (by ``json_errors``)."""
        source = mix_info["source"]
        arm = mix_info["arm"] if source == "ab" else self.config.default_mix if source == "default" else None
        exposure = self.exposures.reserve(
            self.config.experiment, image_id=request_id_of(request), user_id=user_id, arm=arm,
            mix_id=mix_info["id"], mix_source=source, style=style, concept=concept[0] if concept else None,
            api_key=api_key_of(request),
        )  # fmt: skip
        request.state.exposure = exposure
        return exposure

    async def write_exposures(self, experiments: list[Experiment], batch: list[Exposure]) -> None:
        await self.recorder_call(self.recorder.record_exposures.remote(experiments, batch))
        metrics.exposure_buffer(self.exposures.stats.pending - len(batch))

    def exposure_settled(self, exposure: Exposure) -> None:
        metrics.exposure(exposure.experiment_id, exposure.arm, exposure.outcome)
        metrics.exposure_buffer(self.exposures.stats.pending)

    async def recorder_method(self, name: str, args: tuple[Any, ...]) -> Any:
        return await self.recorder_call(getattr(self.recorder, name).remote(*args))

    async def delivered(self, exposure: Reservation) -> None:
        """Before an image goes out: wait (at most ``exposure_commit_wait_s``) until its exposure is
        committed to the store, so an ingress replica killed after delivering loses no exposure. Past the
        wait (the store is down) the image goes out and its exposure stays buffered."""
        if not await exposure.committed(self.config.exposure_commit_wait_s):
            metrics.exposure_commit_timeout()

    async def recorder_call(self, call: Awaitable[T]) -> T:
        """A call to the experiment store, bounded by ``recorder_timeout_s`` (then 503: nothing was
        acknowledged, and every write is idempotent, so the client may retry)."""
        try:
            return await asyncio.wait_for(awaitable(call), self.config.recorder_timeout_s)
        except TimeoutError:
            cancel = getattr(call, "cancel", None)
            if cancel is not None:
                cancel()
            raise RecorderUnavailable(
                f"the experiment store did not answer within {self.config.recorder_timeout_s} s: retry."
            ) from None

    # -- request parsing -----------------------------------------------------------------------

    async def parse(self, request: Request, model: type[T], *, image: Literal["required", "none"]) -> tuple[T, bytes | None]:
        """Validate a multipart or JSON request into ``model``; return it and the raw image bytes."""
        check_request_id(request)
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        limit = self.config.max_upload_bytes * 4 // 3 + 64 * 1024  # base64 and form overhead
        body = await read_body(request, limit, "image" if image == "required" else "body")
        raw_image: bytes | None = None
        if content_type == "multipart/form-data":
            try:
                form = await request.form(max_files=MAX_FORM_FILES, max_fields=MAX_FORM_FIELDS)
            except StarletteHTTPException as exc:  # too many fields or files, a malformed multipart body
                raise InvalidParameter(
                    f"`body` is not an acceptable multipart form ({exc.detail}): at most {MAX_FORM_FIELDS} fields "
                    f"and {MAX_FORM_FILES} files.", field="body",
                ) from None
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
                elif key in fields:  # a repeated field (products=monitor&products=lamp) is a list
                    fields[key] = [*fields[key], value] if isinstance(fields[key], list) else [fields[key], value]
                else:
                    fields[key] = value
            fields = form_values(fields)
        elif content_type == "application/json":
            fields = json_object(body)
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

    def params(
        self, options: GenerationOptions, prompt: str, negative_prompt: str | None, concept: Chosen | None = None
    ) -> GenerationParams:
        """Fill omitted options from the concept's defaults, then the configured ones, and check them
        against the live limits. An explicit "" negative prompt means none; omitted means the captioner's
        (or the default) plus the concept's additions."""
        c = self.config
        preset = concept[1] if concept else None
        negative = _given(negative_prompt, DEFAULT_NEGATIVE_PROMPT)
        if preset is not None:
            negative = with_negative(negative, preset.negative)
        params = GenerationParams(
            prompt=prompt,
            negative_prompt=_given(options.negative_prompt, negative),
            seed=_given(options.seed, random.randint(0, MAX_SEED)),
            steps=_given(options.steps, _given(preset.steps if preset else None, c.default_steps)),
            guidance=_given(options.guidance, _given(preset.guidance if preset else None, c.default_guidance)),
            width=_given(options.width, c.default_width),
            height=_given(options.height, c.default_height),
            concept=concept[0] if concept else None,
        )
        return params.validate(c.limits)

    def concept(self, options: GenerationOptions) -> Chosen | None:
        """The request's concept preset: its name (``auto``: today's by the schedule) -> (name, preset);
        None without one. 404 for an unknown name."""
        if options.concept is None:
            return None
        return self.config.resolve(options.concept, dt.datetime.now(dt.UTC))

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
    async def healthz(self) -> dict[str, Any]:
        """Liveness of the ingress itself: which replica answered, and its door (``admission``: the generation
        requests it holds, how many the generator takes from it, how many it shed). Asks no stage."""
        door.ensure_polling()
        admission = asdict(door.admission.stats) | {"shed_load": door.shed_load, "topology_error": door.topology_error}
        return {"status": "ok", "replica": serve.get_replica_context().replica_id.unique_id, "admission": admission}

    async def info(self) -> dict[str, Any]:
        """This replica's process and id (a handle call, not a route: for ops tools and the fault tests)."""
        return {"pid": os.getpid(), "replica": serve.get_replica_context().replica_id.unique_id}

    @api.get("/readyz", responses={503: {"description": "a model stage does not answer (same body)"}})
    async def readyz(self) -> JSONResponse:
        """Ready when every model stage answers a ping within 5 s. The experiment recorder and the product
        locator are reported but do not make the ingress unready: while the recorder is down, exposures wait
        in this replica's buffer (``exposures``: pending, written, failed flushes, requests refused because
        it was full); while the locator is down, images are delivered with ``products.status: failed``."""
        stages = {"classifier": self.classifier, "captioner": self.captioner, "generator": self.generator,
                  "recorder": self.recorder, "locator": self.locator}  # fmt: skip
        results: dict[str, str] = {}
        for name, handle in stages.items():
            if handle is None:
                results[name] = "not deployed"
                continue
            try:
                results[name] = await asyncio.wait_for(awaitable(handle.ping.remote()), 5.0)
            except Exception as exc:
                results[name] = f"unavailable: {type(unwrap(exc)).__name__}"
        ready = all(v == "ok" for name, v in results.items() if name not in OPTIONAL_STAGES)
        body = {"ready": ready, "stages": results, "exposures": asdict(self.exposures.stats)}
        return JSONResponse(body, status_code=200 if ready else 503)

    @api.get("/v1/mixes", responses=answers(503))
    @json_errors
    async def mixes(self, request: Request) -> dict[str, Any]:
        """Adapters, the adapter files that cannot be loaded (``unavailable``: name -> reason; a mix naming
        one is answered 422), named mixes (with canonical ids) and the live A/B split."""
        catalog = await self.catalog()
        total = sum(self.config.ab_split.values())
        return {
            "adapters": sorted(catalog.available),
            "unavailable": dict(sorted(catalog.unavailable.items())),
            "named_mixes": {n: {"id": m.id, "weights": m.as_dict()} for n, m in catalog.named.items()},
            "default_mix": self.config.default_mix,
            "ab_split": {arm: share / total for arm, share in self.config.ab_split.items()},
            "ab_salt": self.config.ab_salt,
            "ab_policy": self.config.experiment.policy.public(),
            "ab_weights": await self.live_weights(),
        }

    async def live_weights(self) -> dict[str, float]:
        """The share of new users each arm gets now (the split, or the bandit's current weights)."""
        if not self.config.ab_split:
            return {}
        return await self.allocator.weights(self.config.experiment)

    @api.get("/v1/limits")
    async def limits(self) -> dict[str, Any]:
        """The live request limits and defaults: what a client may send without a 400."""
        return self.config.limits_document()

    @api.get("/v1/concepts")
    async def concepts(self) -> dict[str, Any]:
        """The concept presets, the weekday schedule with its time zone, and today's pick (``concept=auto``)."""
        return self.config.listing(dt.datetime.now(dt.UTC))

    @api.post("/v1/classify", openapi_extra=image_body(ClassifyForm), responses=answers(400, 413, 415, 503, 504))
    @json_errors
    async def classify(self, request: Request) -> dict[str, Any]:
        """Desk score of a photo (200 either way; /v1/generate answers 422 below the threshold)."""
        _, raw = await self.parse(request, ClassifyForm, image="required")
        image = self.decode(raw)
        verdict: GateVerdict = await self.deadline(self.classifier.classify.remote(image), None)
        return verdict.public()

    @api.post("/v1/caption", openapi_extra=image_body(CaptionForm), responses=answers(400, 413, 415, 503, 504))
    @json_errors
    async def caption(self, request: Request) -> dict[str, Any]:
        """Captions, ranked keywords and the prompt a photo would give."""
        form, raw = await self.parse(request, CaptionForm, image="required")
        image = self.decode(raw)
        result: CaptionResult = await self.deadline(self.captioner.caption.remote(image, form.style), None)
        return result.public()

    @api.post("/v1/text2img", openapi_extra=json_body(Text2ImgRequest),
              responses=generation_answers(400, 404, 413, 415, 422, 503, 504))  # fmt: skip
    @json_errors
    async def text2img(self, request: Request) -> Response:
        """A prompt straight to the generator (no gate, no captions)."""
        started = time.perf_counter()
        body, _ = await self.parse(request, Text2ImgRequest, image="none")
        concept = self.concept(body)
        prompt = woven_prompt(body.prompt, concept[1].prompt) if concept else body.prompt
        params = self.params(body, prompt, None, concept)
        mix, mix_info = await self.choose_mix(body.mix, body.user_id, concept)
        exposure = self.begin_exposure(request, mix_info, body.user_id, None, concept)
        output = choose_format(request.headers.get("accept", ""))
        info: dict[str, Any] = {"mix": mix_info, "concept": params.concept, "timings": exposure.timings}
        plan = self.locate_plan(body, [k.name for k in rank_keywords([prompt])], "prompt")
        return await self.respond(request, output, params, mix, info, body.timeout_s, started, plan, prelude=[])

    @api.post("/v1/generate", openapi_extra=image_body(GenerateForm, FORM_SCHEMAS),
              responses=generation_answers(400, 404, 413, 415, 422, 503, 504))  # fmt: skip
    @json_errors
    async def generate(self, request: Request) -> Response:
        """classify -> caption -> prompt -> generate. PNG by default; JSON or SSE by `Accept`."""
        started = time.perf_counter()
        form, raw = await self.parse(request, GenerateForm, image="required")
        # 0. Everything that can refuse the request, before any model runs: the options against the
        #    live limits (the prompt comes from the captions later), the mix, the photo.
        concept = self.concept(form)
        style = woven_style(concept[1].prompt, form.style) if concept else form.style
        self.params(form, PENDING_PROMPT, None, concept)
        mix, mix_info = await self.choose_mix(form.mix, form.user_id, concept)
        exposure = self.begin_exposure(request, mix_info, form.user_id, form.style, concept)
        image = self.decode(raw)
        output = choose_format(request.headers.get("accept", ""))
        timeout = form.timeout_s or self.config.request_timeout_s
        deadline = started + timeout

        # 1. Gate: not a desk setup -> 422 with the score.
        t = time.perf_counter()
        try:
            verdict = await self.deadline(self.classify_or_reject(image), deadline)
        finally:
            exposure.timings["classify_s"] = time.perf_counter() - t
            metrics.stage_seconds("gate", exposure.timings["classify_s"])
        # 2. Captions -> keywords -> prompt.
        t = time.perf_counter()
        captioned: CaptionResult = await self.deadline(self.captioner.caption.remote(image, style), deadline)
        exposure.timings["caption_s"] = time.perf_counter() - t
        metrics.stage_seconds("caption", exposure.timings["caption_s"])
        params = self.params(form, captioned.prompt, captioned.negative_prompt, concept)
        info = {
            "desk_score": verdict.score,
            "captions": captioned.captions,
            "keywords": captioned.keyword_dicts(),
            "style": form.style,
            "concept": params.concept,
            "mix": mix_info,
            "timings": exposure.timings,
        }
        prelude = []
        if output == "sse":
            prelude = [
                sse("classified", {"score": verdict.score, "threshold": verdict.threshold}),
                sse("captioned", {k: info[k] for k in ("captions", "keywords")} | {"prompt": params.prompt}),
            ]
        # 3. Generate, routed by the mix's multiplexed id; then locate the products in the image.
        plan = self.locate_plan(form, [k.name for k in captioned.keywords], "captions")
        return await self.respond(request, output, params, mix, info, timeout, started, plan, prelude=prelude)

    @api.post("/v1/locate", openapi_extra=image_body(LocateForm, LOCATE_FORM_SCHEMAS), responses=answers(400, 413, 415, 503, 504))
    @json_errors
    async def locate_products(self, request: Request) -> dict[str, Any]:
        """Where the named products are in any image (one the backend already has, or one deskgen made):
        per product its boxes in pixels and normalised to [0, 1], with scores; ``found: false`` when none
        passes the threshold. ``annotate`` adds a copy with the boxes drawn."""
        form, raw = await self.parse(request, LocateForm, image="required")
        image = self.decode(raw)
        if self.locator is None:
            raise LocatorUnavailable("`products`: this deployment has no product locator.", field="products")
        located: Located = await self.deadline(self.locator.locate.remote(image, clean_products(form.products)), None)
        located = replace(located, source="request")
        answer: dict[str, Any] = {"products": located.public()}
        if form.annotate:
            answer["annotated_b64"] = await asyncio.to_thread(self.annotated_b64, image, located)
        return answer

    @api.post("/v1/feedback", status_code=201, openapi_extra=json_body(FeedbackRequest),
              responses=answers(400, 403, 404, 409, 413, 415, 503, ok=FEEDBACK_ANSWERS))  # fmt: skip
    @json_errors
    async def feedback(self, request: Request) -> JSONResponse:
        """What the user did with an image. 201 once stored (committed), 200 for a repeat of the same
        (image_id, event): a retry never double counts. 404 unknown image. Who may rate an image: with API
        keys configured, only the API key that generated it (403 `feedback_forbidden`, field `image_id`);
        an image delivered to a `user_id` needs that `user_id` (403 without one, field `user_id`; 409
        `user_mismatch` with another)."""
        body, _ = await self.parse(request, FeedbackRequest, image="none")
        fb = Feedback(image_id=body.image_id, event=body.event, user_id=body.user_id, value=body.value)
        sender = Sender(api_key=api_key_of(request), keys_required=bool(self.config.api_keys))
        # This replica's own exposures first: the image may have been delivered a moment ago.
        await self.exposures.flush()
        try:
            new = await self.recorder_call(self.recorder.record_feedback.remote(fb, sender))
        except Exception as exc:
            if not isinstance(unwrap(exc), UnknownImage):
                raise
            # Delivered through another ingress replica, whose buffer flushes within exposure_flush_s.
            await asyncio.sleep(2 * self.config.exposure_flush_s)
            new = await self.recorder_call(self.recorder.record_feedback.remote(fb, sender))
        answer = {"image_id": fb.image_id, "event": fb.event, "recorded": True, "duplicate": not new}
        return JSONResponse(answer, status_code=201 if new else 200)

    @api.get("/v1/experiments", responses=answers(503, ok=page_or_json("every experiment")))
    @json_errors
    async def experiments(self, request: Request) -> Response:
        """Every experiment with its split, salt, start, exposures and users; ``current`` is the one the
        live config runs. HTML for ``Accept: text/html``."""
        await self.exposures.flush()  # what this replica delivered so far is in the answer
        listed: list[dict[str, Any]] = await self.recorder_call(self.recorder.experiments.remote())
        if wants_html(request):
            return HTMLResponse(render_experiment_list_page(listed))
        return JSONResponse({"current": self.config.experiment.id, "experiments": listed})

    @api.get("/v1/experiments/{experiment_id}", responses=answers(404, 503, ok=page_or_json("the report")))
    @json_errors
    async def experiment_report(self, request: Request, experiment_id: str) -> Response:
        """Per arm: users, exposures, event rates with 95 % CIs (the user is the unit), differences against
        the control, the sample-ratio test and guardrails. HTML with a chart for ``Accept: text/html``."""
        await self.exposures.flush()
        report = await self.recorder_call(self.recorder.report.remote(experiment_id, self.config.experiment))
        if report is None:
            raise UnknownExperiment(f"`experiment_id`: no experiment {experiment_id!r} was recorded.", field="experiment_id")
        if wants_html(request):
            return HTMLResponse(render_report_page(report))
        return JSONResponse(report)

    # -- generation and responses ------------------------------------------------------------------

    def decode(self, raw: bytes | None) -> Any:
        return decode_image(raw or b"", field="image", max_bytes=self.config.max_upload_bytes, max_pixels=self.config.max_pixels)

    async def deadline(self, call: Awaitable[T], deadline: float | None, *, cancel: Callable[[], Any] | None = None) -> T:
        """Await a stage call within the request deadline. Past it, cancel the call in its replica
        (a generation stops at its next step) and raise TimeoutError, answered 504."""
        if deadline is None:
            deadline = time.perf_counter() + self.config.request_timeout_s
        try:
            return await asyncio.wait_for(awaitable(call), max(deadline - time.perf_counter(), 0.001))
        except TimeoutError:
            cancel = cancel or getattr(call, "cancel", None)
            if cancel is not None:
                cancel()
            raise
        except Exception as exc:
            cause = unwrap(exc)
            if isinstance(cause, AdapterUnavailable):
                self.note_unavailable(cause)
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
        plan: LocatePlan,
        *,
        prelude: list[bytes],
    ) -> Response:
        request_id = request_id_of(request)
        exposure: Reservation = request.state.exposure
        deadline = started + (timeout_s or self.config.request_timeout_s)
        handle = self.generator.options(multiplexed_model_id=mix.id)
        generation = GenerationRequest(params=params, limits=self.config.limits,
                                       mix_label=metrics.mix_label(mix.id, self._mix_names))  # fmt: skip
        if output == "sse":
            stream: Any = handle.options(stream=True).generate_stream.remote(generation)
            # Pull the first event before answering, so an error still gets its status code.
            first = await self.deadline(stream.__anext__(), deadline, cancel=stream.cancel)
            return StreamingResponse(
                self.sse_events(stream, first, prelude, info, exposure, started, deadline, plan, metrics.route_of(request.scope)),
                media_type="text/event-stream",
                headers={"X-Deskgen-Mix": mix.id, "Cache-Control": "no-cache"},
            )
        t = time.perf_counter()
        result: GeneratedImage = await self.deadline(handle.generate.remote(generation), deadline)
        info["timings"]["generate_s"] = time.perf_counter() - t
        result, located = await self.with_products(result, plan, info)
        info["timings"]["total_s"] = time.perf_counter() - started
        headers = {
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
        headers["X-Deskgen-Products"] = located.status
        if located.status == "ok":
            headers["X-Deskgen-Products-Found"] = f"{sum(i.found for i in located.items)}/{len(located.items)}"
        response = (
            JSONResponse(self.json_result(result, info, request_id), headers=headers)
            if output == "json"
            else Response(result.png, media_type="image/png", headers=headers)
        )
        exposure.settle("ok", 200, seed=params.seed, found_fraction=located.found_fraction)
        await self.delivered(exposure)
        return response

    # -- product location ------------------------------------------------------------------------

    def locate_plan(self, options: GenerationOptions, named: Sequence[str], source: ProductSource) -> LocatePlan:
        """The products to find in the generated image: the request's, else the first ``default_products``
        objects its captions (or prompt) ``named``."""
        if not options.locate:
            return LocatePlan(off="turned off by the request (`locate: false`)")
        if self.locator is None:
            return LocatePlan(off="this deployment has no product locator")
        if options.products is not None:
            products, source = clean_products(options.products), "request"
        else:
            products = tuple(named[: self.config.default_products])
        if not products:
            return LocatePlan(off="no products to look for: name them in `products`")
        return LocatePlan(products=products, source=source, annotate=options.annotate)

    async def locate(self, png: bytes, plan: LocatePlan) -> Located:
        """The products in a generated image. Never raises: a locator that fails or takes longer than
        ``locate_timeout_s`` gives ``status`` failed/timeout with the reason; the image goes out regardless."""
        if self.locator is None or plan.off is not None:
            return Located(status="off", reason=plan.off)
        timeout = self.config.locate_timeout_s
        start = time.perf_counter()
        try:
            located: Located = await self.deadline(self.locator.locate.remote(png, plan.products), start + timeout)
        except TimeoutError:
            located = Located(status="timeout", reason=f"the product locator did not answer within {timeout} s")
        except Exception as exc:
            cause = unwrap(exc)
            log.warning("product locator failed; the image is delivered without products: %r", cause)
            located = Located(status="failed", reason=f"the product locator failed ({type(cause).__name__}: {cause})"[:500])
        metrics.stage_seconds("locate", time.perf_counter() - start)
        metrics.located(located.status)
        return replace(located, source=plan.source)

    async def with_products(self, result: GeneratedImage, plan: LocatePlan, info: dict[str, Any]) -> tuple[GeneratedImage, Located]:
        """Locate the products in ``result`` and record them in its PNG (a ``deskgen-products`` text chunk)
        and in ``info`` (the answer's ``products``, and ``annotated_b64`` when asked)."""
        t = time.perf_counter()
        located = await self.locate(result.png, plan)
        info["timings"]["locate_s"] = time.perf_counter() - t
        info["products"] = located.public()
        if plan.annotate and located.status == "ok":
            info["annotated_b64"] = await asyncio.to_thread(self.annotated_b64, result.png, located)
        return replace(result, png=with_text(result.png, PRODUCTS_KEY, located.public())), located

    def annotated_b64(self, image: Any, located: Located) -> str:
        """A copy of ``image`` (PIL, or PNG bytes) with the boxes and labels drawn, as base64 PNG."""
        if isinstance(image, bytes):
            image = decode_image(image, field="image")
        return base64.b64encode(encode_png(annotate(image, located.items))).decode()

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
        exposure: Reservation,
        started: float,
        deadline: float,
        plan: LocatePlan,
        route: str,
    ) -> AsyncIterator[bytes]:
        event: GenerationEvent | None = first
        t = time.perf_counter()
        try:
            for chunk in prelude:
                yield chunk
            while event is not None:
                if isinstance(event, GeneratedImage):
                    info["timings"]["generate_s"] = time.perf_counter() - t
                    event, located = await self.with_products(event, plan, info)
                    yield sse("located", info["products"])
                    info["timings"]["total_s"] = time.perf_counter() - started
                    done = sse(event.event, self.json_result(event, info, exposure.image_id))
                    exposure.settle("ok", 200, seed=event.params.seed, found_fraction=located.found_fraction)
                    await self.delivered(exposure)
                    yield done
                    return
                yield sse(event.event, event.public())
                try:
                    event = await self.deadline(stream.__anext__(), deadline, cancel=stream.cancel)
                except StopAsyncIteration:
                    event = None
        except TimeoutError:
            exposure.settle("timeout", 504)
            metrics.request_error(route, 504, "timeout")
            yield sse("error", error_body("timeout", f"the request did not finish within its deadline of {deadline - started:.1f} s."))
        except Exception as exc:
            status, body, _ = error_for(unwrap(exc), self.config.retry_after_s)
            exposure.settle(body["error"]["code"], status)
            metrics.request_error(route, status, body["error"]["code"])
            yield sse("error", body | {"status": status})
        finally:
            # The client went away before the image was done: not delivered, recorded as such.
            exposure.settle("client_closed", 499)


Ingress = serve.deployment(name="Ingress", ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=64)(
    serve.ingress(api)(IngressRoutes)
)
