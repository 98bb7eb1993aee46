"""The typed values that travel between the deployments (the way diffusers returns
``StableDiffusionXLPipelineOutput``): a renamed field fails mypy, not a request three files away.

    Ingress --image-->            Classifier  --> GateVerdict
    Ingress --image, style-->     Captioner   --> CaptionResult
    Ingress --GenerationRequest--> Generator  --> Started, Step..., GeneratedImage
    Ingress --image, products-->  Locator     --> ProductLocation (LocatedProduct per product, ProductBox per instance)

They are frozen values, pickled by Ray between processes. What a client sees as it is (the progress events,
where the products are) is the protocol's own model (:mod:`deskgen_client.protocol`), so it has one name
on both sides; the rest are dataclasses whose ``public()`` gives the JSON an HTTP client sees.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from deskgen.generator.params import GenerationParams
from deskgen.limits import DEFAULT_SIZE_LIMITS, SizeLimits
from deskgen.prompts.captions import Keyword
from deskgen_client.protocol import (
    Caption,
    Classification,
    LocatedProduct,
    ProductBox,
    ProductLocation,
    Started,
    Step,
)

__all__ = [
    "CaptionResult",
    "GateVerdict",
    "GeneratedImage",
    "GenerationEvent",
    "GenerationRequest",
    "LocatedProduct",
    "ProductBox",
    "ProductLocation",
    "Started",
    "Step",
]


@dataclass(frozen=True)
class GateVerdict:
    """The desk gate's answer for one photo."""

    score: float
    is_desk: bool
    threshold: float
    #: Photos in the batch this one was scored in, and that batch's seconds (for metrics).
    batch_size: int
    seconds: float

    def public(self) -> Classification:
        return Classification(score=self.score, is_desk=self.is_desk, threshold=self.threshold)


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

    def public(self) -> Caption:
        return Caption(captions=self.captions, keywords=self.keyword_dicts(), prompt=self.prompt,
                       negative_prompt=self.negative_prompt, seconds=self.seconds)  # fmt: skip


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
class GeneratedImage:
    """The final image: PNG bytes (its recipe inside, without timings, so the same request gives the same
    bytes), the params it was drawn with, and the metadata (recipe + timings + replica)."""

    event: ClassVar[str] = "done"
    png: bytes
    params: GenerationParams
    metadata: dict[str, Any]
    replica: str


GenerationEvent = Started | Step | GeneratedImage
