"""Concept presets on the real app: the listing with today's pick, a named concept and ``auto`` woven into
the prompt and recorded in the metadata, its negative additions, and the 404 that lists the names."""

from __future__ import annotations

import base64
import datetime as dt
from typing import Any

import httpx
import pytest

from deskgen.concepts import DEFAULT_CONCEPTS, ConceptConfig
from deskgen.pngmeta import read_png_metadata

from .helpers import assert_error, generate, text2img

pytestmark = pytest.mark.serve


def todays_picks() -> set[str | None]:
    """Today's concept by the default schedule, just before and after now (a test may straddle midnight)."""
    config = ConceptConfig()
    now = dt.datetime.now(dt.UTC)
    return {config.today(now - dt.timedelta(minutes=5)), config.today(now + dt.timedelta(minutes=5))}


def test_concepts_lists_the_catalogue_and_todays_pick(client: httpx.Client) -> None:
    listing = client.get("/v1/concepts").json()
    assert set(listing["concepts"]) == set(DEFAULT_CONCEPTS)
    assert listing["timezone"] == "UTC" and listing["today"] in todays_picks()
    assert listing["schedule"]["friday"] == "gaming-rgb"


def test_a_named_concept_is_woven_into_the_prompt_and_recorded(client: httpx.Client) -> None:
    answer = text2img(client, "application/json", concept="gaming-rgb", seed=7).json()
    preset = DEFAULT_CONCEPTS["gaming-rgb"]
    assert answer["prompt"] == f"a tidy desk setup, {preset['prompt']}"
    assert answer["negative_prompt"].endswith(f", {preset['negative']}")
    assert answer["concept"] == "gaming-rgb" and answer["metadata"]["concept"] == "gaming-rgb"
    png = base64.b64decode(answer["image_b64"])
    assert read_png_metadata(png)["concept"] == "gaming-rgb"
    # An explicit empty negative prompt stays empty: the concept adds to the default, not to "none".
    plain = text2img(client, "application/json", concept="gaming-rgb", negative_prompt="").json()
    assert plain["negative_prompt"] == ""


def test_auto_is_todays_concept_and_photos_get_it_too(client: httpx.Client, desk_photo: bytes) -> None:
    answer = text2img(client, "application/json", concept="auto").json()
    assert answer["concept"] in todays_picks()
    made: dict[str, Any] = generate(client, desk_photo, "application/json", concept="cozy-wood", style="retro").json()
    assert made["concept"] == "cozy-wood" and made["style"] == "retro"
    assert "warm wooden desk" in made["prompt"] and "retro" in made["prompt"]


def test_unknown_and_malformed_concepts(client: httpx.Client) -> None:
    error = assert_error(text2img(client, concept="vaporwave"), 404, "unknown_concept", "concept", "vaporwave")
    assert error["concepts"] == sorted(DEFAULT_CONCEPTS)
    assert_error(text2img(client, concept="Gaming RGB"), 400, "invalid_parameter", "concept", "a-z 0-9")
