"""The request bodies of the HTTP API, one model per route's body, with the fixed rules of
:mod:`deskgen_client.rules`. The server validates every body with these models and its OpenAPI document
is generated from them; the limits a deployment may change (sides, steps, upload size) are added to the
document by the server at each reconfigure and answered by ``GET /v1/limits``."""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StrictBool, field_validator

from deskgen_client.rules import (
    AUTO,
    CONCEPT_PATTERN,
    FEEDBACK_EVENTS,
    MAX_GUIDANCE,
    MAX_MIX_SPEC_CHARS,
    MAX_PRODUCT_CHARS,
    MAX_PRODUCTS,
    MAX_PROMPT_CHARS,
    MAX_SEED,
    MAX_STYLE_CHARS,
    MAX_TIMEOUT_S,
    MAX_USER_ID_CHARS,
    MIN_GUIDANCE,
    MIX_SPEC_PATTERN,
    MIX_SPEC_RULE,
    PRODUCT_PATTERN,
    PRODUCT_RULE,
    REQUEST_ID_PATTERN,
    SIDE_MULTIPLE,
    STYLE_PATTERN,
    FeedbackEvent,
    style_problem,
)

#: One product name (its rule stated in the document; the server strips it and drops repeats).
ProductName = Annotated[str, Field(min_length=1, max_length=MAX_PRODUCT_CHARS, pattern=PRODUCT_PATTERN)]


class StyleOption(BaseModel):
    """A style concept woven into the prompt built from a photo's captions."""

    style: str | None = Field(None, max_length=MAX_STYLE_CHARS, description="a style concept woven into the prompt "
                              "(visible text, no control or format characters)", json_schema_extra={"pattern": STYLE_PATTERN})  # fmt: skip

    @field_validator("style")
    @classmethod
    def _style_rule(cls, style: str | None) -> str | None:
        if style is None:
            return None
        problem = style_problem(style)
        if problem is not None:
            raise ValueError(problem)
        return style.strip()


class LocateOptions(BaseModel):
    """Which products to find in the image, and whether to draw them."""

    products: list[ProductName] | None = Field(
        None, max_length=MAX_PRODUCTS, description=f"products to find ({PRODUCT_RULE} each; in a form: "
        "comma-separated or the field repeated); omitted on a generation: the objects its captions or prompt name",
    )
    annotate: StrictBool = Field(False, description="also answer a copy of the image with the boxes drawn (JSON and SSE)")


class GenerationOptions(LocateOptions):
    """Options shared by /v1/generate and /v1/text2img. Omitted values take the server's defaults
    (``GET /v1/limits``)."""

    model_config = ConfigDict(extra="forbid")

    mix: str | None = Field(None, max_length=MAX_MIX_SPEC_CHARS, description=MIX_SPEC_RULE,
                            json_schema_extra={"pattern": MIX_SPEC_PATTERN})  # fmt: skip
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="random when omitted (and reported)")
    steps: int | None = Field(None, ge=1)
    guidance: float | None = Field(None, ge=MIN_GUIDANCE, le=MAX_GUIDANCE, allow_inf_nan=False)
    width: int | None = Field(None, ge=SIDE_MULTIPLE, description=f"a multiple of {SIDE_MULTIPLE}")
    height: int | None = Field(None, ge=SIDE_MULTIPLE, description=f"a multiple of {SIDE_MULTIPLE}")
    negative_prompt: str | None = Field(None, max_length=MAX_PROMPT_CHARS)
    user_id: str | None = Field(None, min_length=1, max_length=MAX_USER_ID_CHARS, description="makes the A/B arm sticky")
    timeout_s: float | None = Field(None, gt=0, le=MAX_TIMEOUT_S, description="deadline for this request")
    concept: str | None = Field(
        None, description=f"a concept preset (GET /v1/concepts) woven into the prompt, or `{AUTO}` for today's by the "
        "schedule; its mix, steps and guidance apply where the request sets none",
        json_schema_extra={"pattern": CONCEPT_PATTERN},
    )

    locate: StrictBool = Field(True, description="find the products in the generated image (`products` in the answer)")

    @field_validator("concept")
    @classmethod
    def _concept_syntax(cls, concept: str | None) -> str | None:
        if concept is not None and not re.fullmatch(CONCEPT_PATTERN, concept):
            raise ValueError(f"must be `{AUTO}` or a concept name (1-64 of a-z 0-9 _ -)")
        return concept

    @field_validator("mix")
    @classmethod
    def _mix_syntax(cls, mix: str | None) -> str | None:
        if mix is not None and not re.fullmatch(MIX_SPEC_PATTERN, mix):
            raise ValueError(f"must be {MIX_SPEC_RULE}")
        return mix


class GenerateRequest(GenerationOptions, StyleOption):
    """/v1/generate: the photo (multipart `image`, or `image_b64` in JSON) plus options."""

    image_b64: str | None = Field(None, description="JSON only: the photo, base64")


class Text2ImgRequest(GenerationOptions):
    """/v1/text2img: a prompt straight to the generator."""

    prompt: str = Field(..., min_length=1, max_length=MAX_PROMPT_CHARS)


class ClassifyRequest(BaseModel):
    """/v1/classify: just the photo."""

    model_config = ConfigDict(extra="forbid")

    image_b64: str | None = None


class CaptionRequest(ClassifyRequest, StyleOption):
    """/v1/caption: the photo and, optionally, a style woven into the prompt."""


class LocateRequest(LocateOptions):
    """/v1/locate: any image and the products to find in it."""

    model_config = ConfigDict(extra="forbid")

    image_b64: str | None = Field(None, description="JSON only: the image, base64")
    products: list[ProductName] = Field(..., min_length=1, max_length=MAX_PRODUCTS,  # type: ignore[assignment]
                                        description=f"products to find ({PRODUCT_RULE} each; in a form: comma-separated)")  # fmt: skip


class FeedbackRequest(BaseModel):
    """/v1/feedback: what a user did with an image. Idempotent per (image_id, event)."""

    model_config = ConfigDict(extra="forbid")

    image_id: str = Field(..., pattern=REQUEST_ID_PATTERN, description="the request id the image was answered with")
    event: FeedbackEvent = Field(..., description="what the user did")
    value: float | None = Field(None, allow_inf_nan=False, description="optional, e.g. a rating")
    user_id: str | None = Field(
        None, min_length=1, max_length=MAX_USER_ID_CHARS, description="must be the user the image was delivered to"
    )


assert set(FEEDBACK_EVENTS) == set(FeedbackEvent.__args__)  # type: ignore[attr-defined]
