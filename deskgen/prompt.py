"""From BLIP captions to an SDXL prompt: rank the desk objects the captions name, then write a short prompt.

Pure Python (no model imports), deterministic: the same captions, keywords and style always give the
same prompt, so a generated image can be reproduced from its PNG metadata.

Pipeline position::

    CaptionSet.texts()  --rank_keywords-->  [Keyword("monitor", 4), Keyword("lamp", 2), ...]
                        --build_prompt--->  Prompt(prompt="a desk setup with monitor, lamp, ...", negative_prompt=...)
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache

from deskgen.errors import InvalidParameter
from deskgen.limits import MAX_STYLE_CHARS, MAX_WOVEN_STYLE_CHARS

#: What SDXL should avoid; the generator's default when a request gives none.
DEFAULT_NEGATIVE_PROMPT = (
    "blurry, low quality, noisy, distorted, deformed, bad proportions, text, watermark, messy, "
    "cluttered background, cartoon, anime, painting, sketch"
)

#: BLIP conditional-caption prefixes: each steers the decoder towards a different view of the photo
#: (a plain description, a list of objects, a "setup" tag line). The captioner strips them from its output.
DEFAULT_PREFIXES: tuple[str, ...] = (
    "This is a photo of",
    "Q: What objects are on the desk? A:",
    "desk_setup:",
)


#: Budget of the prompt in approximate CLIP tokens (words + punctuation marks). CLIP truncates at 77
#: tokens including its start/end tokens, and BPE splits rare words into several pieces, so we stay
#: well below: ~60 counted tokens leaves room for ~15 extra sub-word pieces.
PROMPT_TOKEN_BUDGET = 60

#: Words of the scene summary taken from the best caption before the budget trims further.
MAX_SUMMARY_WORDS = 12
#: The budget trims the summary down to this many words, then drops it altogether.
MIN_SUMMARY_WORDS = 4
#: The budget never drops keywords below this many (it drops the summary first).
MIN_BUDGET_KEYWORDS = 3

PROMPT_LEAD = "a desk setup"
QUALITY_SUFFIX = "high quality, detailed, professional photo"

#: Surface forms (lower case; multi-word terms allowed) -> canonical desk object. "desk" itself is not an
#: object: every caption names it and the prompt already says "a desk setup". Ambiguous caption words
#: ("picture", "light", "painting", "glasses") are left out on purpose: BLIP writes "a picture of ...".
# fmt: off
DESK_VOCABULARY: dict[str, str] = {
    # displays
    "monitor": "monitor", "monitors": "monitor", "screen": "monitor", "screens": "monitor",
    "display": "monitor", "displays": "monitor", "computer monitor": "monitor",
    "computer monitors": "monitor", "computer screen": "monitor", "computer screens": "monitor", "tv": "tv",
    "television": "tv",
    # computers
    "computer": "computer", "computers": "computer", "desktop computer": "computer", "pc": "computer",
    "computer tower": "computer", "pc tower": "computer", "imac": "computer", "laptop": "laptop",
    "laptops": "laptop", "macbook": "laptop", "notebook computer": "laptop", "tablet": "tablet",
    "tablets": "tablet", "ipad": "tablet",
    # input devices
    "keyboard": "keyboard", "keyboards": "keyboard", "computer keyboard": "keyboard",
    "mechanical keyboard": "keyboard", "mouse": "mouse", "mice": "mouse", "computer mouse": "mouse",
    "mouse pad": "mouse pad", "mouse pads": "mouse pad", "mousepad": "mouse pad", "desk mat": "mouse pad",
    "controller": "controller", "controllers": "controller", "game controller": "controller",
    # audio / video
    "speaker": "speaker", "speakers": "speaker", "headphones": "headphones", "headphone": "headphones",
    "headset": "headphones", "headsets": "headphones", "earphones": "headphones", "microphone": "microphone",
    "microphones": "microphone", "mic": "microphone", "mics": "microphone", "webcam": "webcam",
    "webcams": "webcam", "web camera": "webcam", "web cam": "webcam", "camera": "camera", "cameras": "camera",
    "phone": "phone", "phones": "phone", "smartphone": "phone", "cell phone": "phone", "cellphone": "phone",
    "mobile phone": "phone", "iphone": "phone",
    # lighting and decor
    "lamp": "lamp", "lamps": "lamp", "desk lamp": "lamp", "desk lamps": "lamp", "led lights": "led lights",
    "led strip": "led lights", "rgb lights": "led lights", "plant": "plant", "plants": "plant",
    "potted plant": "plant", "potted plants": "plant", "houseplant": "plant", "houseplants": "plant",
    "succulent": "plant", "succulents": "plant", "flowers": "flowers", "flower": "flowers", "vase": "vase",
    "candle": "candle", "candles": "candle", "poster": "poster", "posters": "poster", "wall art": "poster",
    "picture frame": "picture frame", "picture frames": "picture frame", "photo frame": "picture frame",
    "clock": "clock", "clocks": "clock", "figurine": "figurine", "figurines": "figurine",
    # drinks
    "mug": "mug", "mugs": "mug", "cup": "mug", "cups": "mug", "coffee": "mug", "coffee mug": "mug",
    "coffee cup": "mug", "tea": "mug", "bottle": "bottle", "bottles": "bottle", "water bottle": "bottle",
    # paper and stationery
    "notebook": "notebook", "notebooks": "notebook", "notepad": "notebook", "notepads": "notebook",
    "book": "books", "books": "books", "pen": "pen", "pens": "pen", "pencil": "pencil", "pencils": "pencil",
    "paper": "papers", "papers": "papers", "documents": "papers", "sticky notes": "sticky notes",
    "post-it notes": "sticky notes", "calendar": "calendar", "calculator": "calculator", "stapler": "stapler",
    "scissors": "scissors",
    # furniture and room
    "chair": "chair", "chairs": "chair", "office chair": "chair", "gaming chair": "chair", "shelf": "shelf",
    "shelves": "shelf", "bookshelf": "shelf", "bookshelves": "shelf", "drawer": "drawers",
    "drawers": "drawers", "window": "window", "windows": "window", "printer": "printer",
    "printers": "printer", "cable": "cable", "cables": "cable", "wire": "cable", "wires": "cable",
    "cord": "cable", "cords": "cable", "charger": "charger", "router": "router", "organizer": "organizer",
    "desk organizer": "organizer",
}
# fmt: on


@dataclass(frozen=True)
class Keyword:
    """A desk object and the number of captions that name it."""

    name: str
    count: int


@dataclass(frozen=True)
class Prompt:
    """What the generator receives: the positive and the negative SDXL prompt."""

    prompt: str
    negative_prompt: str

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


@lru_cache(maxsize=16)
def _compile(terms: tuple[str, ...]) -> re.Pattern[str]:
    """One alternation, longest terms first, so "desk lamp" wins over "lamp" and "computer monitor" over
    "computer". Whitespace inside a multi-word term matches any run of whitespace."""
    ordered = sorted(terms, key=lambda t: (-len(t), t))
    alternation = "|".join(r"\s+".join(re.escape(part) for part in t.split()) for t in ordered)
    # (?<!\w) / (?!\w) rather than \b: they also behave at terms that end in punctuation ("post-it").
    return re.compile(rf"(?<!\w)(?:{alternation})(?!\w)", re.IGNORECASE)


def rank_keywords(captions: Sequence[str], vocabulary: Mapping[str, str] | None = None) -> list[Keyword]:
    """Rank the desk objects named across ``captions``.

    Contract:
      * ``count`` is the number of captions that name the object, not the number of occurrences: BLIP's
        greedy decoder loops ("a monitor and a monitor and a monitor"), and one looping caption must not
        outvote three captions that each name a lamp once.
      * Surface forms merge into their canonical name through ``vocabulary`` (default
        :data:`DESK_VOCABULARY`): "screens", "display" and "computer monitor" all count for "monitor".
      * Matching is case-insensitive on word boundaries; multi-word terms are tried before single words, so
        "desk lamp" is one lamp and "computer mouse" does not also count a "computer".
      * Order: count descending, ties by first appearance (caption order, then position in the caption),
        which keeps the unconditional caption's reading order. Words outside the vocabulary are ignored.
    """
    vocab = DESK_VOCABULARY if vocabulary is None else vocabulary
    lookup = {" ".join(term.lower().split()): canonical for term, canonical in vocab.items() if term.strip()}
    if not lookup:
        return []
    pattern = _compile(tuple(sorted(lookup)))
    counts: dict[str, int] = {}
    first_seen: dict[str, tuple[int, int]] = {}
    for caption_index, caption in enumerate(captions):
        named_here: set[str] = set()
        for match in pattern.finditer(caption):
            canonical = lookup[" ".join(match.group(0).lower().split())]
            first_seen.setdefault(canonical, (caption_index, match.start()))
            named_here.add(canonical)
        for canonical in named_here:
            counts[canonical] = counts.get(canonical, 0) + 1
    ranked = sorted(counts, key=lambda name: (-counts[name], first_seen[name]))
    return [Keyword(name, counts[name]) for name in ranked]


def _invisible_class() -> str:
    """A regex character class body of every control and format code point (Unicode categories Cc, Cf),
    computed from this Python's Unicode tables and written for Python's, JavaScript's and Rust's regex
    dialects (BMP as ``\\uXXXX``, the few astral ones as themselves). Lone surrogates (Cs), which no
    UTF-8 text holds but a JSON ``\\ud800`` escape can make, are refused too, outside the pattern (Rust's
    regex cannot name them)."""
    import sys

    ranges: list[tuple[int, int]] = []
    for cp in range(sys.maxunicode + 1):
        if unicodedata.category(chr(cp)) in ("Cc", "Cf"):
            if ranges and ranges[-1][1] == cp - 1:
                ranges[-1] = (ranges[-1][0], cp)
            else:
                ranges.append((cp, cp))

    def char(cp: int) -> str:
        return f"\\u{cp:04x}" if cp <= 0xFFFF else chr(cp)

    return "".join(char(a) if a == b else f"{char(a)}-{char(b)}" for a, b in ranges)


_INVISIBLE = _invisible_class()
#: A style: no control, format or surrogate characters, and at least one visible one. The ingress's
#: OpenAPI document states this pattern; :func:`validate_style` applies the same one.
STYLE_PATTERN = f"^[^{_INVISIBLE}]*[^{_INVISIBLE}\\s][^{_INVISIBLE}]*$"
_HAS_INVISIBLE = re.compile(f"[{_INVISIBLE}\\ud800-\\udfff]")


def validate_style(style: str | None, max_chars: int = MAX_STYLE_CHARS) -> str | None:
    """Return ``style`` stripped of surrounding whitespace, or raise :class:`InvalidParameter` (field
    ``style``). ``None`` means no style; a blank string is rejected rather than guessed at."""
    if style is None:
        return None
    if not isinstance(style, str):
        raise InvalidParameter(
            f"`style` must be a string but is {type(style).__name__}: {style!r}.", field="style"
        )
    if len(style) > max_chars:
        raise InvalidParameter(
            f"`style` must be at most {max_chars} characters but is {len(style)}: {style[:40]!r}...",
            field="style",
        )
    if _HAS_INVISIBLE.search(style):
        raise InvalidParameter(
            f"`style` must not contain control or format characters but is {style!r}.", field="style"
        )
    stripped = style.strip()
    if not stripped:
        raise InvalidParameter(f"`style` must be non-blank text or omitted but is {style!r}.", field="style")
    return stripped


def approx_clip_tokens(text: str) -> int:
    """Words plus punctuation marks: a lower bound of CLIP's BPE count for plain English prompts."""
    return len(re.findall(r"\w+|[^\w\s]", text))


def _collapse_repeats(words: list[str]) -> list[str]:
    """Remove immediately repeated n-grams (n <= 4), case-insensitively: "a monitor and a monitor and a
    monitor" -> "a monitor and a monitor"; "lamp lamp lamp" -> "lamp". Greedy BLIP captions loop so."""
    out = list(words)
    changed = True
    while changed:
        changed = False
        for n in range(1, 5):
            i = 0
            while i + 2 * n <= len(out):
                if [w.lower() for w in out[i : i + n]] == [w.lower() for w in out[i + n : i + 2 * n]]:
                    del out[i + n : i + 2 * n]
                    changed = True
                else:
                    i += 1
    return out


def _summary_words(captions: Sequence[str], keywords: Sequence[Keyword]) -> list[str]:
    """The words of the best caption: the one naming the most distinct ranked keywords (ties: the
    earliest caption, i.e. the unconditional one), de-looped and cut to :data:`MAX_SUMMARY_WORDS`."""
    names = [k.name for k in keywords]
    best: list[str] = []
    best_score = -1
    for caption in captions:
        words = _collapse_repeats(caption.split())
        if not words:
            continue
        text = " ".join(words)
        # Canonical names via the built-in vocabulary, plus literal names (custom vocabularies).
        named = {k.name for k in rank_keywords([text])}
        score = sum(1 for name in names if name in named or _compile((name.lower(),)).search(text))
        if score > best_score:
            best, best_score = words, score
    best = best[:MAX_SUMMARY_WORDS]
    # Commas inside the summary would read as extra prompt items; trailing punctuation is noise.
    cleaned = [w.strip(",;.:!?") for w in best]
    return [w for w in cleaned if w]


def _assemble(names: Sequence[str], style: str | None, summary: Sequence[str]) -> str:
    lead = f"{PROMPT_LEAD} with {', '.join(names)}" if names else PROMPT_LEAD
    parts = [lead]
    if style is not None:
        # "watercolor" -> "watercolor style"; "watercolor style" stays as it is.
        parts.append(style if style.lower().endswith("style") else f"{style} style")
    if summary:
        parts.append(" ".join(summary))
    parts.append(QUALITY_SUFFIX)
    return ", ".join(parts)


def build_prompt(
    captions: Sequence[str],
    keywords: Sequence[Keyword],
    style: str | None = None,
    *,
    max_keywords: int = 8,
    negative_prompt: str = DEFAULT_NEGATIVE_PROMPT,
) -> Prompt:
    """Write a compact SDXL prompt from the captions and their ranked keywords.

    Shape: ``"a desk setup with monitor, keyboard, lamp, <style> style, <scene summary>, high quality,
    detailed, professional photo"``.

    Choices:
      * Keywords come first because CLIP weighs early tokens most and truncates the tail. They are
        re-sorted by count (stable, so ties keep the given order) and cut to ``max_keywords``.
      * The style (optional; see :func:`validate_style`) follows the objects: it is the user's intent and
        is never altered, apart from appending "style" when the text does not already end with it.
      * The scene summary is the best caption (the one naming most keywords) with loops removed, at most
        :data:`MAX_SUMMARY_WORDS` words, lower-cased as BLIP writes it.
      * Budget: at most :data:`PROMPT_TOKEN_BUDGET` words + punctuation marks. Over budget, the summary
        is shortened (to :data:`MIN_SUMMARY_WORDS` words, then dropped), then keywords are dropped from the
        tail (down to :data:`MIN_BUDGET_KEYWORDS`). Only a style near its 200-character limit can still
        exceed the budget; then CLIP truncates the quality suffix, never the objects.

    Raises :class:`InvalidParameter` for a bad ``style`` (field ``style``) or a negative ``max_keywords``.
    """
    # The style may carry a concept preset's fragment before the request's own style (each bounded alone).
    checked_style = validate_style(style, MAX_WOVEN_STYLE_CHARS)
    if isinstance(max_keywords, bool) or not isinstance(max_keywords, int) or max_keywords < 0:
        raise InvalidParameter(
            f"`max_keywords` must be an integer >= 0 but is {max_keywords!r}.", field="max_keywords"
        )
    ranked = sorted((k for k in keywords if k.name.strip()), key=lambda k: -k.count)
    names = [" ".join(k.name.split()) for k in ranked[:max_keywords]]
    summary = _summary_words(captions, ranked[:max_keywords])

    text = _assemble(names, checked_style, summary)
    while approx_clip_tokens(text) > PROMPT_TOKEN_BUDGET:
        if len(summary) > MIN_SUMMARY_WORDS:
            summary = summary[:-1]
        elif summary:
            summary = []
        elif len(names) > MIN_BUDGET_KEYWORDS:
            names = names[:-1]
        else:
            break
        text = _assemble(names, checked_style, summary)
    return Prompt(prompt=text, negative_prompt=negative_prompt)
