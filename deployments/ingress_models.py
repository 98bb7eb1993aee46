"""The ingress's typed inputs: its ``user_config`` (:class:`IngressConfig`) and the request bodies of the
HTTP API (pydantic models; the OpenAPI document is generated from them). Bounds come from
:mod:`deskgen.limits`, the one place limits live."""

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, field_validator, model_validator

from deployments.door.apikeys import ApiKey
from deskgen.boxes import PRODUCT_PATTERN, PRODUCT_RULE
from deskgen.concepts import AUTO, CONCEPT_NAME_PATTERN, ConceptConfig
from deskgen.experiments.records import FEEDBACK_EVENTS, AllocationKind, Experiment, Policy
from deskgen.limits import (
    DEFAULT_SIZE_LIMITS,
    DEFAULT_UPLOAD_LIMITS,
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
    REQUEST_ID_PATTERN,
    SIDE_MULTIPLE,
    SizeLimits,
)
from deskgen.mixes import MIX_SPEC_PATTERN, MIX_SPEC_RULE, NAMED_MIXES
from deskgen.prompts.style import STYLE_PATTERN, validate_style


class AbPolicy(BaseModel):
    """How the experiment decides and allocates (``ab_policy`` in the Ingress ``user_config``)."""

    model_config = ConfigDict(extra="forbid")

    primary_metric: Literal["like", "dislike", "download", "select"] = Field(
        "like", description="the event whose rate per delivered image decides the experiment"
    )
    alpha: float = Field(0.05, gt=0.0, lt=0.5, description="error rate of the always-valid arm comparisons")
    mde: float = Field(
        0.03, gt=0.0, le=1.0, description="minimum detectable effect: the smallest difference of the primary "
        "metric's rate worth acting on (absolute: 0.03 = 3 percentage points)"
    )
    allocation: AllocationKind = Field(
        "fixed", description="fixed: new users split by ab_split; thompson: by each arm's probability of being "
        "best (Thompson sampling) after a burn-in on ab_split"
    )
    burn_in_users: int = Field(100, ge=1, description="thompson: users every arm gets on ab_split first")
    update_every_s: float = Field(60.0, ge=1.0, description="thompson: how often the weights are recomputed")
    floor: float = Field(0.01, ge=0.0, lt=1.0, description="thompson: the smallest share an arm keeps")
    floors: dict[str, float] = Field(default_factory=dict, description="thompson: per-arm floors (override floor)")

    @field_validator("floors")
    @classmethod
    def _floors_in_range(cls, floors: dict[str, float]) -> dict[str, float]:
        for arm, value in floors.items():
            if not 0.0 <= value < 1.0:
                raise ValueError(f"the floor of arm {arm!r} must be in [0, 1) but is {value}")
        return floors

    def policy(self, arms: list[str]) -> Policy:
        floors = {arm: self.floors.get(arm, self.floor) for arm in arms}
        return Policy(primary_metric=self.primary_metric, alpha=self.alpha, mde=self.mde, allocation=self.allocation,
                      burn_in_users=self.burn_in_users, update_every_s=self.update_every_s, floors=floors)  # fmt: skip


class IngressConfig(ConceptConfig):
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
    ab_policy: AbPolicy = Field(default_factory=AbPolicy)
    exposure_commit_wait_s: float = Field(
        2.0, ge=0.0, le=60.0, description="how long a finished image waits for its exposure to be committed "
        "to the experiment store before it is delivered (0 = deliver at once and record in the background)"
    )
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
    exposure_buffer: int = Field(
        10_000, ge=1, description="exposures an ingress replica holds while the experiment store is unreachable; "
        "when full, generation requests are refused with 503 before any model runs"
    )
    exposure_flush_s: float = Field(0.05, gt=0.0, le=10.0, description="how often buffered exposures are written")
    recorder_timeout_s: float = Field(
        5.0, gt=0.0, le=60.0, description="how long a feedback or report call waits for the experiment store"
    )
    api_keys: list[ApiKey] = Field(
        default_factory=list, description="who may call the API (hashes; mint with `python -m deployments.door.apikeys NAME`), "
        "each with its rate and concurrency limits; empty = the API is open to anyone who reaches it"
    )
    shed_load: bool = Field(
        True, description="refuse generation requests the generator cannot take (503) before parsing their body (drained unparsed)"
    )
    locate_timeout_s: float = Field(
        10.0, gt=0.0, le=MAX_TIMEOUT_S, description="how long a generated image waits for the product locator; "
        "past it the image is delivered with `products.status: timeout`"
    )
    default_products: int = Field(
        8, ge=0, le=MAX_PRODUCTS, description="products located when a request names none: the captioner's "
        "top-ranked objects (/v1/generate) or the prompt's (/v1/text2img); 0 = locate only products asked for"
    )

    @field_validator("ab_split")
    @classmethod
    def _shares_positive(cls, split: dict[str, float]) -> dict[str, float]:
        for arm, share in split.items():
            if not share > 0:
                raise ValueError(f"the share of arm {arm!r} must be > 0 but is {share}")
        return split

    @field_validator("api_keys")
    @classmethod
    def _keys_unique(cls, keys: list[ApiKey]) -> list[ApiKey]:
        for attribute in ("name", "sha256"):
            values = [getattr(k, attribute) for k in keys]
            repeated = sorted({v for v in values if values.count(v) > 1})
            if repeated:
                shown = repeated if attribute == "name" else [v[:12] + "…" for v in repeated]
                raise ValueError(f"each API key needs its own {attribute}; repeated: {shown}")
        return keys

    @model_validator(mode="after")
    def _arms_are_named_mixes(self) -> "IngressConfig":
        for arm in [*self.ab_split, self.default_mix]:
            if arm not in self.mixes:
                raise ValueError(f"{arm!r} is not one of the named mixes {sorted(self.mixes)}")
        arms = list(self.ab_split or {self.default_mix: 1.0})
        unknown = sorted(set(self.ab_policy.floors) - set(arms))
        if unknown:
            raise ValueError(f"ab_policy.floors: {unknown} are not arms of ab_split {arms}")
        total = sum(self.ab_policy.policy(arms).floors.values())
        if self.ab_policy.allocation == "thompson" and total > 1.0:
            raise ValueError(f"ab_policy.floors: the arms' floors sum to {total:g}, past 1")
        for name, concept in self.concepts.items():
            if concept.mix is not None and concept.mix not in self.mixes and not re.fullmatch(MIX_SPEC_PATTERN, concept.mix):
                raise ValueError(f"concepts.{name}.mix: {concept.mix!r} is not {MIX_SPEC_RULE}")
        return self

    @property
    def experiment(self) -> Experiment:
        """The experiment this config runs: its A/B split (or the default mix alone) with the salt and the
        weights of its arms. A ``serve deploy`` that changes any of them starts a new experiment."""
        split = self.ab_split or {self.default_mix: 1.0}
        return Experiment(split=dict(split), salt=self.ab_salt, mixes={arm: dict(self.mixes[arm]) for arm in split},
                          policy=self.ab_policy.policy(list(split)))  # fmt: skip

    @property
    def limits(self) -> SizeLimits:
        return SizeLimits(min_side=self.min_side, max_side=self.max_side, max_steps=self.max_steps)

    def limits_document(self) -> dict[str, Any]:
        """What ``GET /v1/limits`` answers: the live limits and defaults of this config plus the fixed
        bounds of :mod:`deskgen.limits`, i.e. what a client may send without a 400."""
        return {
            "min_side": self.min_side,
            "max_side": self.max_side,
            "side_multiple": SIDE_MULTIPLE,
            "max_steps": self.max_steps,
            "max_seed": MAX_SEED,
            "guidance": [MIN_GUIDANCE, MAX_GUIDANCE],
            "max_prompt_chars": MAX_PROMPT_CHARS,
            "max_style_chars": MAX_STYLE_CHARS,
            "max_user_id_chars": MAX_USER_ID_CHARS,
            "max_mix_spec_chars": MAX_MIX_SPEC_CHARS,
            "max_products": MAX_PRODUCTS,
            "max_product_chars": MAX_PRODUCT_CHARS,
            "max_upload_bytes": self.max_upload_bytes,
            "max_pixels": self.max_pixels,
            "max_timeout_s": MAX_TIMEOUT_S,
            "request_timeout_s": self.request_timeout_s,
            "defaults": {"steps": self.default_steps, "guidance": self.default_guidance, "width": self.default_width,
                         "height": self.default_height, "mix": self.default_mix},
        }  # fmt: skip


class StyleOption(BaseModel):
    """A style concept woven into the prompt, checked by the prompt builder's rule (stated in the document)."""

    style: str | None = Field(None, max_length=MAX_STYLE_CHARS, description="a style concept woven into the prompt "
                              "(visible text, no control or format characters)", json_schema_extra={"pattern": STYLE_PATTERN})  # fmt: skip

    @field_validator("style")
    @classmethod
    def _style_rule(cls, style: str | None) -> str | None:
        return validate_style(style)


#: One product name (its rule stated in the document; the ingress strips it and drops repeats).
ProductName = Annotated[str, Field(min_length=1, max_length=MAX_PRODUCT_CHARS, pattern=PRODUCT_PATTERN)]


#: A form's text for a product list: names separated by commas (empty items are skipped), each at most
#: MAX_PRODUCT_CHARS once stripped, at most MAX_PRODUCTS of them. The pattern states exactly what
#: :func:`form_values` accepts, so the multipart schema and the server agree.
_NAME_END = r"[^\s,\x00-\x1f\x7f-\x9f]"
_ITEM = rf"{_NAME_END}(?:[^,\x00-\x1f\x7f-\x9f]{{0,{MAX_PRODUCT_CHARS - 2}}}{_NAME_END})?"
_LIST = rf"{_ITEM}(?:\s*,[\s,]*{_ITEM}){{0,{MAX_PRODUCTS - 1}}}"
#: At least one product (/v1/locate), or any number from none (a generation: none = the default list).
PRODUCT_LIST_PATTERN = rf"^[\s,]*{_LIST}[\s,]*$"
OPTIONAL_PRODUCT_LIST_PATTERN = rf"^[\s,]*(?:{_LIST})?[\s,]*$"
#: How a form carries the non-text options: booleans as the words true / false, lists comma-separated
#: (or the field repeated). JSON bodies carry real booleans and arrays.
_PRODUCTS_TEXT = f"comma-separated products ({PRODUCT_RULE} each; at most {MAX_PRODUCTS})"
FORM_SCHEMAS: dict[str, dict[str, Any]] = {
    "locate": {"type": "string", "enum": ["true", "false"]},
    "annotate": {"type": "string", "enum": ["true", "false"]},
    "products": {"type": "string", "pattern": OPTIONAL_PRODUCT_LIST_PATTERN, "description": _PRODUCTS_TEXT},
}
LOCATE_FORM_SCHEMAS = FORM_SCHEMAS | {
    "products": {"type": "string", "pattern": PRODUCT_LIST_PATTERN, "description": _PRODUCTS_TEXT},
}


def form_values(fields: dict[str, Any]) -> dict[str, Any]:
    """A form's text values as the request models take them: ``true``/``false`` -> bool (other text stays
    text, which the models refuse naming the field), comma-separated products (the field may repeat) -> a
    list of the non-empty stripped names."""
    out = dict(fields)
    for name in ("locate", "annotate"):
        if out.get(name) in ("true", "false"):
            out[name] = out[name] == "true"
    if "products" in out:
        texts = out["products"] if isinstance(out["products"], list) else [out["products"]]
        out["products"] = [part.strip() for text in texts for part in str(text).split(",") if part.strip()]
    return out


class LocateOptions(BaseModel):
    """Which products to find in the image, and whether to draw them."""

    products: list[ProductName] | None = Field(
        None, max_length=MAX_PRODUCTS, description=f"products to find ({PRODUCT_RULE} each; in a form: "
        "comma-separated or the field repeated); omitted on a generation: the objects its captions or prompt name",
    )
    annotate: StrictBool = Field(False, description="also answer a copy of the image with the boxes drawn (JSON and SSE)")


class GenerationOptions(LocateOptions):
    """Options shared by /v1/generate and /v1/text2img. Omitted values take the configured defaults."""

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
        json_schema_extra={"pattern": f"^(?:{AUTO}|{CONCEPT_NAME_PATTERN[1:-1]})$"},
    )

    locate: StrictBool = Field(True, description="find the products in the generated image (`products` in the answer)")

    @field_validator("concept")
    @classmethod
    def _concept_syntax(cls, concept: str | None) -> str | None:
        if concept is not None and not re.fullmatch(f"{AUTO}|{CONCEPT_NAME_PATTERN[1:-1]}", concept):
            raise ValueError(f"must be `{AUTO}` or a concept name (1-64 of a-z 0-9 _ -)")
        return concept


    @field_validator("mix")
    @classmethod
    def _mix_syntax(cls, mix: str | None) -> str | None:
        if mix is not None and not re.fullmatch(MIX_SPEC_PATTERN, mix):
            raise ValueError(f"must be {MIX_SPEC_RULE}")
        return mix


class GenerateForm(GenerationOptions, StyleOption):
    """/v1/generate: the photo (multipart `image`, or `image_b64` in JSON) plus options."""


    image_b64: str | None = Field(None, description="JSON only: the photo, base64")


class Text2ImgRequest(GenerationOptions):
    """/v1/text2img: a prompt straight to the generator."""

    prompt: str = Field(..., min_length=1, max_length=MAX_PROMPT_CHARS)


class ClassifyForm(BaseModel):
    """/v1/classify: just the photo."""

    model_config = ConfigDict(extra="forbid")

    image_b64: str | None = None


class CaptionForm(ClassifyForm, StyleOption):
    """/v1/caption: the photo and, optionally, a style woven into the prompt."""



class LocateForm(LocateOptions):
    """/v1/locate: any image and the products to find in it."""

    model_config = ConfigDict(extra="forbid")

    image_b64: str | None = Field(None, description="JSON only: the image, base64")
    products: list[ProductName] = Field(..., min_length=1, max_length=MAX_PRODUCTS,  # type: ignore[assignment]
                                        description=f"products to find ({PRODUCT_RULE} each; in a form: comma-separated)")  # fmt: skip


class FeedbackRequest(BaseModel):
    """/v1/feedback: what a user did with an image. Idempotent per (image_id, event)."""

    model_config = ConfigDict(extra="forbid")

    image_id: str = Field(..., pattern=REQUEST_ID_PATTERN, description="the request id the image was answered with")
    event: Literal[FEEDBACK_EVENTS] = Field(..., description="what the user did")  # type: ignore[valid-type]
    value: float | None = Field(None, allow_inf_nan=False, description="optional, e.g. a rating")
    user_id: str | None = Field(
        None, min_length=1, max_length=MAX_USER_ID_CHARS, description="must be the user the image was delivered to"
    )
