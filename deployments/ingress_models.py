"""The ingress's typed ``user_config`` (:class:`IngressConfig`, with the experiment's :class:`AbPolicy`) and
how a multipart form carries the request models' non-text options. The request bodies themselves are the
protocol's (:mod:`deskgen_client.protocol`); bounds come from :mod:`deskgen.limits`."""

import re
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from deployments.door.apikeys import WEBHOOK_SECRET_PATTERN, ApiKey
from deskgen.concepts import ConceptConfig
from deskgen.experiments.records import AllocationKind, Experiment, Policy
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
    SIDE_MULTIPLE,
    SizeLimits,
)
from deskgen.mixes import NAMED_MIXES
from deskgen_client.rules import MIX_SPEC_PATTERN, MIX_SPEC_RULE, PRODUCT_RULE, FeedbackEvent


class AbPolicy(BaseModel):
    """How the experiment decides and allocates (``ab_policy`` in the Ingress ``user_config``)."""

    model_config = ConfigDict(extra="forbid")

    primary_metric: FeedbackEvent = Field(
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
    webhook_allow: list[str] = Field(
        default_factory=list, description="webhook targets allowed although they resolve to loopback or private "
        "addresses (host names, addresses, CIDR ranges); by default only public addresses are",
    )  # fmt: skip
    webhook_secret: str | None = Field(
        None, pattern=WEBHOOK_SECRET_PATTERN, description="signs the webhooks of jobs submitted without an API "
        "key (an open API); each API key has its own `webhook_secret`",
    )  # fmt: skip
    shed_load: bool = Field(
        True, description="refuse generation requests the generator cannot take (503) before parsing their body (drained unparsed)"
    )
    router_retry_s: list[Annotated[float, Field(gt=0.0, le=1.0)]] = Field(
        default_factory=lambda: [0.01, 0.03, 0.1], max_length=8,
        description="pauses (s) after which a generation the Generator's router refused is sent again before "
        "it is answered 503: Serve counts a request as queued until a replica accepts it, so requests that "
        "arrive together are refused while a replica is still free; [] = answer the first refusal",
    )  # fmt: skip
    locate_timeout_s: float = Field(
        10.0, gt=0.0, le=MAX_TIMEOUT_S, description="how long a generated image waits for the product locator; "
        "past it the image is delivered with `products.status: timeout`"
    )
    default_products: int = Field(
        8, ge=0, le=MAX_PRODUCTS, description="products located when a request names none: the captioner's "
        "top-ranked objects (/v1/generate) or the prompt's (/v1/text2img); 0 = locate only products asked for"
    )

    def webhook_secret_of(self, api_key: str | None) -> str | None:
        """The secret that signs the webhooks of ``api_key``'s jobs (None: the open API's)."""
        if api_key is None:
            return self.webhook_secret
        return next((k.webhook_secret for k in self.api_keys if k.name == api_key), None)

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
