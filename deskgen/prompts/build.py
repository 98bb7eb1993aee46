"""Writing the SDXL prompt: the objects of the ranked keywords (with their colours), the style, scene
phrases and the quality suffix, within a CLIP token budget; and the default negative prompt.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass

from deskgen.errors import InvalidParameter
from deskgen.limits import MAX_WOVEN_STYLE_CHARS
from deskgen.prompts.captions import DEFAULT_PREFIXES, Keyword, _facts, clean_caption
from deskgen.prompts.style import validate_style
from deskgen.prompts.vocabulary import Vocabulary, _vocabulary

#: What SDXL should avoid; the generator's default when a request gives none.
DEFAULT_NEGATIVE_PROMPT = (
    "blurry, low quality, noisy, distorted, deformed, bad proportions, text, watermark, messy, "
    "cluttered background, cartoon, anime, painting, sketch"
)

#: Default budget of the prompt in approximate CLIP tokens (:func:`approx_clip_tokens`: words +
#: punctuation marks). CLIP reads 77 tokens including its start/end tokens, and BPE splits rare words
#: into several pieces, so the estimate stays well below: ~60 counted tokens leaves room for ~15 extra
#: sub-word pieces. With a real tokenizer (``count_tokens=clip_token_counter(tokenizer)``) the budget
#: is :data:`CLIP_MAX_TOKENS`.
PROMPT_TOKEN_BUDGET = 60
#: CLIP's context: 75 tokens of text plus its start and end tokens.
CLIP_MAX_TOKENS = 77

#: Scene phrases ("white desk", "dark room") taken from the captions, at most.
MAX_SCENE_PHRASES = 3
#: The budget never drops keywords below this many (it drops scene phrases and colours first).
MIN_BUDGET_KEYWORDS = 3

PROMPT_LEAD = "a desk setup"
QUALITY_SUFFIX = "high quality, detailed, professional photo"


@dataclass(frozen=True)
class Prompt:
    """What the generator receives: the positive and the negative SDXL prompt."""

    prompt: str
    negative_prompt: str

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


# ------------------------------------------------------------------------------------------ tokens


def approx_clip_tokens(text: str) -> int:
    """Words plus punctuation marks: a lower bound of CLIP's BPE count for plain English prompts."""
    return len(re.findall(r"\w+|[^\w\s]", text))


def clip_token_counter(tokenizer: object) -> Callable[[str], int]:
    """``text -> number of CLIP tokens`` (start and end tokens included, nothing truncated) with a
    ``transformers`` CLIP tokenizer: the exact count, for :func:`build_prompt`'s ``count_tokens``."""

    def count(text: str) -> int:
        return len(tokenizer(text, truncation=False)["input_ids"])  # type: ignore[operator]

    return count


# ------------------------------------------------------------------------------------------ prompt


def _assemble(objects: Sequence[str], style: str | None, scene: Sequence[str]) -> str:
    lead = f"{PROMPT_LEAD} with {', '.join(objects)}" if objects else PROMPT_LEAD
    parts = [lead]
    if style is not None:
        # "watercolor" -> "watercolor style"; "watercolor style" stays as it is.
        parts.append(style if style.lower().endswith("style") else f"{style} style")
    parts.extend(scene)
    parts.append(QUALITY_SUFFIX)
    return ", ".join(parts)


def build_prompt(
    captions: Sequence[str],
    keywords: Sequence[Keyword],
    style: str | None = None,
    *,
    max_keywords: int = 8,
    negative_prompt: str = DEFAULT_NEGATIVE_PROMPT,
    vocabulary: Vocabulary | Mapping[str, str] | None = None,
    prefixes: Sequence[str] = DEFAULT_PREFIXES,
    count_tokens: Callable[[str], int] = approx_clip_tokens,
    token_budget: int = PROMPT_TOKEN_BUDGET,
) -> Prompt:
    """Write a compact SDXL prompt from the captions and their ranked keywords.

    Shape: ``"a desk setup with black keyboard, monitor, lamp, <style> style, white desk, dark room, high
    quality, detailed, professional photo"``.

    Choices:
      * Objects come first because CLIP weighs early tokens most and truncates the tail. They are the
        keywords re-sorted by count (stable, so ties keep the given order), cut to ``max_keywords``: each
        object once, by its canonical name, never caption text, so echoes and loops cannot reach the
        prompt. A colour or material the captions put right before the object stays with it ("black
        keyboard"; the most frequent one when captions disagree).
      * The style (optional; see :func:`validate_style`) follows the objects: it is the user's intent and
        is never altered, apart from appending "style" when the text does not already end with it.
      * Then up to :data:`MAX_SCENE_PHRASES` scene phrases from the captions, in caption order: a scene
        noun with its modifiers ("white desk", "dark room", "natural light"). Captions are cleaned first
        (:func:`clean_caption` with ``prefixes``).
      * Budget: at most ``token_budget`` tokens as ``count_tokens`` counts them (default: the
        :func:`approx_clip_tokens` estimate against :data:`PROMPT_TOKEN_BUDGET`; pass
        :func:`clip_token_counter` and :data:`CLIP_MAX_TOKENS` for the exact count). Over budget, scene
        phrases go first, then the colours, then keywords from the tail (down to
        :data:`MIN_BUDGET_KEYWORDS`). A style near its 200-character limit can still exceed it; the
        generator embeds long prompts in chunks, so nothing is lost, but the objects stay first.

    Raises :class:`InvalidParameter` for a bad ``style`` (field ``style``) or a negative ``max_keywords``.
    """
    # The style may carry a concept preset's fragment before the request's own style (each bounded alone).
    checked_style = validate_style(style, MAX_WOVEN_STYLE_CHARS)
    if isinstance(max_keywords, bool) or not isinstance(max_keywords, int) or max_keywords < 0:
        raise InvalidParameter(
            f"`max_keywords` must be an integer >= 0 but is {max_keywords!r}.", field="max_keywords"
        )
    vocab = _vocabulary(vocabulary)
    ranked = sorted((k for k in keywords if k.name.strip()), key=lambda k: -k.count)
    names = list(dict.fromkeys(" ".join(k.name.split()) for k in ranked))[:max_keywords]

    # Colours (most frequent per object, ties by caption order) and scene phrases, from clean captions.
    colour_votes: dict[str, Counter[str]] = {}
    scene: list[str] = []
    for caption in captions:
        facts = _facts(clean_caption(caption, prefixes), vocab)
        for name, colour in facts.colours.items():
            colour_votes.setdefault(name, Counter())[colour] += 1
        scene.extend(phrase for phrase in facts.scene if phrase not in scene)
    scene = scene[:MAX_SCENE_PHRASES]
    colours = {name: votes.most_common(1)[0][0] for name, votes in colour_votes.items()}

    def objects(with_colour: bool) -> list[str]:
        return [f"{colours[n]} {n}" if with_colour and n in colours else n for n in names]

    with_colour = True
    text = _assemble(objects(with_colour), checked_style, scene)
    while count_tokens(text) > token_budget:
        if scene:
            scene = scene[:-1]
        elif with_colour and colours.keys() & set(names):
            with_colour = False
        elif len(names) > MIN_BUDGET_KEYWORDS:
            names = names[:-1]
        else:
            break
        text = _assemble(objects(with_colour), checked_style, scene)
    return Prompt(prompt=text, negative_prompt=negative_prompt)
