"""Reading BLIP captions: clean them (prefix echoes, decoder loops), rank the desk objects they name
(named by more captions first), and collect what else they say (colours and scene phrases for the prompt,
objects outside the vocabulary for the logs).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from deskgen.prompts.vocabulary import (
    _NOT_DESCRIPTIVE,
    COLOUR_WORDS,
    SCENE_WORDS,
    Vocabulary,
    _vocabulary,
)

#: BLIP conditional-caption prefixes: each steers the decoder towards a different view of the photo
#: (a plain description, a list of objects, a "setup" tag line). The captioner strips them from its output.
DEFAULT_PREFIXES: tuple[str, ...] = (
    "This is a photo of",
    "Q: What objects are on the desk? A:",
    "desk_setup:",
)


@dataclass(frozen=True)
class Keyword:
    """A desk object and the number of captions that name it."""

    name: str
    count: int


# ---------------------------------------------------------------------------------------- cleaning

#: Tokens as BERT's tokenizer splits them: words, and each punctuation mark (``_`` included) alone.
_ECHO_TOKEN = re.compile(r"[^\W_]+|[^\w\s]|_")
#: An echoed question: "q : what objects are on the desk? a :" (also "question: ... answer:").
_QA_ECHO = re.compile(r"^\s*q(?:uestion)?\s*:.*?(?<!\w)a(?:nswer)?\s*:", re.DOTALL)
#: An echoed tag: "desk _ setup :" (a snake_case word and a colon, spaced as BERT writes it back).
_TAG_ECHO = re.compile(r"^\s*[^\W_]+(?:\s*_\s*[^\W_]+)+\s*:")
_LEADING_JUNK = re.compile(r"^[\s_:;,.!?\-]+")
_TRAILING_JUNK = re.compile(r"[\s_:;,\-]+$")
_LIST_SEPARATOR = re.compile(r"\s*,\s*(?:and\s+)?|\s+and\s+")
_WORD = re.compile(r"[^\W_]+(?:['’-][^\W_]+)*")


def _strip_prefix_echo(text: str, prefixes: Sequence[str]) -> str:
    tokens = list(_ECHO_TOKEN.finditer(text))
    words = [t.group(0).lower() for t in tokens]
    for prefix in sorted(prefixes, key=len, reverse=True):
        wanted = [t.lower() for t in _ECHO_TOKEN.findall(prefix)]
        if wanted and words[: len(wanted)] == wanted:
            return text[tokens[len(wanted) - 1].end() :]
    return text


def _dedupe_items(text: str) -> str:
    """Drop list items that repeat an earlier one ("laptop, monitor, mouse, and mouse" -> "laptop,
    monitor, mouse"); items compare without their articles ("a mouse" = "mouse")."""
    items = [item for item in _LIST_SEPARATOR.split(text) if item]
    if len(items) < 2:
        return text
    seen: set[str] = set()
    kept = []
    for item in items:
        key = " ".join(w for w in item.lower().split() if w not in ("a", "an", "the"))
        if key and key not in seen:
            seen.add(key)
            kept.append(item)
    return ", ".join(kept)


def _collapse_repeats(words: list[str]) -> list[str]:
    """Remove immediately repeated n-grams (n <= 4), case-insensitively: "a monitor a monitor a monitor"
    -> "a monitor"; "lamp lamp lamp" -> "lamp". Greedy BLIP captions loop so."""
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


def clean_caption(caption: str, prefixes: Sequence[str] = DEFAULT_PREFIXES) -> str:
    """A caption without echoes and loops, lower case, single-spaced.

    1. An echo of one of ``prefixes`` at the start, compared token by token as BERT writes it back
       ("desk_setup:" matches "desk _ setup :"); then a ``q : ... a :`` question and a ``snake _ case :``
       tag of any other prefix;
    2. leading punctuation (BLIP often continues "desk_setup:" with "_");
    3. immediately repeated n-grams, then repeated list items ("mouse, and mouse").
    """
    text = " ".join(caption.lower().split())
    text = _strip_prefix_echo(text, prefixes)
    text = _QA_ECHO.sub("", text, count=1)
    text = _TAG_ECHO.sub("", text, count=1)
    text = _LEADING_JUNK.sub("", text)
    text = " ".join(_collapse_repeats(text.split()))
    text = _dedupe_items(text)
    return _TRAILING_JUNK.sub("", text)


# ------------------------------------------------------------------------------------------ ranking


def rank_keywords(
    captions: Sequence[str],
    vocabulary: Vocabulary | Mapping[str, str] | None = None,
    *,
    prefixes: Sequence[str] = DEFAULT_PREFIXES,
) -> list[Keyword]:
    """Rank the desk objects named across ``captions``.

    Contract:
      * Each caption goes through :func:`clean_caption` first: words of an echoed prefix or question
        are not objects the model saw.
      * ``count`` is the number of captions that name the object, not the number of occurrences: BLIP's
        greedy decoder loops ("a monitor and a monitor and a monitor"), and one looping caption must not
        outvote three captions that each name a lamp once.
      * Surface forms merge into their canonical name through ``vocabulary`` (default
        :data:`DEFAULT_VOCABULARY`; a plain mapping replaces it): "screens", "display" and "computer
        monitor" all count for "monitor"; ignored phrases ("coffee table") count for nothing.
      * Order: count descending, ties by first appearance (caption order, then position in the caption),
        which keeps the unconditional caption's reading order. Words outside the vocabulary are ignored
        here (see :func:`unknown_objects`).
    """
    vocab = _vocabulary(vocabulary)
    counts: dict[str, int] = {}
    first_seen: dict[str, tuple[int, int]] = {}
    for caption_index, caption in enumerate(captions):
        named_here: set[str] = set()
        for start, _, canonical in vocab.matches(clean_caption(caption, prefixes)):
            if canonical is None:
                continue
            first_seen.setdefault(canonical, (caption_index, start))
            named_here.add(canonical)
        for canonical in named_here:
            counts[canonical] = counts.get(canonical, 0) + 1
    ranked = sorted(counts, key=lambda name: (-counts[name], first_seen[name]))
    return [Keyword(name, counts[name]) for name in ranked]


# ------------------------------------------------------------------------------ beyond the objects


@dataclass
class _CaptionFacts:
    """What one cleaned caption says besides its objects' names."""

    colours: dict[str, str]
    scene: list[str]


def _facts(text: str, vocab: Vocabulary) -> _CaptionFacts:
    matches = vocab.matches(text)
    covered = [(s, e) for s, e, _ in matches]
    words = [(m.start(), m.end(), m.group(0)) for m in _WORD.finditer(text)]
    free_words = [w for w in words if not any(s <= w[0] < e for s, e in covered)]

    def modifiers_before(position: int, allowed: Callable[[str], bool]) -> list[str]:
        """Up to two allowed words directly before ``position`` (only spaces between)."""
        found: list[str] = []
        end = position
        for start, stop, word in reversed([w for w in free_words if w[1] <= position]):
            if text[stop:end].strip() or len(found) == 2 or not allowed(word):
                break
            found.insert(0, word)
            end = start
        return found

    colours: dict[str, str] = {}
    for start, _, canonical in matches:
        if canonical is not None and canonical not in colours:
            colour = modifiers_before(start, lambda w: w in COLOUR_WORDS)
            if colour:
                colours[canonical] = " ".join(colour)
    scene: list[str] = []
    for start, _, word in free_words:
        if word in SCENE_WORDS:
            mods = modifiers_before(start, lambda w: w not in _NOT_DESCRIPTIVE and w not in SCENE_WORDS and w.isalpha())
            if mods:
                scene.append(" ".join([*mods, word]))
    return _CaptionFacts(colours, scene)


def unknown_objects(
    captions: Sequence[str],
    vocabulary: Vocabulary | Mapping[str, str] | None = None,
    *,
    prefixes: Sequence[str] = DEFAULT_PREFIXES,
) -> list[Keyword]:
    """Likely objects the captions name that the vocabulary does not know, ranked like
    :func:`rank_keywords`: the list items of a caption ("a globe", "a guitar") once the vocabulary's
    phrases, articles, counts, colours, scene words and brands are set aside. A heuristic for the logs
    (so ops can extend the vocabulary), never part of the prompt or the keywords."""
    vocab = _vocabulary(vocabulary)
    counts: Counter[str] = Counter()
    first_seen: dict[str, tuple[int, int]] = {}
    splitter = re.compile(
        r"[,;.:!?()\[\]]|(?<!\w)(?:and|or|with|next to|on|in|of|near|beside|under|behind|by|at|from|for|to|"
        r"against|beneath|over|above|below|between|inside|is|are|has|have|there|this|that)(?!\w)"
    )
    for caption_index, caption in enumerate(captions):
        text = clean_caption(caption, prefixes)
        for start, end, _ in reversed(vocab.matches(text)):
            text = f"{text[:start]},{' ' * (end - start - 1)}{text[end:]}"  # keep positions
        named_here: set[str] = set()
        position = 0
        for segment in splitter.split(text):
            words = _WORD.findall(segment)
            while words and (words[0] in _NOT_DESCRIPTIVE or words[0] in COLOUR_WORDS or words[0].isdigit()):
                words = words[1:]
            if (
                1 <= len(words) <= 2
                and len(words[-1]) >= 3
                and all(w.isalpha() and w not in _NOT_DESCRIPTIVE and w not in SCENE_WORDS for w in words)
            ):
                name = " ".join(words)
                first_seen.setdefault(name, (caption_index, position))
                named_here.add(name)
            position += 1
        counts.update(named_here)
    ranked = sorted(counts, key=lambda name: (-counts[name], first_seen[name]))
    return [Keyword(name, counts[name]) for name in ranked]
