"""The HTTP ingress: FastAPI on ``@serve.ingress``, holding handles to the model stages.

App construction and middleware order are at the top; each route is a few lines: parse the request into
its typed model (deployments/forms.py), hand it to the generation pipeline (deployments/pipeline.py) or a
stage, render the answer (deployments/render.py: PNG, JSON or server-sent events by ``Accept``). The mix
catalogue and choice are deployments/catalogue.py; A/B arms deployments/allocation.py. It never imports
TensorFlow or torch.
"""

# No `from __future__ import annotations`: Serve pickles this class by value, and FastAPI must
# resolve the route annotations (Request) in the replica, where string annotations cannot be.

import asyncio
import datetime as dt
import logging
import os
from collections.abc import Awaitable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Literal, TypeVar

import swagger_ui_bundle
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.staticfiles import StaticFiles

from deployments import metrics, render
from deployments.access import AccessMiddleware, api_key_of, door
from deployments.allocation import Allocator
from deployments.catalogue import MixCatalogue
from deployments.forms import parse
from deployments.http_errors import error_body, error_response, json_error, json_errors, request_id_of, unwrap
from deployments.http_io import awaitable, choose_format, image_body, json_body, wants_html
from deployments.ingress_models import (
    FORM_SCHEMAS,
    LOCATE_FORM_SCHEMAS,
    CaptionForm,
    ClassifyForm,
    FeedbackRequest,
    GenerateForm,
    IngressConfig,
    LocateForm,
    Text2ImgRequest,
)
from deployments.logs import stamp_library_logs
from deployments.openapi import FEEDBACK_ANSWERS, answers, contract, generation_answers, page_or_json
from deployments.pipeline import Caller, GenerationPipeline, GenerationRun
from deskgen.boxes import clean_products
from deskgen.contracts import CaptionResult, GateVerdict, Located
from deskgen.errors import LocatorUnavailable, RecorderUnavailable, UnknownExperiment, UnknownImage
from deskgen.experiments.buffer import ExposureBuffer
from deskgen.experiments.page import render_experiment_list_page, render_report_page
from deskgen.experiments.records import Experiment, Exposure, Feedback, Sender
from deskgen.images import decode_image
from deskgen.paths import resolve

log = logging.getLogger("ray.serve")
#: Stages /readyz reports without waiting for them: generation goes on while they are down.
OPTIONAL_STAGES = frozenset({"recorder", "locator"})
T = TypeVar("T")


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
    """Routes: parsing, the answer's format and the experiment's routes. Holds no model; generation is the
    pipeline's.

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
        self.locator = locator
        self.config = IngressConfig()
        #: Exposures wait here for the recorder: no model waits on the database.
        self.exposures = ExposureBuffer(
            self.write_exposures, capacity=self.config.exposure_buffer, flush_interval_s=self.config.exposure_flush_s,
            on_settled=self.exposure_settled,
        )
        #: Which arm a user gets (sticky; under Thompson allocation the weights come from the store).
        self.allocator = Allocator(self.recorder_method)
        self.catalogue = MixCatalogue(lambda: self.config, generator, resolve(lora_dir) if lora_dir else None,
                                      self.allocator)  # fmt: skip
        stages = {"classifier": classifier, "captioner": captioner, "generator": generator, "locator": locator}
        self.pipeline = GenerationPipeline(lambda: self.config, stages, self.catalogue, self.exposures)

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        self.config = IngressConfig.model_validate(user_config)
        self.catalogue.reconfigured()  # rebuilt against the new named mixes on next use
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

    # -- the experiment store ------------------------------------------------------------------

    async def write_exposures(self, experiments: list[Experiment], batch: list[Exposure]) -> None:
        await self.recorder_call(self.recorder.record_exposures.remote(experiments, batch))
        metrics.exposure_buffer(self.exposures.stats.pending - len(batch))

    def exposure_settled(self, exposure: Exposure) -> None:
        metrics.exposure(exposure.experiment_id, exposure.arm, exposure.outcome)
        metrics.exposure_buffer(self.exposures.stats.pending)

    async def recorder_method(self, name: str, args: tuple[Any, ...]) -> Any:
        return await self.recorder_call(getattr(self.recorder, name).remote(*args))

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

    # -- request helpers -----------------------------------------------------------------------

    async def parse(self, request: Request, model: type[T], *, image: Literal["required", "none"]) -> tuple[T, bytes | None]:
        return await parse(request, model, image=image, max_upload_bytes=self.config.max_upload_bytes)

    def decode(self, raw: bytes | None) -> Any:
        return decode_image(raw or b"", field="image", max_bytes=self.config.max_upload_bytes, max_pixels=self.config.max_pixels)

    @staticmethod
    def caller(request: Request) -> Caller:
        """The pipeline's view of the request; the run's exposure is kept on it, so that ``json_errors``
        settles it with the error the client gets."""
        return Caller(request_id_of(request), api_key_of(request), serve.get_multiplexed_model_id() or None,
                      on_exposure=lambda exposure: setattr(request.state, "exposure", exposure))  # fmt: skip

    async def answer(self, request: Request, run: GenerationRun) -> Response:
        output = choose_format(request.headers.get("accept", ""))
        if output == "sse":
            return await render.streamed(self.pipeline, run, metrics.route_of(request.scope))
        return await render.whole(self.pipeline, run, output)

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
        catalog = await self.catalogue.catalog()
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
        verdict: GateVerdict = await self.pipeline.within(self.classifier.classify.remote(image), None)
        return verdict.public()

    @api.post("/v1/caption", openapi_extra=image_body(CaptionForm), responses=answers(400, 413, 415, 503, 504))
    @json_errors
    async def caption(self, request: Request) -> dict[str, Any]:
        """Captions, ranked keywords and the prompt a photo would give."""
        form, raw = await self.parse(request, CaptionForm, image="required")
        image = self.decode(raw)
        result: CaptionResult = await self.pipeline.within(self.captioner.caption.remote(image, form.style), None)
        return result.public()

    @api.post("/v1/text2img", openapi_extra=json_body(Text2ImgRequest),
              responses=generation_answers(400, 404, 413, 415, 422, 503, 504))  # fmt: skip
    @json_errors
    async def text2img(self, request: Request) -> Response:
        """A prompt straight to the generator (no gate, no captions)."""
        caller = self.caller(request)
        body, _ = await self.parse(request, Text2ImgRequest, image="none")
        run = await self.pipeline.prepare_text(body, caller)
        return await self.answer(request, run)

    @api.post("/v1/generate", openapi_extra=image_body(GenerateForm, FORM_SCHEMAS),
              responses=generation_answers(400, 404, 413, 415, 422, 503, 504))  # fmt: skip
    @json_errors
    async def generate(self, request: Request) -> Response:
        """classify -> caption -> prompt -> generate -> locate. PNG by default; JSON or SSE by `Accept`."""
        caller = self.caller(request)
        form, raw = await self.parse(request, GenerateForm, image="required")
        run = await self.pipeline.prepare_photo(form, raw, caller)
        return await self.answer(request, run)

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
        located: Located = await self.pipeline.within(self.locator.locate.remote(image, clean_products(form.products)), None)
        located = replace(located, source="request")
        answer: dict[str, Any] = {"products": located.public()}
        if form.annotate:
            answer["annotated_b64"] = await asyncio.to_thread(self.pipeline.annotated_b64, image, located)
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


Ingress = serve.deployment(name="Ingress", ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=64)(
    serve.ingress(api)(IngressRoutes)
)
