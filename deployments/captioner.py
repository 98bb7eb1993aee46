"""BLIP captioning + prompt building as a Ray Serve deployment on a fractional GPU (cpu without one)."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field
from ray import serve

from deployments import metrics
from deployments.logs import stamp_library_logs
from deskgen.batching import DynamicBatcher
from deskgen.contracts import CaptionResult
from deskgen.limits import MAX_PREFIXES, MAX_PROMPT_CHARS
from deskgen.prompt import DEFAULT_NEGATIVE_PROMPT, DEFAULT_PREFIXES, build_prompt, rank_keywords

if TYPE_CHECKING:
    from PIL import Image

    from deskgen.captioner import Captioner as BlipCaptioner
    from deskgen.captioner import CaptionSet


class CaptionerConfig(BaseModel):
    """The captioner's ``user_config``."""

    model_config = ConfigDict(extra="forbid")

    prefixes: list[str] = Field(default_factory=lambda: list(DEFAULT_PREFIXES), max_length=MAX_PREFIXES)
    max_keywords: int = Field(8, ge=1, le=32)
    negative_prompt: str = Field(DEFAULT_NEGATIVE_PROMPT, max_length=MAX_PROMPT_CHARS)
    max_batch_size: int = Field(4, ge=1, le=32)
    batch_wait_timeout_s: float = Field(0.01, ge=0.0, le=1.0)


@serve.deployment(ray_actor_options={"num_cpus": 1}, max_ongoing_requests=8)
class Captioner:
    """Captions desk photos (unconditional + one caption per prefix), ranks the objects they name
    and builds the SDXL prompt. Concurrent requests are captioned in one batch. ``captioner`` injects an
    already loaded BLIP captioner (tests); otherwise ``model_id`` loads one."""

    def __init__(
        self, model_id: str, device: str | None = None, dtype: str | None = None, *, captioner: BlipCaptioner | None = None
    ) -> None:
        stamp_library_logs()
        if captioner is None:
            from deskgen.captioner import Captioner as BlipCaptioner

            captioner = BlipCaptioner.from_pretrained(model_id, device=device, dtype=dtype)
        self.captioner = captioner
        self.config = CaptionerConfig()
        # Batches form when the model is free (see deskgen/batching.py for why not @serve.batch).
        self.batcher = DynamicBatcher(self.caption_batch, max_batch_size=self.config.max_batch_size,
                                      max_wait_s=self.config.batch_wait_timeout_s)

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        self.config = CaptionerConfig.model_validate(user_config)
        self.captioner.set_prefixes(self.config.prefixes)
        self.batcher.configure(max_batch_size=self.config.max_batch_size, max_wait_s=self.config.batch_wait_timeout_s)

    async def caption_batch(self, images: list[Image.Image]) -> list[tuple[CaptionSet, float]]:
        start = time.perf_counter()
        caption_sets = await asyncio.to_thread(self.captioner.caption_batch, images)
        seconds = time.perf_counter() - start
        metrics.batch_size("captioner", len(images))
        return [(captions, seconds) for captions in caption_sets]

    async def caption(self, image: Image.Image, style: str | None = None) -> CaptionResult:
        """Captions, ranked keywords and the prompt pair for one RGB image."""
        captions, seconds = await self.batcher.submit(image)
        texts = captions.texts()
        keywords = rank_keywords(texts)
        prompt = build_prompt(
            texts, keywords, style, max_keywords=self.config.max_keywords, negative_prompt=self.config.negative_prompt
        )
        return CaptionResult(
            captions=captions.as_dict(),
            keywords=tuple(keywords),
            prompt=prompt.prompt,
            negative_prompt=prompt.negative_prompt,
            seconds=seconds,
        )

    def stats(self) -> dict[str, int]:
        return self.batcher.stats()

    def check_health(self) -> None:
        """Raise if the model keeps failing (Serve then replaces the replica)."""
        self.batcher.check_health()

    def ping(self) -> str:
        return "ok"
