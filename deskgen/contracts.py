"""The typed values that travel between the deployments (the way diffusers returns
``StableDiffusionXLPipelineOutput``): a renamed field fails mypy, not a request three files away.

    Ingress --image-->            Classifier  --> GateVerdict
    Ingress --image, style-->     Captioner   --> CaptionResult
    Ingress --GenerationRequest--> Generator  --> GenerationStarted, GenerationStep..., GeneratedImage
    Ingress --image, products-->  Locator     --> Located (LocatedProduct per product, ProductBox per instance)

They are frozen dataclasses of plain values, pickled by Ray between processes; ``public()`` gives the
JSON an HTTP client sees (the wire format of the API, kept stable when internals change).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, ClassVar, Literal

from deskgen.generator.params import GenerationParams
from deskgen.limits import DEFAULT_SIZE_LIMITS, SizeLimits
from deskgen.prompts.captions import Keyword


@dataclass(frozen=True)
class GateVerdict:
    """The desk gate's answer for one photo."""

    score: float
    is_desk: bool
    threshold: float
    #: Photos in the batch this one was scored in, and that batch's seconds (for metrics).
    batch_size: int
    seconds: float

    def public(self) -> dict[str, Any]:
        return {"score": self.score, "is_desk": self.is_desk, "threshold": self.threshold}


@dataclass(frozen=True)
class CaptionResult:
    """The captioner's answer for one photo: captions, ranked objects and the SDXL prompt pair."""

    #: ``{"unconditional": ..., "<prefix>": ...}`` (:meth:`deskgen.captioner.CaptionSet.as_dict`).
    captions: dict[str, Any]
    keywords: tuple[Keyword, ...]
    prompt: str
    negative_prompt: str
    seconds: float

    def keyword_dicts(self) -> list[dict[str, Any]]:
        return [{"name": k.name, "count": k.count} for k in self.keywords]

    def public(self) -> dict[str, Any]:
        return {
            "captions": self.captions,
            "keywords": self.keyword_dicts(),
            "prompt": self.prompt,
            "negative_prompt": self.negative_prompt,
            "seconds": self.seconds,
        }


@dataclass(frozen=True)
class GenerationRequest:
    """What the ingress asks a Generator replica for. ``limits`` are the ingress's live limits (its
    ``user_config``): the generator checks the request against them, so a limit raised with ``serve
    deploy`` holds everywhere at once."""

    params: GenerationParams
    limits: SizeLimits = DEFAULT_SIZE_LIMITS
    #: The mix's metrics label, decided by the ingress, which knows the named mixes: the mix's name,
    #: ``base``, or ``adhoc`` (see deployments/metrics.py on label cardinality).
    mix_label: str = "adhoc"


@dataclass(frozen=True)
class GenerationStarted:
    """The replica has the mix active and starts denoising."""

    event: ClassVar[str] = "started"
    mix_id: str
    replica: str
    queued_s: float

    def public(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class GenerationStep:
    """One denoising step done (``step`` counts from 1 to ``total``)."""

    event: ClassVar[str] = "step"
    step: int
    total: int

    def public(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class GeneratedImage:
    """The final image: PNG bytes (its recipe inside, without timings, so the same request gives the same
    bytes), the params it was drawn with, and the metadata (recipe + timings + replica)."""

    event: ClassVar[str] = "done"
    png: bytes
    params: GenerationParams
    metadata: dict[str, Any]
    replica: str


GenerationEvent = GenerationStarted | GenerationStep | GeneratedImage


@dataclass(frozen=True)
class ProductBox:
    """One instance of a product in an image: ``(x0, y0, x1, y1)`` in pixels and normalised to [0, 1]."""

    box: tuple[float, float, float, float]
    box_normalized: tuple[float, float, float, float]
    score: float


@dataclass(frozen=True)
class LocatedProduct:
    """A product asked for: its instances, best first; ``found`` is False when none passed the threshold."""

    product: str
    found: bool
    instances: tuple[ProductBox, ...] = ()


#: ``ok``: the locator answered; ``off``: not asked (turned off, or no products to look for); ``failed`` /
#: ``timeout``: it did not answer in time or raised (the image is delivered anyway; ``reason`` says why).
LocateStatus = Literal["ok", "off", "failed", "timeout"]
#: Where the product list came from: the request, the captioner's ranked objects, or the prompt's objects.
ProductSource = Literal["request", "captions", "prompt"]


@dataclass(frozen=True)
class Located:
    """Where the products are in one image (the ``products`` field of an answer)."""

    status: LocateStatus
    items: tuple[LocatedProduct, ...] = ()
    reason: str | None = None
    threshold: float | None = None
    width: int | None = None
    height: int | None = None
    source: ProductSource | None = None

    @property
    def found_fraction(self) -> float | None:
        """Share of the products asked for that were found; None unless the locator answered with any."""
        if self.status != "ok" or not self.items:
            return None
        return sum(item.found for item in self.items) / len(self.items)

    def public(self) -> dict[str, Any]:
        return asdict(self) | {"found_fraction": self.found_fraction}
