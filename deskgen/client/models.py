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
class GenerationResult:
    """A generated image and its recipe: what ``/v1/generate`` and ``/v1/text2img`` answer as JSON, or as
    the ``done`` event of their stream.

    ``request_id`` is the image id that :meth:`Deskgen.feedback` names. ``timings`` are the request's
    stages in seconds (``classify_s``, ``caption_s``, ``generate_s``, ``total_s``); the generator's own
    (``denoise_s``, ``decode_s``, ...) are in ``metadata["timings"]``. ``desk_score``, ``captions``,
    ``keywords`` and ``style`` are set for ``generate`` (from a photo) only."""

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
    #: The server's JSON without ``image_b64``.
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

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> GenerationResult:
        raw = {k: v for k, v in data.items() if k != "image_b64"}
        desk_score = data.get("desk_score")
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
class Done:
    """The image: the last event of a stream that succeeded."""

    result: GenerationResult


@dataclass(frozen=True)
class OtherEvent:
    """An event this client does not know (a newer server); passed on, not dropped."""

    event: str
    data: Any


ProgressEvent = Classified | Captioned | Started | Step | Done | OtherEvent


# -- the other routes --------------------------------------------------------------------------------


@dataclass(frozen=True)
class NamedMix:
    id: str
    weights: dict[str, float]


@dataclass(frozen=True)
class Mixes:
    """``GET /v1/mixes``: the adapters, the named mixes with their canonical ids, the default mix and
    the live A/B split (shares normalised to 1)."""

    adapters: tuple[str, ...]
    named: dict[str, NamedMix]
    default_mix: str
    ab_split: dict[str, float]
    ab_salt: str

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
class Readiness:
    """``GET /readyz``: ready when every model stage answers; ``stages`` says which does not."""

    ready: bool
    stages: dict[str, str]
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Readiness:
        return cls(ready=bool(data["ready"]), stages=dict(data.get("stages") or {}), raw=dict(data))
