"""Real-looking BLIP captions (tests/data/blip_captions.yaml) -> the keywords and the prompt deskgen builds.

The fixture file holds the old system's captions of issue 14 and captions written to look like BLIP's
failure modes: decoder loops, prefix echoes, plurals, colours, "a pair of", brands, "coffee table",
objects outside the vocabulary. Each case pins the whole prompt, so any junk that reaches it fails.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from deskgen.errors import InvalidParameter
from deskgen.prompts.build import build_prompt
from deskgen.prompts.captions import DEFAULT_PREFIXES, Keyword, clean_caption, rank_keywords, unknown_objects
from deskgen.prompts.vocabulary import DEFAULT_VOCABULARY, Vocabulary

pytestmark = pytest.mark.unit

CASES: list[dict[str, Any]] = yaml.safe_load((Path(__file__).parents[1] / "data" / "blip_captions.yaml").read_text())


def _vocabulary(case: dict[str, Any]) -> Vocabulary:
    extension = case.get("vocabulary")
    return DEFAULT_VOCABULARY.extended(**extension) if extension else DEFAULT_VOCABULARY


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_captions_give_the_expected_keywords_and_prompt(case: dict[str, Any]) -> None:
    vocabulary = _vocabulary(case)
    prefixes = tuple(case.get("prefixes", DEFAULT_PREFIXES))
    keywords = rank_keywords(case["captions"], vocabulary, prefixes=prefixes)
    assert keywords == [Keyword(name, count) for name, count in case["keywords"].items()]
    prompt = build_prompt(case["captions"], keywords, case.get("style"), vocabulary=vocabulary, prefixes=prefixes)
    assert prompt.prompt == case["prompt"]
    if "unknown" in case:
        unknown = unknown_objects(case["captions"], vocabulary, prefixes=prefixes)
        assert unknown == [Keyword(name, count) for name, count in case["unknown"].items()]


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_no_prompt_carries_caption_junk(case: dict[str, Any]) -> None:
    """Independent of the exact expectations: no echo, no underscore, no object twice."""
    vocabulary = _vocabulary(case)
    keywords = rank_keywords(case["captions"], vocabulary)
    prompt = build_prompt(case["captions"], keywords, vocabulary=vocabulary).prompt
    assert "_" not in prompt and " : " not in prompt and "q :" not in prompt and "photo of" not in prompt
    objects = prompt.removeprefix("a desk setup with ").split(", ")
    assert len(objects) == len(set(objects)), prompt
    assert len({k.name for k in keywords}) == len(keywords)


@pytest.mark.parametrize(
    ("caption", "clean"),
    [
        ("desk _ setup : _ with a laptop, monitor, keyboard, mouse, and mouse", "with a laptop, monitor, keyboard, mouse"),
        ("q : what objects are on the desk? a : laptop, a keyboard, and a monitor", "laptop, a keyboard, a monitor"),
        ("This is a photo of a desk full of computers", "a desk full of computers"),
        ("a monitor a monitor a monitor and a lamp", "a monitor, a lamp"),
        ("_ : ", ""),
        ("  A  Desk  ", "a desk"),
    ],
)
def test_clean_caption(caption: str, clean: str) -> None:
    assert clean_caption(caption) == clean


def test_a_coffee_table_alone_names_nothing_and_coffee_still_is_a_mug() -> None:
    assert rank_keywords(["a coffee table", "a coffee shop"]) == []
    assert rank_keywords(["a cup of coffee on a coffee table"]) == [Keyword("mug", 1)]


def test_extra_objects_get_their_plural_and_may_override_builtin_forms() -> None:
    vocabulary = DEFAULT_VOCABULARY.extended({"cup": ["teacup"], "globe": []}, ignore=["computer"])
    assert rank_keywords(["two cups", "a teacup", "globes", "a computer and a mug"], vocabulary) == [
        Keyword("cup", 2),
        Keyword("globe", 1),
        Keyword("mug", 1),
    ]
    # The built-in vocabulary is unchanged.
    assert rank_keywords(["two cups", "a computer"]) == [Keyword("mug", 1), Keyword("computer", 1)]


@pytest.mark.parametrize(
    ("extra_objects", "ignore", "message"),
    [
        ({"Globe": []}, [], "`vocabulary.extra_objects['Globe']` must be 1-4 lower-case words"),
        ({"globe": ["world_globe"]}, [], "`vocabulary.extra_objects['globe'][0]` must be 1-4 lower-case words"),
        ({"globe": "globes"}, [], "`vocabulary.extra_objects['globe']` must be a list"),
        ({"globe": ["ball"], "toy": ["ball"]}, [], "'ball' is listed for both 'globe' and 'toy'"),
        ({"globe": []}, ["globe"], "`vocabulary.ignore[0]` 'globe' is also listed under"),
        ({}, ["a" * 41], "`vocabulary.ignore[0]` must be 1-4 lower-case words"),
        ({f"thing{i}": [] for i in range(201)}, [], "at most 200 objects but holds 201"),
    ],
)
def test_bad_vocabulary_extensions_name_the_entry(
    extra_objects: dict[str, Any], ignore: list[str], message: str
) -> None:
    with pytest.raises(InvalidParameter) as info:
        DEFAULT_VOCABULARY.extended(extra_objects, ignore)
    assert info.value.field == "vocabulary"
    assert message in info.value.message
