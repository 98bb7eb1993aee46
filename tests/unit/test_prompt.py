from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from deskgen.errors import InvalidParameter
from deskgen.prompts.build import (
    CLIP_MAX_TOKENS,
    DEFAULT_NEGATIVE_PROMPT,
    QUALITY_SUFFIX,
    Prompt,
    build_prompt,
    clip_token_counter,
)
from deskgen.prompts.captions import Keyword, rank_keywords
from deskgen.prompts.style import validate_style
from deskgen_client.rules import _INVISIBLE, STYLE_PATTERN, _invisible_class

pytestmark = pytest.mark.unit


# ---------------------------------------------------------------- rank_keywords


def test_counts_captions_not_occurrences() -> None:
    ranked = rank_keywords(["monitor monitor monitor", "a lamp", "a lamp on a desk"])
    assert ranked == [Keyword("lamp", 2), Keyword("monitor", 1)]


def test_synonyms_and_plurals_merge_into_one_canonical_name() -> None:
    captions = [
        "two monitors",
        "a computer screen",
        "a large display",
        "screens and a mug",
        "a cup of coffee",
    ]
    ranked = rank_keywords(captions)
    assert ranked == [Keyword("monitor", 4), Keyword("mug", 2)]


def test_multi_word_terms_win_over_their_words() -> None:
    # "desk lamp" is one lamp; "computer mouse" is a mouse and not also a computer.
    assert rank_keywords(["a desk lamp", "a computer mouse"]) == [Keyword("lamp", 1), Keyword("mouse", 1)]
    assert rank_keywords(["a computer monitor"]) == [Keyword("monitor", 1)]


def test_order_is_count_descending_then_first_appearance() -> None:
    captions = [
        "a keyboard and a plant",  # keyboard first seen before plant
        "a plant next to a mouse",
        "a keyboard, a mouse",
        "headphones",
    ]
    ranked = rank_keywords(captions)
    assert [k.name for k in ranked] == ["keyboard", "plant", "mouse", "headphones"]
    assert [k.count for k in ranked] == [2, 2, 2, 1]


def test_non_objects_and_partial_words_are_ignored() -> None:
    assert rank_keywords(["a desk in a bright room with a view", "an empty office"]) == []
    # Word boundaries: "lampshade", "monitoring" and "screensaver" are not lamps/monitors.
    assert rank_keywords(["a lampshade", "monitoring", "a screensaver"]) == []


def test_matching_is_case_insensitive_and_tolerates_spacing() -> None:
    assert rank_keywords(["A MONITOR", "Desk   Lamp", "KEYBOARD."]) == [
        Keyword("monitor", 1),
        Keyword("lamp", 1),
        Keyword("keyboard", 1),
    ]


def test_custom_vocabulary_replaces_the_builtin_one() -> None:
    vocabulary = {"cat": "cat", "cats": "cat", "monitor": "screen"}
    assert rank_keywords(["two cats on a monitor", "a cat"], vocabulary) == [
        Keyword("cat", 2),
        Keyword("screen", 1),
    ]


def test_no_captions_no_keywords() -> None:
    assert rank_keywords([]) == []
    assert rank_keywords(["", "   "]) == []


# ---------------------------------------------------------------- build_prompt


def test_keywords_named_by_more_captions_come_first() -> None:
    keywords = [Keyword("lamp", 1), Keyword("monitor", 3), Keyword("keyboard", 2), Keyword("plant", 1)]
    result = build_prompt(["a monitor and a keyboard"], keywords)
    assert result.prompt.startswith("a desk setup with monitor, keyboard, lamp, plant, ")
    assert result.prompt.endswith("high quality, detailed, professional photo")


def test_prompt_from_ranked_captions() -> None:
    captions = [
        "a desk with a computer monitor and a keyboard",
        "a monitor, a lamp and a plant in a bright room",
        "monitor and lamp",
    ]
    result = build_prompt(captions, rank_keywords(captions), "watercolor")
    assert result == Prompt(
        prompt=(
            "a desk setup with monitor, lamp, keyboard, plant, watercolor style, "
            "bright room, high quality, detailed, professional photo"
        ),
        negative_prompt=DEFAULT_NEGATIVE_PROMPT,
    )


def test_style_is_included_and_style_is_not_doubled() -> None:
    keywords = [Keyword("monitor", 1)]
    assert ", isometric 3d render style, " in build_prompt([], keywords, "isometric 3d render").prompt
    assert ", pixel art style, " in build_prompt([], keywords, "  pixel art style ").prompt
    assert " style" not in build_prompt([], keywords).prompt


def test_max_keywords_and_no_keywords() -> None:
    keywords = [Keyword(name, 1) for name in ("monitor", "lamp", "mouse", "plant")]
    assert build_prompt([], keywords, max_keywords=2).prompt.startswith(
        "a desk setup with monitor, lamp, high"
    )
    assert build_prompt([], []).prompt == "a desk setup, high quality, detailed, professional photo"
    assert build_prompt([], keywords, max_keywords=0).prompt.startswith("a desk setup, high quality")


def test_a_looping_caption_names_each_object_once() -> None:
    captions = ["a laptop a laptop a laptop a laptop and a mug, and a mug, and a mug"]
    result = build_prompt(captions, rank_keywords(captions))
    assert result.prompt == "a desk setup with laptop, mug, high quality, detailed, professional photo"


@pytest.fixture(scope="module")
def clip_tokens(tiny_models: Path) -> Callable[[str], int]:
    """The exact token count of the tiny SDXL's CLIP tokenizer (its BPE knows few merges, so it splits
    rare words into many pieces: a stricter count than real CLIP's)."""
    from transformers import CLIPTokenizer

    return clip_token_counter(CLIPTokenizer.from_pretrained(tiny_models / "sdxl" / "tokenizer"))


def test_prompt_stays_under_the_real_clip_budget_with_long_inputs(clip_tokens: Callable[[str], int]) -> None:
    names = ["monitor", "keyboard", "mouse", "lamp", "plant", "mouse pad", "led lights", "picture frame", "mug"]
    keywords = [Keyword(name, 10 - i) for i, name in enumerate(names)]
    captions = [
        "a white desk with a black keyboard, a silver monitor and a green plant in a bright sunny room "
        "next to a large window with a wooden floor and white walls " + "many small things " * 10
    ]
    style = "impressionist oil painting, warm golden hour light"
    plain = build_prompt(captions, keywords, style, max_keywords=20)
    # The word estimate accepts what the real tokenizer counts as far more than 77 tokens: the estimate
    # alone cannot guard the budget.
    assert clip_tokens(plain.prompt) > CLIP_MAX_TOKENS
    result = build_prompt(
        captions, keywords, style, max_keywords=20, count_tokens=clip_tokens, token_budget=CLIP_MAX_TOKENS
    )
    assert clip_tokens(result.prompt) <= CLIP_MAX_TOKENS
    # The objects and the style survive the budget; scene phrases, colours, then tail objects give way.
    assert result.prompt.startswith("a desk setup with monitor, keyboard, mouse, ")
    assert style in result.prompt and "white desk" not in result.prompt and "black keyboard" not in result.prompt
    assert result.prompt.endswith(QUALITY_SUFFIX)


def test_the_budget_drops_scene_first_then_colours(clip_tokens: Callable[[str], int]) -> None:
    captions = ["a black keyboard and a white mouse on a white desk in a dark room"]
    keywords = rank_keywords(captions)
    full = build_prompt(captions, keywords, count_tokens=clip_tokens, token_budget=1000).prompt
    assert full == (
        "a desk setup with black keyboard, white mouse, white desk, dark room, "
        "high quality, detailed, professional photo"
    )
    budget = clip_tokens(full) - 1
    assert ", dark room" not in build_prompt(captions, keywords, count_tokens=clip_tokens, token_budget=budget).prompt
    no_scene = build_prompt(captions, keywords, count_tokens=clip_tokens, token_budget=0).prompt
    assert no_scene == "a desk setup with keyboard, mouse, high quality, detailed, professional photo"


def test_default_and_custom_negative_prompt() -> None:
    assert build_prompt([], []).negative_prompt == DEFAULT_NEGATIVE_PROMPT
    assert "watermark" in DEFAULT_NEGATIVE_PROMPT
    assert build_prompt([], [], negative_prompt="blurry").negative_prompt == "blurry"


def test_build_prompt_is_deterministic() -> None:
    captions = ["a monitor and a lamp", "a lamp", "a plant and a mug"]
    keywords = rank_keywords(captions)
    assert build_prompt(captions, keywords, "neon") == build_prompt(list(captions), list(keywords), "neon")


@pytest.mark.parametrize(
    ("style", "rule"),
    [
        ("x" * 403, "at most 402 characters"),  # a concept's fragment + a request's style, each <= 200
        ("neon\nglow", "control"),
        ("neon\x00", "control"),
        ("   ", "non-blank"),
        (42, "must be a string"),
    ],
)
def test_bad_style_is_rejected_naming_the_field(style: object, rule: str) -> None:
    with pytest.raises(InvalidParameter) as info:
        build_prompt([], [], style)  # type: ignore[arg-type]
    assert info.value.field == "style"
    assert "`style`" in info.value.message
    assert rule in info.value.message
    assert info.value.to_dict()["code"] == "invalid_parameter"


def test_a_requests_own_style_is_held_to_200_characters() -> None:
    assert validate_style("x" * 200) == "x" * 200
    with pytest.raises(InvalidParameter, match="at most 200 characters"):
        validate_style("x" * 201)


def test_negative_max_keywords_is_rejected() -> None:
    with pytest.raises(InvalidParameter, match="`max_keywords` must be an integer >= 0 but is -1"):
        build_prompt([], [], max_keywords=-1)


def test_the_stored_invisible_class_is_what_unicode_says() -> None:
    """The style pattern's control/format class is stored per Unicode version (computing it costs ~0.3 s
    at import); it must equal the computed one, and the OpenAPI pattern must be built from it."""
    assert _INVISIBLE == _invisible_class()
    assert STYLE_PATTERN == f"^[^{_INVISIBLE}]*[^{_INVISIBLE}\\s][^{_INVISIBLE}]*$"


def test_importing_the_prompt_module_does_not_scan_unicode() -> None:
    """This Python's Unicode version has a stored class, so the import used it (0.03 s) instead of the
    0.3 s scan of every code point."""
    import unicodedata

    from deskgen_client import rules as prompt

    assert prompt._INVISIBLE is prompt._INVISIBLE_BY_UNICODE[unicodedata.unidata_version]
