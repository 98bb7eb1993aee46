"""The typed records the ingress sends to the experiment store: an exposure per answered request, a
feedback event per user action, and the experiment they belong to."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

#: What a user may tell us about an image.
FeedbackEvent = Literal["like", "dislike", "download", "select"]
FEEDBACK_EVENTS: tuple[str, ...] = ("like", "dislike", "download", "select")
#: How the mix of a request was chosen.
MixSource = Literal["request", "header", "concept", "ab", "default"]


def now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class Experiment:
    """An A/B split with its salt and catalogue of mixes. Its id is a hash of all three: a ``serve deploy``
    that changes any of them starts a new experiment, and the old one stays reportable."""

    split: dict[str, float]
    salt: str
    mixes: dict[str, dict[str, float]]

    @property
    def id(self) -> str:
        canonical = json.dumps({"split": self.split, "salt": self.salt, "mixes": self.mixes}, sort_keys=True)
        return "exp-" + hashlib.sha256(canonical.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class Exposure:
    """One answered request: the image id is the request id. ``outcome`` is ``ok`` for a delivered image,
    otherwise the error code the client got (``not_a_desk_setup``, ``overloaded``, ``timeout``, ...)."""

    image_id: str
    experiment_id: str
    user_id: str | None
    arm: str | None
    mix_id: str
    mix_source: MixSource
    outcome: str
    status: int
    style: str | None = None
    seed: int | None = None
    timings: dict[str, float] = field(default_factory=dict)
    created_at: datetime = field(default_factory=now)
    #: The concept preset the image was made with (deskgen.concepts), if any.
    concept: str | None = None
    #: Share of the products asked for that the locator found in the image (None: not located).
    found_fraction: float | None = None

    def row(self) -> dict[str, Any]:
        """The ``exposures`` table row (the table's columns are this record's fields)."""
        return asdict(self)


@dataclass(frozen=True)
class Feedback:
    """A user's action on an image. Idempotent per (image id, event)."""

    image_id: str
    event: FeedbackEvent
    user_id: str | None = None
    value: float | None = None
    created_at: datetime = field(default_factory=now)
