"""What every route of the ingress shares: the handles to the stages, the live config (``reconfigure``), the
experiment store's buffer and calls, the A/B allocator, the mix catalogue and the generation pipeline, and
the request helpers. The route modules beside it are mixins of :class:`RoutesBase`."""

# No `from __future__ import annotations`: FastAPI must resolve the route annotations in the replica.

import asyncio
import logging
from collections.abc import Awaitable
from typing import Any, Literal, TypeVar

from fastapi import Request
from ray.serve.handle import DeploymentHandle

from deployments import metrics
from deployments.access import door
from deployments.allocation import Allocator
from deployments.app import _openapi
from deployments.catalogue import MixCatalogue
from deployments.forms import parse
from deployments.http_io import awaitable
from deployments.ingress_models import IngressConfig
from deployments.jobqueue import JobQueue
from deployments.logs import stamp_library_logs
from deployments.pipeline import GenerationPipeline
from deskgen.errors import RecorderUnavailable
from deskgen.experiments.buffer import ExposureBuffer
from deskgen.experiments.records import Experiment, Exposure
from deskgen.images import decode_image
from deskgen.imagestore import ImageStoreSettings
from deskgen.jobs.settings import JobsSettings
from deskgen.paths import resolve

log = logging.getLogger("ray.serve")
T = TypeVar("T")


class RoutesBase:
    """The ingress's state and helpers. Holds no model; generation is the pipeline's."""

    def __init__(
        self,
        classifier: DeploymentHandle,
        captioner: DeploymentHandle,
        generator: DeploymentHandle,
        recorder: DeploymentHandle,
        lora_dir: str | None = None,
        locator: DeploymentHandle | None = None,
        image_store: dict[str, Any] | None = None,
        jobs: dict[str, Any] | None = None,
        consumer: DeploymentHandle | None = None,
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
                                      self.allocator, quiet=lambda: door.generations_in_flight == 0)  # fmt: skip
        stages = {"classifier": classifier, "captioner": captioner, "generator": generator, "locator": locator}
        images = ImageStoreSettings.model_validate(image_store or {"dir": None}).build()
        self.pipeline = GenerationPipeline(lambda: self.config, stages, self.catalogue, self.exposures, images)
        #: Jobs and idempotency keys (Redis); None when the app has no ``args.jobs``.
        self.job_queue = JobQueue(JobsSettings.model_validate(jobs)) if jobs is not None else None
        #: The task consumer deployment (bound here so it belongs to the app; jobs reach it through Redis).
        self.consumer = consumer

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
                        "(add user_config.api_keys; mint one with `python -m deployments.door.apikeys NAME`)")
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
