"""What the HTTP API answers, one model per answer. The server builds its JSON answers with these models
and its OpenAPI document names them; the client reads every answer into them (``model_validate``).

Fields a newer server adds are kept (``model_extra``), so a client reads them before this module names
them. Convenience for callers (the decoded PNG, ``save``, lookups by product) is plain methods and
properties on the same models: one name per concept on both sides of the wire.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, computed_field

from deskgen_client.rules import FeedbackEvent

Box = tuple[float, float, float, float]


class Answer(BaseModel):
    """Base of every answer: immutable; unknown fields kept."""

    model_config = ConfigDict(extra="allow", frozen=True)


class Keyword(Answer):
    """An object the captions named, and how many captions named it (more = more important)."""

    name: str
    count: int


class ProductBox(Answer):
    """One instance of a product in an image: ``box`` ``(x0, y0, x1, y1)`` in pixels of the image,
    ``box_normalized`` the same divided by its width and height (0-1), and the detector's ``score``."""

    box: Box
    box_normalized: Box
    score: float


class LocatedProduct(Answer):
    """A product asked for: ``found`` and its ``instances``, best first (empty when not found)."""

    product: str
    found: bool
    instances: tuple[ProductBox, ...] = ()

    @property
    def best(self) -> ProductBox | None:
        """The highest-scoring instance, or ``None`` when the product was not found."""
        return self.instances[0] if self.instances else None


#: ``ok``: the locator answered; ``off``: not asked (turned off, or no products to look for); ``failed`` /
#: ``timeout``: it did not answer in time or raised (the image is delivered anyway; ``reason`` says why).
LocateStatus = Literal["ok", "off", "failed", "timeout"]
#: Where the product list came from: the request, the captioner's ranked objects, or the prompt's objects.
ProductSource = Literal["request", "captions", "prompt"]


class ProductLocation(Answer):
    """Where the products are in one image: the ``products`` of a generation's answer (and its ``located``
    event), or of what ``/v1/locate`` answers. ``width`` and ``height`` are the image's, which the pixel
    boxes refer to; ``reason`` says why when ``status`` is not ``ok``."""

    # found_fraction is computed: an incoming one is not kept beside it.
    model_config = ConfigDict(extra="ignore", frozen=True)

    status: LocateStatus
    items: tuple[LocatedProduct, ...] = ()
    reason: str | None = None
    threshold: float | None = None
    width: int | None = None
    height: int | None = None
    source: ProductSource | None = None

    @computed_field  # type: ignore[prop-decorator]
    @property
    def found_fraction(self) -> float | None:
        """Share of the products asked for that were found; ``None`` unless the locator answered with any."""
        if self.status != "ok" or not self.items:
            return None
        return sum(item.found for item in self.items) / len(self.items)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def found_items(self) -> tuple[LocatedProduct, ...]:
        return tuple(item for item in self.items if item.found)

    @property
    def missing(self) -> tuple[str, ...]:
        """The products asked for that were not found."""
        return tuple(item.product for item in self.items if not item.found)

    def get(self, product: str) -> LocatedProduct | None:
        """The item for ``product`` (compared case-insensitively, as the server drops repeats), or ``None``
        when it was not asked for."""
        key = product.strip().casefold()
        return next((item for item in self.items if item.product.casefold() == key), None)

    def found(self, product: str) -> bool:
        """Whether ``product`` was asked for and found."""
        item = self.get(product)
        return item is not None and item.found

    def boxes(self, product: str) -> tuple[ProductBox, ...]:
        """The instances of ``product``, best first (empty when not found or not asked for)."""
        item = self.get(product)
        return item.instances if item is not None else ()


#: How a generation's mix was chosen.
MixSource = Literal["request", "header", "concept", "ab", "default"]


class MixInfo(Answer):
    """The LoRA mix a generation used: its canonical id (also the Serve multiplexed id), its catalogue name
    when it has one, the adapter weights, and how it was chosen (``source``; ``arm`` for an A/B arm)."""

    id: str
    name: str | None = None
    weights: dict[str, float] = Field(default_factory=dict)
    source: MixSource
    arm: str | None = None

    @property
    def label(self) -> str:
        """``ott_3d (3d:0.5+ott:0.7)`` for a named mix, the id alone otherwise."""
        return f"{self.name} ({self.id})" if self.name and self.name != self.id else self.id


def _decode(value: str | None) -> bytes | None:
    return base64.b64decode(value, validate=True) if value is not None else None


def _save(data: bytes | None, path: str | Path, what: str) -> Path:
    if data is None:
        raise ValueError(f"there is no {what}: ask with `annotate=True` (it is drawn when the locator answered).")
    path = Path(path)
    path.write_bytes(data)
    return path


class GenerationResult(Answer):
    """A generated image and its recipe: what ``/v1/generate`` and ``/v1/text2img`` answer as JSON, and
    the ``done`` event of their stream.

    ``request_id`` is the image id feedback names. ``timings`` are the request's stages in seconds
    (``classify_s``, ``caption_s``, ``generate_s``, ``locate_s``, ``total_s``); the generator's own are in
    ``metadata["timings"]``. ``desk_score``, ``captions``, ``keywords`` and ``style`` are set for a
    generation from a photo only. ``products``: where the products are in the image; ``annotated_b64``: a
    PNG copy with their boxes drawn, when asked and the locator answered. ``concept``: the preset used
    (``auto`` resolved to today's)."""

    request_id: str
    image_b64: str = Field(repr=False)
    media_type: str = "image/png"
    desk_score: float | None = None
    captions: dict[str, Any] | None = Field(None, repr=False)
    keywords: tuple[Keyword, ...] = Field((), repr=False)
    style: str | None = None
    concept: str | None = None
    mix: MixInfo
    timings: dict[str, float] = Field(default_factory=dict)
    products: ProductLocation | None = None
    annotated_b64: str | None = Field(None, repr=False)
    prompt: str
    negative_prompt: str = ""
    seed: int
    steps: int
    guidance: float
    width: int
    height: int
    metadata: dict[str, Any] = Field(default_factory=dict, repr=False)

    @property
    def png(self) -> bytes:
        """The image (its ``deskgen`` text chunk holds the recipe)."""
        return base64.b64decode(self.image_b64, validate=True)

    @property
    def annotated(self) -> bytes | None:
        """The PNG copy with the products' boxes drawn, when it was asked for."""
        return _decode(self.annotated_b64)

    @property
    def image_id(self) -> str:
        """The id to send feedback about this image with (the answer's request id)."""
        return self.request_id

    def save(self, path: str | Path) -> Path:
        """Write the PNG and return the path."""
        path = Path(path)
        path.write_bytes(self.png)
        return path

    def save_annotated(self, path: str | Path) -> Path:
        """Write the annotated copy; ValueError when the answer has none."""
        return _save(self.annotated, path, "annotated image")


class Classification(Answer):
    """``POST /v1/classify``: the desk gate's score for a photo (200 either way)."""

    score: float
    is_desk: bool
    threshold: float


class Caption(Answer):
    """``POST /v1/caption``: captions, ranked objects and the prompt pair a photo would give."""

    captions: dict[str, Any]
    keywords: tuple[Keyword, ...] = ()
    prompt: str
    negative_prompt: str = ""
    seconds: float | None = None


class LocateResult(Answer):
    """``POST /v1/locate``: where the products are in the image sent, and the annotated copy when asked."""

    products: ProductLocation
    annotated_b64: str | None = Field(None, repr=False)

    @property
    def annotated(self) -> bytes | None:
        return _decode(self.annotated_b64)

    def save_annotated(self, path: str | Path) -> Path:
        return _save(self.annotated, path, "annotated image")


class FeedbackResult(Answer):
    """``POST /v1/feedback``: stored (``duplicate`` False, HTTP 201) or the same (image, event) was
    already stored (``duplicate`` True, HTTP 200): a retry never counts twice."""

    image_id: str
    event: FeedbackEvent
    recorded: bool = True
    duplicate: bool

    @property
    def status(self) -> int:
        """The HTTP status this answer comes with."""
        return 200 if self.duplicate else 201


class NamedMix(Answer):
    id: str
    weights: dict[str, float]


class Mixes(Answer):
    """``GET /v1/mixes``: the adapters, those present but unusable (name -> reason; a mix naming one is
    answered 422 ``adapter_unavailable``), the named mixes with their canonical ids, the default mix, the
    live A/B split (shares normalised to 1), how the experiment allocates (``ab_policy``) and the share of
    new users each arm gets now (``ab_weights``: the split, or a Thompson bandit's weights)."""

    adapters: tuple[str, ...]
    unavailable: dict[str, str] = Field(default_factory=dict)
    named_mixes: dict[str, NamedMix]
    default_mix: str
    ab_split: dict[str, float] = Field(default_factory=dict)
    ab_salt: str = ""
    ab_policy: dict[str, Any] = Field(default_factory=dict)
    ab_weights: dict[str, float] = Field(default_factory=dict)

    @property
    def allocation(self) -> str:
        """``fixed`` or ``thompson`` (``ab_policy.allocation``)."""
        return str(self.ab_policy.get("allocation", "fixed"))


class LimitDefaults(Answer):
    """What an omitted option becomes."""

    steps: int
    guidance: float
    width: int
    height: int
    mix: str


class Limits(Answer):
    """``GET /v1/limits``: what a request may ask for without a 400, and the defaults of omitted options."""

    min_side: int
    max_side: int
    side_multiple: int
    max_steps: int
    max_seed: int
    guidance: tuple[float, float]
    max_prompt_chars: int
    max_style_chars: int
    max_user_id_chars: int
    max_mix_spec_chars: int
    max_products: int
    max_product_chars: int
    max_upload_bytes: int
    max_pixels: int
    max_timeout_s: float
    request_timeout_s: float
    defaults: LimitDefaults


class Concepts(Answer):
    """``GET /v1/concepts``: the presets (name -> ``prompt``, ``negative``, and the ``mix``, ``steps``,
    ``guidance`` it defaults to), the weekday ``schedule`` in its ``timezone``, today's ``weekday`` and
    ``today``'s concept (what ``concept="auto"`` picks; ``None`` when the schedule has none)."""

    concepts: dict[str, dict[str, Any]]
    schedule: dict[str, str] = Field(default_factory=dict)
    timezone: str
    weekday: str
    today: str | None = None


class Health(Answer):
    """``GET /healthz``: the ingress replica that answered and its admission door."""

    status: Literal["ok"]
    replica: str
    admission: dict[str, Any] = Field(default_factory=dict)


class Readiness(Answer):
    """``GET /readyz`` (200 or 503, same body): ready when every model stage answers; ``stages`` says which
    does not; ``exposures`` is the replica's buffer of exposures not yet written."""

    ready: bool
    stages: dict[str, str]
    exposures: dict[str, Any] = Field(default_factory=dict)


class ExperimentList(Answer):
    """``GET /v1/experiments``: ``current`` is the experiment the live config runs; ``experiments`` each
    with its split, salt, start, exposures and users."""

    current: str
    experiments: list[dict[str, Any]]


class ErrorDetail(Answer):
    code: str = Field(..., description="stable machine-readable code, e.g. invalid_parameter, not_a_desk_setup")
    message: str = Field(..., description="what was wrong, naming the field and the rule")
    field: str | None = Field(None, description="the request field at fault, when one is")


class ErrorBody(Answer):
    """Every error deskgen answers (422 adds ``score`` and ``threshold`` to ``error``, or ``adapter`` and
    ``reason`` for an unavailable LoRA adapter)."""

    error: ErrorDetail
    request_id: str
