"""The typed records the ingress sends to the experiment store: an exposure per answered request, a
feedback event per user action, and the experiment they belong to."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from deskgen_client.protocol import MixSource
from deskgen_client.rules import FeedbackEvent

#: How an experiment splits new users between its arms: the configured split, or Thompson sampling.
AllocationKind = Literal["fixed", "thompson"]
ALLOCATIONS: tuple[str, ...] = ("fixed", "thompson")


def now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class Policy:
    """How an experiment decides and allocates (the Ingress ``user_config`` ``ab_policy``, validated there).

    ``primary_metric`` is the event whose rate decides; ``alpha`` the error rate of the always-valid
    comparisons; ``mde`` the smallest difference of that rate worth acting on (absolute, e.g. 0.03 = 3
    percentage points). ``allocation`` ``thompson`` moves new users towards the arm most likely to be best:
    the split until every arm has ``burn_in_users`` users, then weights recomputed every
    ``update_every_s`` with each arm kept at or above its ``floors`` share."""

    primary_metric: str = "like"
    alpha: float = 0.05
    mde: float = 0.03
    allocation: AllocationKind = "fixed"
    burn_in_users: int = 100
    update_every_s: float = 60.0
    floors: dict[str, float] = field(default_factory=dict)

    def public(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def of(cls, data: dict[str, Any] | None) -> Policy:
        return cls(**data) if data else cls()


@dataclass(frozen=True)
class Experiment:
    """An A/B split with its salt and catalogue of mixes. Its id is a hash of all three: a ``serve deploy``
    that changes any of them starts a new experiment, and the old one stays reportable. Under Thompson
    allocation the split is only the burn-in's weights: the id hashes the arms (not their shares), the salt,
    the mixes and the allocation, so the weights the bandit moves never start a new experiment. The
    ``policy`` (metric, alpha, MDE, cadence, floors) is not part of the id: changing it keeps the experiment."""

    split: dict[str, float]
    salt: str
    mixes: dict[str, dict[str, float]]
    policy: Policy = field(default_factory=Policy)

    @property
    def id(self) -> str:
        if self.policy.allocation == "fixed":
            definition: dict[str, Any] = {"split": self.split, "salt": self.salt, "mixes": self.mixes}
        else:
            definition = {"arms": list(self.split), "salt": self.salt, "mixes": self.mixes,
                          "allocation": self.policy.allocation}  # fmt: skip
        canonical = json.dumps(definition, sort_keys=True)
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
    #: The name of the API key the request came with (None: the API was open).
    api_key: str | None = None

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


@dataclass(frozen=True)
class Sender:
    """Who sent a feedback event: the API key's name (None without one) and whether the API requires keys
    (then only the key that generated an image may rate it)."""

    api_key: str | None = None
    keys_required: bool = False
