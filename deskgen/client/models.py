"""The client's typed results: what each route answers, read once from its JSON (``from_json``).

The server's JSON stays available as ``raw`` on the larger results, so a field added to the API is
readable before this module names it.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class MixInfo:
    """The LoRA mix a generation used: its canonical id (also the Serve multiplexed id), its catalogue name
    when it has one, the adapter weights, and how it was chosen (``request``, ``header``, ``ab`` with
    the ``arm``, or ``default``)."""

    id: str
    name: str | None
    weights: dict[str, float]
    source: str
    arm: str | None = None

    @property
    def label(self) -> str:
        """``ott_3d (3d:0.5+ott:0.7)`` for a named mix, the id alone otherwise."""
        return f"{self.name} ({self.id})" if self.name and self.name != self.id else self.id

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> MixInfo:
        return cls(
            id=str(data["id"]),
            name=data.get("name"),
            weights={str(k): float(v) for k, v in (data.get("weights") or {}).items()},
            source=str(data.get("source", "")),
            arm=data.get("arm"),
        )


@dataclass(frozen=True)
class Keyword:
    """An object the captions named, and how many captions named it (more = more important)."""

    name: str
    count: int

    @classmethod
    def many(cls, data: list[dict[str, Any]] | None) -> tuple[Keyword, ...]:
        return tuple(cls(name=str(k["name"]), count=int(k["count"])) for k in data or ())


@dataclass(frozen=True)
class ProductBox:
    """One instance of a product in an image: ``box`` ``(x0, y0, x1, y1)`` in pixels of the image,
    ``box_normalized`` the same divided by its width and height (0-1), and the detector's ``score``."""

    box: tuple[float, float, float, float]
    box_normalized: tuple[float, float, float, float]
    score: float

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ProductBox:
        return cls(box=_box(data["box"]), box_normalized=_box(data["box_normalized"]), score=float(data["score"]))


def _box(values: list[Any]) -> tuple[float, float, float, float]:
    x0, y0, x1, y1 = (float(v) for v in values)
    return x0, y0, x1, y1


@dataclass(frozen=True)
class LocatedProduct:
    """A product asked for: ``found`` and its ``instances``, best first (empty when not found)."""

    product: str
    found: bool
    instances: tuple[ProductBox, ...] = ()

    @property
    def best(self) -> ProductBox | None:
        """The highest-scoring instance, or ``None`` when the product was not found."""
        return self.instances[0] if self.instances else None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LocatedProduct:
        return cls(product=str(data["product"]), found=bool(data["found"]),
                   instances=tuple(ProductBox.from_json(i) for i in data.get("instances") or ()))  # fmt: skip


@dataclass(frozen=True)
class ProductLocation:
    """Where the products are in one image: the ``products`` of a generation's answer (and its ``located``
    event), or what ``/v1/locate`` answers.

    ``status``: ``ok`` (the locator answered), ``off`` (not asked: turned off, or no products to look for),
    ``failed`` or ``timeout`` (the image was delivered without them); ``reason`` says why when not ``ok``.
    ``source``: where the list came from (``request``, ``captions`` or ``prompt``). ``found_fraction`` is
    the share of the products asked for that were found (``None`` unless ``ok``); ``width`` and ``height``
    are the image's, which the pixel boxes refer to."""

    status: str
    items: tuple[LocatedProduct, ...] = ()
    reason: str | None = None
    threshold: float | None = None
    width: int | None = None
    height: int | None = None
    source: str | None = None
    found_fraction: float | None = None

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

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ProductLocation:
        threshold, fraction = data.get("threshold"), data.get("found_fraction")
        width, height = data.get("width"), data.get("height")
        return cls(
            status=str(data["status"]),
            items=tuple(LocatedProduct.from_json(item) for item in data.get("items") or ()),
            reason=data.get("reason"),
            threshold=float(threshold) if threshold is not None else None,
            width=int(width) if width is not None else None,
            height=int(height) if height is not None else None,
            source=data.get("source"),
            found_fraction=float(fraction) if fraction is not None else None,
        )


def _b64_or_none(value: str | None) -> bytes | None:
    return base64.b64decode(value, validate=True) if value is not None else None


@dataclass(frozen=True)
class LocateResult:
    """``POST /v1/locate``: where the products are in the image sent, and the ``annotated`` PNG (a copy
    with the boxes drawn) when it was asked for."""

    products: ProductLocation
    annotated: bytes | None = field(default=None, repr=False)
    #: The server's JSON without ``annotated_b64``.
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    def save_annotated(self, path: str | Path) -> Path:
        return _save_annotated(self.annotated, path)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LocateResult:
        return cls(products=ProductLocation.from_json(data["products"]), annotated=_b64_or_none(data.get("annotated_b64")),
                   raw={k: v for k, v in data.items() if k != "annotated_b64"})  # fmt: skip


def _save_annotated(annotated: bytes | None, path: str | Path) -> Path:
    if annotated is None:
        raise ValueError("there is no annotated image: ask with `annotate=True` (it is drawn when the locator answered).")
    path = Path(path)
    path.write_bytes(annotated)
    return path


@dataclass(frozen=True)
class GenerationResult:
    """A generated image and its recipe: what ``/v1/generate`` and ``/v1/text2img`` answer as JSON, or as
    the ``done`` event of their stream.

    ``request_id`` is the image id that :meth:`Deskgen.feedback` names. ``timings`` are the request's
    stages in seconds (``classify_s``, ``caption_s``, ``generate_s``, ``locate_s``, ``total_s``); the
    generator's own (``denoise_s``, ``decode_s``, ...) are in ``metadata["timings"]``. ``desk_score``,
    ``captions``, ``keywords`` and ``style`` are set for ``generate`` (from a photo) only. ``products`` is
    where the products are in the image (``None`` from a server that does not locate them); ``annotated`` a
    PNG copy with their boxes drawn, when ``annotate`` was asked and the locator answered. ``concept`` is the
    concept preset used (``auto`` resolved to today's)."""

    png: bytes = field(repr=False)
    request_id: str
    mix: MixInfo
    seed: int
    steps: int
    guidance: float
    width: int
    height: int
    prompt: str
    negative_prompt: str
    timings: dict[str, float]
    metadata: dict[str, Any] = field(repr=False)
    desk_score: float | None = None
    captions: dict[str, Any] | None = field(default=None, repr=False)
    keywords: tuple[Keyword, ...] = field(default=(), repr=False)
    style: str | None = None
    concept: str | None = None
    products: ProductLocation | None = None
    annotated: bytes | None = field(default=None, repr=False)
    #: The server's JSON without ``image_b64`` and ``annotated_b64``.
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def image_id(self) -> str:
        """The id to send feedback about this image with (the answer's request id)."""
        return self.request_id

    def save(self, path: str | Path) -> Path:
        """Write the PNG (its ``deskgen`` text chunk holds the recipe) and return the path."""
        path = Path(path)
        path.write_bytes(self.png)
        return path

    def save_annotated(self, path: str | Path) -> Path:
        """Write the annotated copy (the boxes drawn); ValueError when the answer has none."""
        return _save_annotated(self.annotated, path)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> GenerationResult:
        raw = {k: v for k, v in data.items() if k not in ("image_b64", "annotated_b64")}
        desk_score, products = data.get("desk_score"), data.get("products")
        return cls(
            png=base64.b64decode(data["image_b64"], validate=True),
            request_id=str(data["request_id"]),
            mix=MixInfo.from_json(data["mix"]),
            seed=int(data["seed"]),
            steps=int(data["steps"]),
            guidance=float(data["guidance"]),
            width=int(data["width"]),
            height=int(data["height"]),
            prompt=str(data["prompt"]),
            negative_prompt=str(data.get("negative_prompt") or ""),
            timings={str(k): float(v) for k, v in (data.get("timings") or {}).items()},
            metadata=dict(data.get("metadata") or {}),
            desk_score=float(desk_score) if desk_score is not None else None,
            captions=data.get("captions"),
            keywords=Keyword.many(data.get("keywords")),
            style=data.get("style"),
            concept=data.get("concept"),
            products=ProductLocation.from_json(products) if products is not None else None,
            annotated=_b64_or_none(data.get("annotated_b64")),
            raw=raw,
        )


# -- progress events of a streamed generation (Accept: text/event-stream) ------------------------------


@dataclass(frozen=True)
class Classified:
    """The gate passed the photo (``generate`` only)."""

    score: float
    threshold: float


@dataclass(frozen=True)
class Captioned:
    """The captions, ranked objects and the prompt built from them (``generate`` only)."""

    captions: dict[str, Any]
    keywords: tuple[Keyword, ...]
    prompt: str


@dataclass(frozen=True)
class Started:
    """A generator replica holds the mix and starts denoising (after ``queued_s`` in its queue)."""

    mix_id: str
    replica: str
    queued_s: float


@dataclass(frozen=True)
class Step:
    """Denoising step ``step`` of ``total`` is done (``step`` counts from 1)."""

    step: int
    total: int


@dataclass(frozen=True)
class Located:
    """The products were looked for in the generated image (just before ``Done``; its result carries the
    same ``products``)."""

    products: ProductLocation


@dataclass(frozen=True)
class Done:
    """The image: the last event of a stream that succeeded."""

    result: GenerationResult


@dataclass(frozen=True)
class OtherEvent:
    """An event this client does not know (a newer server); passed on, not dropped."""

    event: str
    data: Any


ProgressEvent = Classified | Captioned | Started | Step | Located | Done | OtherEvent


# -- the other routes --------------------------------------------------------------------------------


@dataclass(frozen=True)
class NamedMix:
    id: str
    weights: dict[str, float]


@dataclass(frozen=True)
class Mixes:
    """``GET /v1/mixes``: the adapters, the named mixes with their canonical ids, the default mix, the
    live A/B split (shares normalised to 1) and the adapter files present but unusable, with the reason
    (a mix naming one is answered 422 ``adapter_unavailable``)."""

    adapters: tuple[str, ...]
    named: dict[str, NamedMix]
    default_mix: str
    ab_split: dict[str, float]
    ab_salt: str
    unavailable: dict[str, str] = field(default_factory=dict)
    #: The share of new users each arm gets now: the split, or a Thompson bandit's current weights.
    ab_weights: dict[str, float] = field(default_factory=dict)
    #: How the experiment allocates: ``fixed`` or ``thompson`` (``ab_policy.allocation``).
    allocation: str = "fixed"

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Mixes:
        return cls(
            adapters=tuple(data["adapters"]),
            named={
                str(n): NamedMix(id=str(m["id"]), weights={str(k): float(v) for k, v in m["weights"].items()})
                for n, m in data["named_mixes"].items()
            },
            default_mix=str(data["default_mix"]),
            ab_split={str(k): float(v) for k, v in (data.get("ab_split") or {}).items()},
            ab_salt=str(data.get("ab_salt", "")),
            unavailable={str(k): str(v) for k, v in (data.get("unavailable") or {}).items()},
            ab_weights={str(k): float(v) for k, v in (data.get("ab_weights") or {}).items()},
            allocation=str((data.get("ab_policy") or {}).get("allocation", "fixed")),
        )


@dataclass(frozen=True)
class Limits:
    """``GET /v1/limits``: what a request may ask for without a 400, and the defaults of omitted options."""

    min_side: int
    max_side: int
    side_multiple: int
    max_steps: int
    max_seed: int
    guidance: tuple[float, float]
    max_upload_bytes: int
    max_pixels: int
    max_timeout_s: float
    request_timeout_s: float
    defaults: dict[str, Any]
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Limits:
        low, high = data["guidance"]
        return cls(
            min_side=int(data["min_side"]),
            max_side=int(data["max_side"]),
            side_multiple=int(data["side_multiple"]),
            max_steps=int(data["max_steps"]),
            max_seed=int(data["max_seed"]),
            guidance=(float(low), float(high)),
            max_upload_bytes=int(data["max_upload_bytes"]),
            max_pixels=int(data["max_pixels"]),
            max_timeout_s=float(data["max_timeout_s"]),
            request_timeout_s=float(data["request_timeout_s"]),
            defaults=dict(data.get("defaults") or {}),
            raw=dict(data),
        )


@dataclass(frozen=True)
class Classification:
    """``POST /v1/classify``: the desk gate's score for a photo (200 either way)."""

    score: float
    is_desk: bool
    threshold: float

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Classification:
        return cls(score=float(data["score"]), is_desk=bool(data["is_desk"]), threshold=float(data["threshold"]))


@dataclass(frozen=True)
class Caption:
    """``POST /v1/caption``: captions, ranked objects and the prompt pair a photo would give."""

    captions: dict[str, Any]
    keywords: tuple[Keyword, ...]
    prompt: str
    negative_prompt: str

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Caption:
        return cls(
            captions=dict(data["captions"]),
            keywords=Keyword.many(data.get("keywords")),
            prompt=str(data["prompt"]),
            negative_prompt=str(data.get("negative_prompt") or ""),
        )


@dataclass(frozen=True)
class FeedbackResult:
    """``POST /v1/feedback``: stored (``duplicate`` False, HTTP 201) or the same (image, event) was
    already stored (``duplicate`` True, HTTP 200) — a retry never counts twice."""

    image_id: str
    event: str
    duplicate: bool
    status: int

    @classmethod
    def from_json(cls, data: dict[str, Any], status: int) -> FeedbackResult:
        return cls(image_id=str(data["image_id"]), event=str(data["event"]), duplicate=bool(data["duplicate"]), status=status)


@dataclass(frozen=True)
class Concepts:
    """``GET /v1/concepts``: the concept presets (name -> ``prompt``, ``negative``, and the ``mix``,
    ``steps``, ``guidance`` it defaults to), the weekday ``schedule`` in its ``timezone``, today's
    ``weekday`` and ``today``'s concept (what ``concept="auto"`` picks; ``None`` when the schedule has none)."""

    concepts: dict[str, dict[str, Any]]
    schedule: dict[str, str]
    timezone: str
    weekday: str
    today: str | None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Concepts:
        return cls(
            concepts={str(name): dict(preset) for name, preset in data["concepts"].items()},
            schedule={str(k): str(v) for k, v in (data.get("schedule") or {}).items()},
            timezone=str(data.get("timezone", "")),
            weekday=str(data.get("weekday", "")),
            today=data.get("today"),
        )


@dataclass(frozen=True)
class Readiness:
    """``GET /readyz``: ready when every model stage answers; ``stages`` says which does not."""

    ready: bool
    stages: dict[str, str]
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Readiness:
        return cls(ready=bool(data["ready"]), stages=dict(data.get("stages") or {}), raw=dict(data))
