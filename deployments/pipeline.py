"""One generation, from its checked inputs to its delivered image, callable without HTTP.

A :class:`GenerationRun` is built by :meth:`GenerationPipeline.prepare_text` (``/v1/text2img``) or
:meth:`GenerationPipeline.prepare_photo` (``/v1/generate``): every check that can refuse the request runs
there, once, before any model — the options against the live limits, the concept, the mix (and the user's
A/B arm), the place among the experiment's exposures (503 when full), the photo's decoding. Then:

1. :meth:`~GenerationPipeline.gate` — a photo that is not a desk setup is refused (422 with its score);
2. :meth:`~GenerationPipeline.caption` — captions, ranked keywords, the prompt and the final parameters;
3. :meth:`~GenerationPipeline.generate` (or :meth:`~GenerationPipeline.stream` for step events) — on a
   generator replica that holds the mix (the multiplexed id);
4. :meth:`~GenerationPipeline.locate` — the products' boxes, never holding the image back;
5. :meth:`~GenerationPipeline.deliver` — the exposure settled ``ok`` and committed before the image leaves.

:meth:`~GenerationPipeline.run` chains them for answers given whole (PNG, JSON); an SSE answer walks the
same steps and renders each as it comes (deployments/render.py). A failure anywhere is settled on the
exposure by whoever answers it (``json_errors`` for HTTP).
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import logging
import math
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from deployments import metrics
from deployments.catalogue import Chosen, MixCatalogue
from deployments.http_errors import unwrap
from deployments.http_io import awaitable
from deployments.ingress_models import IngressConfig
from deskgen.boxes import annotate, clean_products
from deskgen.concepts import with_negative, woven_prompt, woven_style
from deskgen.contracts import (
    CaptionResult,
    GateVerdict,
    GeneratedImage,
    GenerationRequest,
    ProductLocation,
)
from deskgen.errors import AdapterUnavailable, NotADeskSetup
from deskgen.experiments.buffer import ExposureBuffer, Reservation
from deskgen.generator.params import GenerationParams
from deskgen.images import decode_image
from deskgen.imagestore import ImageStore
from deskgen.limits import MAX_SEED
from deskgen.mixes import Mix
from deskgen.pngmeta import PRODUCTS_KEY, encode_png, with_text
from deskgen.prompts.build import DEFAULT_NEGATIVE_PROMPT
from deskgen.prompts.captions import rank_keywords
from deskgen_client.protocol import GenerateRequest, GenerationOptions, ProductSource, Text2ImgRequest

log = logging.getLogger("ray.serve")
T = TypeVar("T")


async def past_router(send: Callable[[], Awaitable[T]], deadline: float | None, pauses: Sequence[float]) -> T:
    """``send()``, sent again after each of ``pauses`` while the Generator's router refuses it
    (BackPressureError), unless the pause would pass ``deadline`` (``time.perf_counter()``). Serve counts a
    request as queued until a replica has accepted it, so requests that arrive together overflow
    ``max_queued_requests`` while a replica is still free (ray.serve's ``wrap_request_assignment``): such
    a refusal is gone a moment later. The last refusal is raised (answered 503 ``overloaded``)."""
    from ray.serve.exceptions import BackPressureError

    for pause in (*pauses, None):
        try:
            return await send()
        except Exception as exc:
            if not isinstance(unwrap(exc), BackPressureError):
                raise
            if pause is None or time.perf_counter() + pause >= (math.inf if deadline is None else deadline):
                metrics.router_refused("answered")
                raise
            metrics.router_refused("retried")
        await asyncio.sleep(pause)
    raise AssertionError("unreachable: the loop returns or raises")


#: The prompt /v1/generate validates its options with before the captions exist (replaced by theirs).
PENDING_PROMPT = "(from the captions)"


@dataclass(frozen=True)
class Caller:
    """Who asks, as the pipeline needs it (an HTTP request, or a job): the image id it will carry, the API
    key's name, and the ``serve_multiplexed_model_id`` it named (if any)."""

    request_id: str
    api_key: str | None = None
    header_mix: str | None = None
    #: Told the run's exposure as soon as it is reserved, so that whoever answers a failure of the later
    #: checks can settle it with the error (the HTTP layer keeps it on the request).
    on_exposure: Callable[[Reservation], None] | None = None
    #: When the request arrived (``time.perf_counter``): its deadline and total time count from here.
    arrived: float = field(default_factory=time.perf_counter)


@dataclass(frozen=True)
class LocatePlan:
    """What a generation asks of the locator: the products (and where the list came from) and whether to
    draw them; ``off`` says why it is not asked at all."""

    products: tuple[str, ...] = ()
    source: ProductSource | None = None
    annotate: bool = False
    off: str | None = None


@dataclass
class GenerationRun:
    """One generation request: set by ``prepare_*``, filled in by the steps, rendered by the answer."""

    caller: Caller
    options: GenerationOptions
    params: GenerationParams
    mix: Mix
    #: How the mix was chosen (``id``, ``name``, ``weights``, ``source``, ``arm``): the answer's ``mix``.
    mix_info: dict[str, Any]
    concept: Chosen | None
    exposure: Reservation
    started: float
    deadline: float
    plan: LocatePlan = field(default_factory=LocatePlan)
    #: Photo runs: the decoded photo, the style asked for and the style woven with the concept's.
    photo: Any = None
    style: str | None = None
    caption_style: str | None = None
    verdict: GateVerdict | None = None
    captioned: CaptionResult | None = None
    located: ProductLocation | None = None
    annotated_b64: str | None = None

    @property
    def timings(self) -> dict[str, float]:
        """Stage seconds, as the answer reports them and the exposure records them (one dict: the exposure
        settles with the timings the client was told)."""
        return self.exposure.timings

    def answer(self) -> dict[str, Any]:
        """The fields of the JSON answer (and the SSE ``done`` event) besides the image and its parameters."""
        out: dict[str, Any] = {}
        if self.verdict is not None and self.captioned is not None:
            out |= {"desk_score": self.verdict.score, "captions": self.captioned.captions,
                    "keywords": self.captioned.keyword_dicts(), "style": self.style}  # fmt: skip
        if self.verdict is None:
            out |= {"mix": self.mix_info, "concept": self.params.concept, "timings": self.timings}
        else:
            out |= {"concept": self.params.concept, "mix": self.mix_info, "timings": self.timings}
        if self.located is not None:
            out["products"] = self.located.model_dump(mode="json")
        if self.annotated_b64 is not None:
            out["annotated_b64"] = self.annotated_b64
        return out


def _given(value: T | None, default: T) -> T:
    return default if value is None else value


class GenerationPipeline:
    def __init__(self, config: Callable[[], IngressConfig], stages: dict[str, Any], catalogue: MixCatalogue,
                 exposures: ExposureBuffer, images: ImageStore | None = None) -> None:  # fmt: skip
        self.config = config
        #: Delivered PNGs by image id (deskgen.imagestore): what liked-image LoRA training reads.
        self.images = images
        self._keeping: set[asyncio.Task[None]] = set()
        self.classifier = stages["classifier"]
        self.captioner = stages["captioner"]
        self.generator = stages["generator"]
        #: Finds products in generated images; a generation never waits on it past ``locate_timeout_s``.
        self.locator = stages.get("locator")
        self.catalogue = catalogue
        self.exposures = exposures

    # -- 0. prepare: every check that can refuse, before any model ---------------------------------

    async def prepare_text(self, body: Text2ImgRequest, caller: Caller) -> GenerationRun:
        concept = self.concept(body)
        prompt = woven_prompt(body.prompt, concept[1].prompt) if concept else body.prompt
        params = self.params(body, prompt, None, concept)
        run = await self._run(caller, body, params, concept, style=None)
        run.plan = self.locate_plan(body, [k.name for k in rank_keywords([prompt])], "prompt")
        return run

    async def prepare_photo(self, form: GenerateRequest, photo: bytes | None, caller: Caller) -> GenerationRun:
        concept = self.concept(form)
        params = self.params(form, PENDING_PROMPT, None, concept)  # the options, before the captions exist
        run = await self._run(caller, form, params, concept, style=form.style)
        run.caption_style = woven_style(concept[1].prompt, form.style) if concept else form.style
        run.photo = decode_image(photo or b"", field="image", max_bytes=self.config().max_upload_bytes,
                                 max_pixels=self.config().max_pixels)  # fmt: skip
        return run

    async def _run(self, caller: Caller, options: Any, params: GenerationParams, concept: Chosen | None, *,
                   style: str | None) -> GenerationRun:  # fmt: skip
        config = self.config()
        mix, mix_info = await self.catalogue.choose(options.mix, caller.header_mix, options.user_id, concept)
        source = mix_info["source"]
        arm = mix_info["arm"] if source == "ab" else config.default_mix if source == "default" else None
        # The request's place among the experiment's exposures (503 when the buffer is full). Its outcome is
        # settled once: ``ok`` at delivery, or the error code the client got.
        exposure = self.exposures.reserve(
            config.experiment, image_id=caller.request_id, user_id=options.user_id, arm=arm, mix_id=mix_info["id"],
            mix_source=source, style=style, concept=concept[0] if concept else None, api_key=caller.api_key,
        )  # fmt: skip
        if caller.on_exposure is not None:
            caller.on_exposure(exposure)
        deadline = caller.arrived + (options.timeout_s or config.request_timeout_s)
        return GenerationRun(caller, options, params, mix, mix_info, concept, exposure, caller.arrived, deadline,
                             style=style)  # fmt: skip

    def params(self, options: GenerationOptions, prompt: str, negative_prompt: str | None,
               concept: Chosen | None = None) -> GenerationParams:  # fmt: skip
        """Fill omitted options from the concept's defaults, then the configured ones, and check them
        against the live limits. An explicit "" negative prompt means none; omitted means the captioner's
        (or the default) plus the concept's additions."""
        c = self.config()
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
        return self.config().resolve(options.concept, dt.datetime.now(dt.UTC))

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
            products = tuple(named[: self.config().default_products])
        if not products:
            return LocatePlan(off="no products to look for: name them in `products`")
        return LocatePlan(products=products, source=source, annotate=options.annotate)

    # -- 1. gate and 2. caption (photo runs) ------------------------------------------------------

    async def gate(self, run: GenerationRun) -> GateVerdict:
        """The desk gate: not a desk setup -> 422 with the score."""
        t = time.perf_counter()
        try:
            verdict: GateVerdict = await self.within(self.classifier.classify.remote(run.photo), run.deadline)
        finally:
            run.timings["classify_s"] = time.perf_counter() - t
            metrics.stage_seconds("gate", run.timings["classify_s"])
        if not verdict.is_desk:
            raise NotADeskSetup(
                f"`image` does not look like a desk setup: its score {verdict.score:.4f} is below "
                f"the threshold {verdict.threshold}.",
                field="image", score=verdict.score, threshold=verdict.threshold,
            )  # fmt: skip
        run.verdict = verdict
        return verdict

    async def caption(self, run: GenerationRun) -> CaptionResult:
        """Captions -> keywords -> the prompt, and the final parameters and products to locate."""
        t = time.perf_counter()
        captioned: CaptionResult = await self.within(self.captioner.caption.remote(run.photo, run.caption_style),
                                                     run.deadline)  # fmt: skip
        run.timings["caption_s"] = time.perf_counter() - t
        metrics.stage_seconds("caption", run.timings["caption_s"])
        run.captioned = captioned
        run.params = self.params(run.options, captioned.prompt, captioned.negative_prompt, run.concept)
        run.plan = self.locate_plan(run.options, [k.name for k in captioned.keywords], "captions")
        return captioned

    # -- 3. generate -------------------------------------------------------------------------------

    def _request(self, run: GenerationRun) -> tuple[Any, GenerationRequest]:
        handle = self.generator.options(multiplexed_model_id=run.mix.id)
        label = metrics.mix_label(run.mix.id, self.catalogue.names)
        return handle, GenerationRequest(params=run.params, limits=self.config().limits, mix_label=label)

    async def generate(self, run: GenerationRun) -> GeneratedImage:
        """The image, routed by the mix's multiplexed id to a replica that holds the mix."""
        handle, request = self._request(run)
        t = time.perf_counter()
        result: GeneratedImage = await past_router(lambda: self.within(handle.generate.remote(request), run.deadline),
                                                   run.deadline, self.config().router_retry_s)  # fmt: skip
        run.timings["generate_s"] = time.perf_counter() - t
        return result

    async def stream(self, run: GenerationRun) -> tuple[Any, Any]:
        """The generation as a stream of typed events (started, steps, the image) and its first event; pull
        the rest with :meth:`next`."""
        handle, request = self._request(run)

        async def opened() -> tuple[Any, Any]:
            stream = handle.options(stream=True).generate_stream.remote(request)
            return stream, await self.next(run, stream)

        return await past_router(opened, run.deadline, self.config().router_retry_s)

    async def next(self, run: GenerationRun, stream: Any) -> Any:
        """The stream's next event within the run's deadline (``StopAsyncIteration`` at its end)."""
        return await self.within(stream.__anext__(), run.deadline, cancel=stream.cancel)

    # -- 4. locate and 5. deliver --------------------------------------------------------------------

    async def locate(self, run: GenerationRun, result: GeneratedImage) -> GeneratedImage:
        """The products in the image, recorded in the run (the answer's ``products``; ``annotated_b64``
        when asked) and in the PNG (a ``deskgen-products`` text chunk). Never raises: a locator that fails
        or takes longer than ``locate_timeout_s`` gives ``status`` failed/timeout with the reason."""
        t = time.perf_counter()
        located = await self.located(result.png, run.plan)
        run.timings["locate_s"] = time.perf_counter() - t
        run.located = located
        if run.plan.annotate and located.status == "ok":
            run.annotated_b64 = await asyncio.to_thread(self.annotated_b64, result.png, located)
        return replace(result, png=with_text(result.png, PRODUCTS_KEY, located.model_dump(mode="json")))

    async def located(self, png: bytes, plan: LocatePlan) -> ProductLocation:
        if self.locator is None or plan.off is not None:
            return ProductLocation(status="off", reason=plan.off)
        timeout = self.config().locate_timeout_s
        start = time.perf_counter()
        try:
            located: ProductLocation = await self.within(self.locator.locate.remote(png, plan.products), start + timeout)
        except TimeoutError:
            located = ProductLocation(status="timeout", reason=f"the product locator did not answer within {timeout} s")
        except Exception as exc:
            cause = unwrap(exc)
            log.warning("product locator failed; the image is delivered without products: %r", cause)
            located = ProductLocation(status="failed", reason=f"the product locator failed ({type(cause).__name__}: {cause})"[:500])
        metrics.stage_seconds("locate", time.perf_counter() - start)
        metrics.located(located.status)
        return located.model_copy(update={"source": plan.source})

    def annotated_b64(self, image: Any, located: ProductLocation) -> str:
        """A copy of ``image`` (PIL, or PNG bytes) with the boxes and labels drawn, as base64 PNG."""
        if isinstance(image, bytes):
            image = decode_image(image, field="image")
        return base64.b64encode(encode_png(annotate(image, located.items))).decode()

    async def deliver(self, run: GenerationRun, result: GeneratedImage) -> None:
        """Settle the exposure ``ok`` and wait (at most ``exposure_commit_wait_s``) until it is committed,
        so an ingress replica killed after delivering loses no exposure. Past the wait (the store is down)
        the image goes out and its exposure stays buffered."""
        run.timings["total_s"] = time.perf_counter() - run.started
        found = run.located.found_fraction if run.located is not None else None
        run.exposure.settle("ok", 200, seed=result.params.seed, found_fraction=found)
        self.keep(run.exposure.image_id, result.png)
        if not await run.exposure.committed(self.config().exposure_commit_wait_s):
            metrics.exposure_commit_timeout()

    def keep(self, image_id: str, png: bytes) -> None:
        """Write the delivered PNG into the image store in the background (never delays or fails the answer:
        a store that cannot write logs a warning)."""
        if self.images is None:
            return
        images = self.images

        async def write() -> None:
            try:
                await asyncio.to_thread(images.put, image_id, png)
            except Exception as exc:
                log.warning("image %s was delivered but not kept in the image store: %r", image_id, exc)

        task = asyncio.get_running_loop().create_task(write())
        self._keeping.add(task)
        task.add_done_callback(self._keeping.discard)

    async def events(self, run: GenerationRun) -> AsyncIterator[Any]:
        """Every step, as it happens: [the gate's verdict, the captions,] the generator's events (started, a
        step per denoising step), then the located and delivered image (the last item). What a job runs
        (deployments/routes/jobs.py)."""
        if run.photo is not None:
            yield await self.gate(run)
            yield await self.caption(run)
        t = time.perf_counter()
        stream, event = await self.stream(run)
        while True:
            if isinstance(event, GeneratedImage):
                run.timings["generate_s"] = time.perf_counter() - t
                result = await self.locate(run, event)
                await self.deliver(run, result)
                yield result
                return
            yield event
            try:
                event = await self.next(run, stream)
            except StopAsyncIteration:
                return

    async def check(self, options: Text2ImgRequest | GenerateRequest, photo: bytes | None) -> None:
        """The refusals of ``prepare_*`` without reserving an exposure: a job is checked when it is
        submitted (400/404/422 then), and prepared when it runs. ``photo`` None: a photo checked already."""
        concept = self.concept(options)
        if isinstance(options, Text2ImgRequest):
            self.params(options, woven_prompt(options.prompt, concept[1].prompt) if concept else options.prompt,
                        None, concept)  # fmt: skip
        else:
            self.params(options, PENDING_PROMPT, None, concept)
            if photo is not None:
                decode_image(photo, field="image_b64", max_bytes=self.config().max_upload_bytes,
                             max_pixels=self.config().max_pixels)  # fmt: skip
        await self.catalogue.choose(options.mix, None, options.user_id, concept)

    async def run(self, run: GenerationRun) -> GeneratedImage:
        """Every step for an answer given whole: [gate, caption,] generate, locate, deliver."""
        if run.photo is not None:
            await self.gate(run)
            await self.caption(run)
        result = await self.locate(run, await self.generate(run))
        await self.deliver(run, result)
        return result

    # -- calls to the stages -------------------------------------------------------------------------

    async def within(self, call: Awaitable[T], deadline: float | None, *, cancel: Callable[[], Any] | None = None) -> T:
        """Await a stage call within the request deadline. Past it, cancel the call in its replica (a
        generation stops at its next step) and raise TimeoutError, answered 504. A replica's refusal of an
        adapter marks it unavailable in the catalogue."""
        if deadline is None:
            deadline = time.perf_counter() + self.config().request_timeout_s
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
                self.catalogue.note_unavailable(cause)
            raise
