"""Concept presets and the weekly schedule: a named look for a generated desk ("minimal-white",
"gaming-rgb", …) and which one each weekday gets.

A concept is a prompt fragment, negative-prompt additions and optional defaults (mix, steps, guidance).
``concept: auto`` in a request means today's concept by the schedule, where "today" is the weekday in the
schedule's time zone (a desk shop in Berlin changes concept at midnight Berlin time, not UTC). The
ingress's ``user_config`` holds the catalogue and the schedule, so ``serve deploy`` changes them.
"""

from __future__ import annotations

import datetime as dt
import zoneinfo

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from deskgen.errors import DeskgenError
from deskgen.limits import MAX_GUIDANCE, MAX_STYLE_CHARS, MIN_GUIDANCE
from deskgen_client.rules import AUTO, CONCEPT_NAME_PATTERN

WEEKDAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")


class UnknownConcept(DeskgenError):
    """A request names a concept the catalogue does not have (the message lists the names)."""

    code = "unknown_concept"


class Concept(BaseModel):
    """One preset: woven into the prompt (``prompt``), added to the negative prompt (``negative``), and
    the defaults a request that names it gets unless it sets them itself."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(..., min_length=1, max_length=MAX_STYLE_CHARS, description="fragment woven into the prompt")
    negative: str = Field("", max_length=MAX_STYLE_CHARS, description="added to the negative prompt")
    mix: str | None = Field(None, description="default mix (a named mix or adapter:weight+...)")
    steps: int | None = Field(None, ge=1)
    guidance: float | None = Field(None, ge=MIN_GUIDANCE, le=MAX_GUIDANCE)


DEFAULT_CONCEPTS: dict[str, dict[str, object]] = {
    "minimal-white": {"prompt": "minimalist white desk, clean lines, lots of empty space, soft daylight",
                      "negative": "clutter, cables, dark room"},
    "cozy-wood": {"prompt": "warm wooden desk, plants, a knitted blanket, warm lamp light, cozy evening",
                  "negative": "cold light, metal"},
    "gaming-rgb": {"prompt": "gaming desk setup, RGB lighting, dual monitors, mechanical keyboard, neon glow",
                   "negative": "daylight, plain"},
    "productive-monday": {"prompt": "focused work desk, organized notebooks, a coffee mug, morning sunlight",
                          "negative": "mess, toys"},
    "weekend-creative": {"prompt": "creative desk, sketchbooks, paints, a drawing tablet, colourful and playful",
                         "negative": "corporate, dull"},
}  # fmt: skip

DEFAULT_SCHEDULE = {
    "monday": "productive-monday", "tuesday": "minimal-white", "wednesday": "minimal-white",
    "thursday": "cozy-wood", "friday": "gaming-rgb", "saturday": "weekend-creative", "sunday": "cozy-wood",
}  # fmt: skip


class ConceptConfig(BaseModel):
    """The catalogue, the weekday schedule and its time zone (the Ingress ``user_config`` fields)."""

    model_config = ConfigDict(extra="forbid")

    concepts: dict[str, Concept] = Field(default_factory=lambda: {k: Concept.model_validate(v) for k, v in DEFAULT_CONCEPTS.items()})
    schedule: dict[str, str] = Field(default_factory=lambda: dict(DEFAULT_SCHEDULE),
                                     description="weekday (monday..sunday) -> concept; a day not listed has none")
    timezone: str = Field("UTC", description="IANA time zone the schedule's days are in, e.g. Europe/Berlin")

    @field_validator("concepts")
    @classmethod
    def _names(cls, concepts: dict[str, Concept]) -> dict[str, Concept]:
        import re

        for name in concepts:
            if name == AUTO or not re.fullmatch(CONCEPT_NAME_PATTERN, name):
                raise ValueError(f"concept name {name!r}: 1-64 of a-z 0-9 _ - (and not {AUTO!r})")
        return concepts

    @field_validator("timezone")
    @classmethod
    def _zone(cls, name: str) -> str:
        try:
            zoneinfo.ZoneInfo(name)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"{name!r} is not an IANA time zone (e.g. UTC, Europe/Berlin)") from None
        return name

    @model_validator(mode="after")
    def _schedule_names_concepts(self) -> ConceptConfig:
        for day, concept in self.schedule.items():
            if day not in WEEKDAYS:
                raise ValueError(f"schedule: {day!r} is not a weekday ({', '.join(WEEKDAYS)})")
            if concept not in self.concepts:
                raise ValueError(f"schedule.{day}: {concept!r} is not one of the concepts {sorted(self.concepts)}")
        return self

    def weekday(self, now: dt.datetime) -> str:
        """The schedule's weekday at ``now`` (an aware datetime) in its time zone."""
        if now.tzinfo is None:
            raise ValueError("`now` must be timezone-aware")
        return WEEKDAYS[now.astimezone(zoneinfo.ZoneInfo(self.timezone)).weekday()]

    def today(self, now: dt.datetime) -> str | None:
        return self.schedule.get(self.weekday(now))

    def resolve(self, name: str, now: dt.datetime, *, field: str = "concept") -> tuple[str, Concept] | None:
        """``(name, concept)`` for a request's ``concept``; ``auto`` is today's (None when the schedule has
        none today). Raises :class:`UnknownConcept` naming the known ones."""
        if name == AUTO:
            today = self.today(now)
            return None if today is None else (today, self.concepts[today])
        concept = self.concepts.get(name)
        if concept is None:
            raise UnknownConcept(
                f"`{field}`: unknown concept {name!r}; concepts are {sorted(self.concepts)} (or {AUTO!r} for today's).",
                field=field, concepts=sorted(self.concepts),
            )  # fmt: skip
        return name, concept

    def listing(self, now: dt.datetime) -> dict[str, object]:
        """What ``GET /v1/concepts`` answers."""
        return {
            "concepts": {name: c.model_dump(exclude_none=True) for name, c in self.concepts.items()},
            "schedule": dict(self.schedule),
            "timezone": self.timezone,
            "weekday": self.weekday(now),
            "today": self.today(now),
        }


def woven_style(fragment: str, style: str | None) -> str:
    """The text the prompt builder weaves in for a photo: the concept's fragment, then the request's style
    (each at most MAX_STYLE_CHARS, so together within MAX_WOVEN_STYLE_CHARS)."""
    return fragment if not style else f"{fragment}, {style}"


def woven_prompt(prompt: str, fragment: str) -> str:
    """A text-to-image prompt with the concept's fragment after the user's words (CLIP weighs early tokens
    most: the user's intent comes first)."""
    return f"{prompt.rstrip().rstrip(',')}, {fragment}"


def with_negative(negative_prompt: str, addition: str) -> str:
    """The negative prompt with a concept's additions (nothing added twice)."""
    if not addition or addition in negative_prompt:
        return negative_prompt
    return f"{negative_prompt}, {addition}" if negative_prompt else addition
