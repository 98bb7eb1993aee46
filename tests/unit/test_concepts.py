"""Concept presets and the weekday schedule: resolution of a name and of ``auto`` across time zones and the
midnight boundary, the 404 that lists the names, and the config's validation."""

from __future__ import annotations

import datetime as dt

import pytest
from pydantic import ValidationError

from deployments.http_errors import status_of
from deskgen.concepts import (
    DEFAULT_CONCEPTS,
    DEFAULT_SCHEDULE,
    WEEKDAYS,
    ConceptConfig,
    UnknownConcept,
    with_negative,
    woven_prompt,
    woven_style,
)

pytestmark = pytest.mark.unit

UTC = dt.UTC


def at(*args: int) -> dt.datetime:
    return dt.datetime(*args, tzinfo=UTC)


def test_defaults_ship_a_catalogue_and_a_full_week() -> None:
    config = ConceptConfig()
    assert set(config.concepts) == set(DEFAULT_CONCEPTS) and len(config.concepts) >= 5
    assert set(config.schedule) == set(WEEKDAYS) and config.schedule == DEFAULT_SCHEDULE
    # 2026-11-30 is a Monday.
    assert config.weekday(at(2026, 11, 30, 9)) == "monday"
    assert config.resolve("auto", at(2026, 11, 30, 9))[0] == "productive-monday"  # type: ignore[index]


def test_auto_follows_the_schedules_time_zone_across_midnight() -> None:
    berlin = ConceptConfig(timezone="Europe/Berlin")
    tokyo = ConceptConfig(timezone="Asia/Tokyo")
    la = ConceptConfig(timezone="America/Los_Angeles")
    sunday_late_utc = at(2026, 11, 29, 23, 30)  # Sunday 23:30 UTC
    assert ConceptConfig().weekday(sunday_late_utc) == "sunday"
    assert berlin.weekday(sunday_late_utc) == "monday"  # 00:30 Monday in Berlin (UTC+1 in winter)
    assert tokyo.weekday(at(2026, 11, 29, 14, 59)) == "sunday"  # 23:59 in Tokyo
    assert tokyo.weekday(at(2026, 11, 29, 15, 0)) == "monday"  # 00:00 in Tokyo: the boundary itself
    assert la.weekday(at(2026, 11, 30, 7, 59)) == "sunday"  # 23:59 Sunday in Los Angeles (UTC-8)
    assert la.resolve("auto", at(2026, 11, 30, 8, 0))[0] == "productive-monday"  # type: ignore[index]
    # Summer time moves the boundary with the clock: Berlin is UTC+2 in July.
    assert berlin.weekday(at(2026, 7, 5, 21, 59)) == "sunday" and berlin.weekday(at(2026, 7, 5, 22, 0)) == "monday"
    with pytest.raises(ValueError, match="aware"):
        berlin.weekday(dt.datetime(2026, 11, 30, 9))


def test_a_day_without_a_concept_and_an_unknown_name() -> None:
    config = ConceptConfig(schedule={"monday": "gaming-rgb"})
    assert config.resolve("auto", at(2026, 12, 1, 12)) is None  # a Tuesday: nothing scheduled
    name, concept = config.resolve("cozy-wood", at(2026, 12, 1, 12))  # type: ignore[misc]
    assert name == "cozy-wood" and "wood" in concept.prompt
    with pytest.raises(UnknownConcept) as raised:
        config.resolve("vaporwave", at(2026, 12, 1, 12))
    error = raised.value
    assert status_of(error) == 404 and error.field == "concept" and "vaporwave" in error.message
    assert error.to_dict()["concepts"] == sorted(DEFAULT_CONCEPTS)


@pytest.mark.parametrize(
    ("config", "fragment"),
    [
        ({"timezone": "Mars/Olympus"}, "not an IANA time zone"),
        ({"schedule": {"funday": "cozy-wood"}}, "not a weekday"),
        ({"schedule": {"monday": "nope"}}, "not one of the concepts"),
        ({"concepts": {"Bad Name": {"prompt": "x"}}}, "a-z 0-9"),
        ({"concepts": {"auto": {"prompt": "x"}}, "schedule": {}}, "not 'auto'"),
        ({"concepts": {"x": {"prompt": ""}}, "schedule": {}}, "at least 1 character"),
    ],
)
def test_bad_configs_are_refused_naming_the_rule(config: dict[str, object], fragment: str) -> None:
    with pytest.raises(ValidationError, match=fragment):
        ConceptConfig.model_validate(config)


def test_weaving_and_negative_additions() -> None:
    assert woven_style("gaming desk", None) == "gaming desk"
    assert woven_style("gaming desk", "retro") == "gaming desk, retro"
    assert len(woven_style("x" * 200, "y" * 200)) == 402  # the builder's bound for a woven style
    assert woven_prompt("a tidy desk, ", "neon glow") == "a tidy desk, neon glow"
    assert with_negative("blurry", "daylight") == "blurry, daylight"
    assert with_negative("blurry, daylight", "daylight") == "blurry, daylight"
    assert with_negative("", "daylight") == "daylight" and with_negative("blurry", "") == "blurry"


def test_listing_shows_todays_pick() -> None:
    listing = ConceptConfig(timezone="Europe/Berlin").listing(at(2026, 11, 29, 23, 30))
    assert listing["weekday"] == "monday" and listing["today"] == "productive-monday"
    assert listing["timezone"] == "Europe/Berlin" and set(listing["concepts"]) == set(DEFAULT_CONCEPTS)  # type: ignore[arg-type]
