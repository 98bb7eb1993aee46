"""BLIP captioning + prompt building as a Ray Serve deployment on a fractional GPU (cpu without one)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field, model_validator
from ray import serve

from deployments.batched import BatchConfig, BatchedStage
from deskgen.captioner import (
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_NO_REPEAT_NGRAM_SIZE,
    DEFAULT_REPETITION_PENALTY,
    MAX_NO_REPEAT_NGRAM_SIZE,
    MAX_REPETITION_PENALTY,
    DecodeSettings,
)
from deskgen.contracts import CaptionResult
from deskgen.errors import InvalidParameter
from deskgen.limits import MAX_PREFIXES, MAX_PROMPT_CHARS
from deskgen.prompts.build import DEFAULT_NEGATIVE_PROMPT, build_prompt
from deskgen.prompts.captions import DEFAULT_PREFIXES, rank_keywords, unknown_objects
from deskgen.prompts.vocabulary import DEFAULT_VOCABULARY, MAX_EXTRA_OBJECTS, MAX_IGNORED, Vocabulary

if TYPE_CHECKING:
    from PIL import Image

    from deskgen.captioner import Captioner as BlipCaptioner
    from deskgen.captioner import CaptionSet


log = logging.getLogger("ray.serve")


class VocabularyConfig(BaseModel):
    """Extensions of the built-in desk-object vocabulary (deskgen.prompts.vocabulary.DESK_VOCABULARY), applied on
    ``serve deploy`` without a restart. ``extra_objects``: canonical name -> synonyms (each name also
    matches itself and its simple plural); ``ignore``: phrases that name no desk object. Validated by
    :meth:`deskgen.prompts.vocabulary.Vocabulary.extended`; an error names the entry."""

    model_config = ConfigDict(extra="forbid")

    extra_objects: dict[str, list[str]] = Field(default_factory=dict, max_length=MAX_EXTRA_OBJECTS)
    ignore: list[str] = Field(default_factory=list, max_length=MAX_IGNORED)

    @model_validator(mode="after")
    def _valid_terms(self) -> VocabularyConfig:
        self.build()
        return self

    def build(self) -> Vocabulary:
        """The built-in vocabulary extended by this config (itself when the config is empty)."""
        if not self.extra_objects and not self.ignore:
            return DEFAULT_VOCABULARY
        try:
            return DEFAULT_VOCABULARY.extended(self.extra_objects, self.ignore)
        except InvalidParameter as exc:
            raise ValueError(exc.message) from exc  # pydantic reports it at `vocabulary`


class CaptionerConfig(BatchConfig):
    """The captioner's ``user_config``."""

    prefixes: list[str] = Field(default_factory=lambda: list(DEFAULT_PREFIXES), max_length=MAX_PREFIXES)
    max_keywords: int = Field(8, ge=1, le=32)
    negative_prompt: str = Field(DEFAULT_NEGATIVE_PROMPT, max_length=MAX_PROMPT_CHARS)
    max_batch_size: int = Field(4, ge=1, le=32, description="images per forward pass")
    vocabulary: VocabularyConfig = Field(default_factory=VocabularyConfig)
    # Decoding (deskgen.captioner.DecodeSettings checks the ranges and names the field).
    max_new_tokens: int = Field(DEFAULT_MAX_NEW_TOKENS, ge=1)
    no_repeat_ngram_size: int = Field(DEFAULT_NO_REPEAT_NGRAM_SIZE, ge=0, le=MAX_NO_REPEAT_NGRAM_SIZE)
    repetition_penalty: float = Field(DEFAULT_REPETITION_PENALTY, ge=1.0, le=MAX_REPETITION_PENALTY)

    @model_validator(mode="after")
    def _valid_decoding(self) -> CaptionerConfig:
        try:
            self.decoding()
        except InvalidParameter as exc:
            raise ValueError(exc.message) from exc
        return self

    def decoding(self) -> DecodeSettings:
        return DecodeSettings(self.max_new_tokens, self.no_repeat_ngram_size, self.repetition_penalty)


@serve.deployment(ray_actor_options={"num_cpus": 1}, max_ongoing_requests=8)
class Captioner(BatchedStage[CaptionerConfig, "Image.Image", "tuple[CaptionSet, float]"]):
    """Captions desk photos (unconditional + one caption per prefix), ranks the objects they name
    and builds the SDXL prompt. Concurrent requests are captioned in one batch. ``captioner`` injects an
    already loaded BLIP captioner (tests); otherwise ``model_id`` loads one."""

    stage = "captioner"
    config_model = CaptionerConfig

    def __init__(
        self, model_id: str, device: str | None = None, dtype: str | None = None, *, captioner: BlipCaptioner | None = None
    ) -> None:
        super().__init__(self.caption_batch)
        if captioner is None:
            from deskgen.captioner import Captioner as BlipCaptioner

            captioner = BlipCaptioner.from_pretrained(model_id, device=device, dtype=dtype)
        self.captioner = captioner
        self.vocabulary = self.config.vocabulary.build()

    def apply_config(self, config: CaptionerConfig) -> None:
        self.captioner.configure(config.prefixes, config.decoding())
        self.vocabulary = config.vocabulary.build()

    async def caption_batch(self, images: list[Image.Image]) -> list[tuple[CaptionSet, float]]:
        caption_sets, seconds = await self.run_model(self.captioner.caption_batch, images)
        return [(captions, seconds) for captions in caption_sets]

    async def caption(self, image: Image.Image, style: str | None = None) -> CaptionResult:
        """Captions, ranked keywords and the prompt pair for one RGB image."""
        captions, seconds = await self.batcher.submit(image)
        texts = captions.texts()
        config, vocabulary = self.config, self.vocabulary
        keywords = rank_keywords(texts, vocabulary, prefixes=config.prefixes)
        prompt = build_prompt(
            texts,
            keywords,
            style,
            max_keywords=config.max_keywords,
            negative_prompt=config.negative_prompt,
            vocabulary=vocabulary,
            prefixes=config.prefixes,
        )
        unknown = unknown_objects(texts, vocabulary, prefixes=config.prefixes)
        if unknown:
            # Not guessed into the prompt; ops add the real ones under user_config vocabulary.extra_objects.
            log.info(
                "caption objects outside the vocabulary (Captioner user_config vocabulary.extra_objects): %s",
                ", ".join(f"{k.name} x{k.count}" for k in unknown),
            )
        return CaptionResult(
            captions=captions.as_dict(),
            keywords=tuple(keywords),
            prompt=prompt.prompt,
            negative_prompt=prompt.negative_prompt,
            seconds=seconds,
        )
