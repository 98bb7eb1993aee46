"""Jobs (``/v1/jobs``): an asynchronous generation, or a batch of them, with its status, progress,
results and webhook deliveries. The request names exactly one generation body, as ``/v1/text2img`` or
``/v1/generate`` (JSON, photo as ``image_b64``) take it, and optionally a batch that varies one option."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from deskgen_client.protocol.requests import GenerateRequest, Text2ImgRequest
from deskgen_client.rules import CONCEPT_PATTERN, MAX_MIX_SPEC_CHARS, MAX_SEED

#: Images one job may make (a batch of the 7 weekday concepts fits, with room).
MAX_BATCH = 16
MAX_WEBHOOK_URL_CHARS = 2000
WebhookEvent = Literal["start", "progress", "completed"]
JobStatus = Literal["queued", "running", "succeeded", "failed", "canceled"]


class Batch(BaseModel):
    """One image per value of exactly one option (the other options as the body sets them)."""

    model_config = ConfigDict(extra="forbid")

    seeds: list[int] | None = Field(None, min_length=1, max_length=MAX_BATCH,
                                    description=f"one image per seed (0..{MAX_SEED})")  # fmt: skip
    mixes: list[str] | None = Field(None, min_length=1, max_length=MAX_BATCH, description="one image per mix")
    concepts: list[str] | None = Field(None, min_length=1, max_length=MAX_BATCH,
                                       description="one image per concept preset (GET /v1/concepts)")  # fmt: skip

    @model_validator(mode="after")
    def _one_option(self) -> Batch:
        given = [name for name in ("seeds", "mixes", "concepts") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"name exactly one of seeds, mixes, concepts (got {given or 'none'})")
        for seed in self.seeds or []:
            if not 0 <= seed <= MAX_SEED:
                raise ValueError(f"seeds must be from 0 to {MAX_SEED}")
        for mix in self.mixes or []:
            if not mix or len(mix) > MAX_MIX_SPEC_CHARS:
                raise ValueError(f"each mix must be 1-{MAX_MIX_SPEC_CHARS} characters")
        import re

        for concept in self.concepts or []:
            if not re.fullmatch(CONCEPT_PATTERN, concept):
                raise ValueError(f"concept {concept!r} does not match {CONCEPT_PATTERN}")
        return self

    @property
    def size(self) -> int:
        return len(self.seeds or self.mixes or self.concepts or [])


def _completed_only() -> list[WebhookEvent]:
    return ["completed"]


class JobRequest(BaseModel):
    """``POST /v1/jobs``."""

    model_config = ConfigDict(extra="forbid")

    text2img: Text2ImgRequest | None = Field(None, description="the body of /v1/text2img")
    generate: GenerateRequest | None = Field(None, description="the JSON body of /v1/generate (image_b64)")
    batch: Batch | None = Field(None, description="several images varying one option")
    webhook: str | None = Field(None, min_length=1, max_length=MAX_WEBHOOK_URL_CHARS,
                                description="http(s) URL that receives the job's signed events")  # fmt: skip
    webhook_events: list[WebhookEvent] = Field(default_factory=_completed_only,
                                               description="which events are posted to `webhook`")  # fmt: skip

    @model_validator(mode="after")
    def _one_body(self) -> JobRequest:
        if (self.text2img is None) == (self.generate is None):
            raise ValueError("name exactly one of text2img, generate")
        if self.generate is not None and not self.generate.image_b64:
            raise ValueError("generate needs image_b64 (the photo, base64)")
        return self

    @property
    def images(self) -> int:
        return self.batch.size if self.batch is not None else 1


class JobImage(BaseModel):
    index: int
    image_id: str = Field(..., description="the image's id (feedback, exposures)")
    url: str = Field(..., description="GET it for the PNG")
    result: dict[str, Any] = Field(..., description="the JSON answer of the synchronous route, without image_b64")


class WebhookAttempt(BaseModel):
    at: float
    status: int | None
    error: str | None
    seconds: float


class WebhookDelivery(BaseModel):
    webhook_id: str
    event: str
    delivered: bool
    attempts: list[WebhookAttempt]


class JobAnswer(BaseModel):
    """``GET /v1/jobs/{id}`` (and the 202 of ``POST /v1/jobs``)."""

    id: str
    status: JobStatus
    position: int | None = Field(None, description="jobs ahead of this one (queued only)")
    progress: dict[str, Any] | None = Field(None, description="running: image index, step, steps")
    images: list[JobImage] = Field(default_factory=list)
    error: dict[str, Any] | None = None
    webhook: str | None = None
    webhook_events: list[WebhookEvent] = Field(default_factory=list)
    webhook_failed: bool = False
    deliveries: list[WebhookDelivery] = Field(default_factory=list)
    created_at: float
    cancel_after: float | None = Field(None, description="when the job is canceled if it has not ended (Cancel-After)")
    attempts: int = Field(0, description="runs of the job so far (more than one after a redelivery or a retry)")
    expires_at: float | None = Field(None, description="finished jobs: when the record and images go")
