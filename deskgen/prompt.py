"""From BLIP captions to an SDXL prompt: rank the desk objects the captions name, then write a short prompt.

Pure Python (no model imports), deterministic: the same captions, keywords and style always give the
same prompt, so a generated image can be reproduced from its PNG metadata.

Pipeline position::

    CaptionSet.texts()  --rank_keywords-->  [Keyword("monitor", 4), Keyword("lamp", 2), ...]
                        --build_prompt--->  Prompt(prompt="a desk setup with monitor, lamp, ...", negative_prompt=...)

What real BLIP captions look like, and what this module does about each (fixtures with the expected
prompts: ``tests/data/blip_captions.yaml``):

  * Echoes of the conditional prefix, as BERT's tokenizer writes it back: ``q : what objects are on the
    desk? a : laptop, ...``, ``desk _ setup : _ with a laptop``. :func:`clean_caption` strips the given
    prefixes token by token, any ``q : ... a :`` question and any ``snake _ case :`` tag, then leading
    punctuation. Words of an echoed question ("is there a monitor?") never count as objects.
  * Decoder loops: ``mouse, and mouse``, ``a monitor a monitor a monitor``. Objects are counted once per
    caption, and the prompt lists canonical objects (never caption text), so a loop cannot reach it.
  * Plurals, synonyms, brands, "a pair of": surface forms map to one canonical object through a
    :class:`Vocabulary` ("monitors", "dual monitors", "a dell monitor" -> ``monitor``; "macbook pro" ->
    ``laptop``), longest phrase first.
  * Context: phrases that name no desk object are matched first and consumed ("coffee table" is not a
    mug, "computer desk" is not a computer; :data:`IGNORED_PHRASES`).
  * Objects outside the vocabulary are not guessed into the prompt; :func:`unknown_objects` lists them
    (the captioner logs them) so ops can add them under the Captioner's ``user_config``
    ``vocabulary.extra_objects`` (see :meth:`Vocabulary.extended`).
  * Colours and scene words stay, as words next to what they describe: "a black keyboard" gives
    ``black keyboard`` in the prompt (the keyword stays ``keyboard``), "in a dark room" gives ``dark room``.
"""

from __future__ import annotations

import re
import sys
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from functools import cached_property

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

#: Surface forms (lower case; multi-word terms allowed) -> canonical desk object. "desk" itself is not an
#: object: every caption names it and the prompt already says "a desk setup". Ambiguous caption words
#: ("picture", "light", "painting", "glasses") are left out on purpose: BLIP writes "a picture of ...".
#: Brand-like forms map to what they are ("macbook pro" -> laptop, "magic mouse" -> mouse).
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
    "desktop computers": "computer", "gaming pc": "computer", "gaming computer": "computer",
    "laptop computer": "laptop", "laptop computers": "laptop", "macbook pro": "laptop",
    "macbook air": "laptop", "macbooks": "laptop",
    # input devices
    "keyboard": "keyboard", "keyboards": "keyboard", "computer keyboard": "keyboard",
    "mechanical keyboard": "keyboard", "mouse": "mouse", "mice": "mouse", "computer mouse": "mouse",
    "mouse pad": "mouse pad", "mouse pads": "mouse pad", "mousepad": "mouse pad", "desk mat": "mouse pad",
    "controller": "controller", "controllers": "controller", "game controller": "controller",
    "magic keyboard": "keyboard", "magic mouse": "mouse", "computer mice": "mouse",
    # audio / video
    "speaker": "speaker", "speakers": "speaker", "headphones": "headphones", "headphone": "headphones",
    "headset": "headphones", "headsets": "headphones", "earphones": "headphones", "microphone": "microphone",
    "microphones": "microphone", "mic": "microphone", "mics": "microphone", "webcam": "webcam",
    "webcams": "webcam", "web camera": "webcam", "web cam": "webcam", "camera": "camera", "cameras": "camera",
    "phone": "phone", "phones": "phone", "smartphone": "phone", "cell phone": "phone", "cellphone": "phone",
    "mobile phone": "phone", "iphone": "phone",
    "earbuds": "headphones", "airpods": "headphones", "smartphones": "phone", "cell phones": "phone",
    # lighting and decor
    "lamp": "lamp", "lamps": "lamp", "desk lamp": "lamp", "desk lamps": "lamp", "led lights": "led lights",
    "led strip": "led lights", "rgb lights": "led lights", "plant": "plant", "plants": "plant",
    "potted plant": "plant", "potted plants": "plant", "houseplant": "plant", "houseplants": "plant",
    "succulent": "plant", "succulents": "plant", "flowers": "flowers", "flower": "flowers", "vase": "vase",
    "candle": "candle", "candles": "candle", "poster": "poster", "posters": "poster", "wall art": "poster",
    "picture frame": "picture frame", "picture frames": "picture frame", "photo frame": "picture frame",
    "clock": "clock", "clocks": "clock", "figurine": "figurine", "figurines": "figurine",
    "table lamp": "lamp", "table lamps": "lamp", "led strips": "led lights", "vases": "vase",
    # drinks
    "mug": "mug", "mugs": "mug", "cup": "mug", "cups": "mug", "coffee": "mug", "coffee mug": "mug",
    "coffee cup": "mug", "tea": "mug", "bottle": "bottle", "bottles": "bottle", "water bottle": "bottle",
    "coffee mugs": "mug", "coffee cups": "mug",
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
    "office chairs": "chair", "gaming chairs": "chair",
}
# fmt: on

#: Phrases that contain a vocabulary word but name no desk object; matched before the objects (longest
#: first) and consumed: "coffee table" is not a mug, "computer desk" is not a computer.
IGNORED_PHRASES: tuple[str, ...] = (
    "coffee table", "coffee tables", "coffee shop", "coffee maker", "coffee machine", "tea table",
    "computer desk", "computer desks", "computer room", "computer lab", "window sill", "windowsill",
    "screen door", "tv stand", "tv room", "mouse trap",
)  # fmt: skip

#: Extensions from config: at most this many extra objects, synonyms per object, ignored phrases.
MAX_EXTRA_OBJECTS = 200
MAX_SYNONYMS = 32
MAX_IGNORED = 200
MAX_TERM_CHARS = 40
_TERM_WORD = r"[a-z0-9]+(?:['-][a-z0-9]+)*"
_TERM = re.compile(rf"{_TERM_WORD}(?: {_TERM_WORD}){{0,3}}")


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


def _norm(term: str) -> str:
    return " ".join(term.lower().split())


def _plural(term: str) -> str:
    """English plural of the last word, for the simple cases: "globe" -> "globes", "box" -> "boxes",
    "shelf" stays regular ("shelfs"): irregular plurals are listed as synonyms."""
    if term.endswith(("s", "x", "z", "ch", "sh")):
        return term + "es"
    if term.endswith("y") and len(term) > 1 and term[-2] not in "aeiou":
        return term[:-1] + "ies"
    return term + "s"


@dataclass(frozen=True, eq=False)
class Vocabulary:
    """Which caption phrases name which desk object.

    ``objects`` maps surface forms to canonical names ("screens" -> "monitor"); ``ignored`` holds phrases
    that name no object ("coffee table"). Matching is case-insensitive on word boundaries, longest phrase
    first, so "desk lamp" is one lamp, "computer mouse" does not also count a computer, and "coffee table"
    hides its "coffee". Immutable; the compiled pattern is built on first use (importing is cheap).
    """

    objects: Mapping[str, str]
    ignored: frozenset[str] = field(default_factory=frozenset)

    @classmethod
    def of(cls, objects: Mapping[str, str], ignored: Iterable[str] = ()) -> Vocabulary:
        """Normalise the surface forms (lower case, single spaces); blank ones are dropped."""
        return cls(
            {_norm(t): c for t, c in objects.items() if t.strip()},
            frozenset(_norm(t) for t in ignored if t.strip()),
        )

    @cached_property
    def _lookup(self) -> dict[str, str | None]:
        lookup: dict[str, str | None] = {_norm(t): c for t, c in self.objects.items() if t.strip()}
        lookup.update({_norm(t): None for t in self.ignored if t.strip()})
        return lookup

    @cached_property
    def _pattern(self) -> re.Pattern[str] | None:
        """One alternation, longest terms first. Whitespace inside a term matches any run of whitespace;
        (?<!\\w) / (?!\\w) rather than \\b also behave at terms that end in punctuation ("post-it")."""
        if not self._lookup:
            return None
        ordered = sorted(self._lookup, key=lambda t: (-len(t), t))
        alternation = "|".join(r"\s+".join(re.escape(part) for part in t.split()) for t in ordered)
        return re.compile(rf"(?<!\w)(?:{alternation})(?!\w)", re.IGNORECASE)

    def matches(self, text: str) -> list[tuple[int, int, str | None]]:
        """``(start, end, canonical)`` of every phrase in ``text``; ``canonical`` is None for ignored ones."""
        if self._pattern is None:
            return []
        return [(m.start(), m.end(), self._lookup[_norm(m.group(0))]) for m in self._pattern.finditer(text)]

    def extended(
        self, extra_objects: Mapping[str, Sequence[str]] | None = None, ignore: Sequence[str] = ()
    ) -> Vocabulary:
        """This vocabulary plus ``extra_objects`` (canonical name -> synonyms) and ``ignore`` (phrases that
        name no object). Validated; raises :class:`InvalidParameter` (field ``vocabulary``) naming the entry.

        Rules: every name, synonym and phrase is 1-4 lower-case words of letters and digits (inner ``-``
        or ``'`` allowed), at most :data:`MAX_TERM_CHARS` characters. Each canonical name is a surface form
        of itself, and so is its simple plural (:func:`_plural`: "globe" -> "globes"; list irregular
        plurals as synonyms). Extra entries override built-in ones (listing "cup" under a new object
        ``cup`` stops cups counting as mugs). A phrase may not be listed for two objects, nor as an object
        and as ignored.
        """
        extra = dict(extra_objects or {})
        if len(extra) > MAX_EXTRA_OBJECTS:
            raise InvalidParameter(
                f"`vocabulary.extra_objects` must hold at most {MAX_EXTRA_OBJECTS} objects but holds {len(extra)}.",
                field="vocabulary",
            )
        if isinstance(ignore, str) or len(ignore) > MAX_IGNORED:
            raise InvalidParameter(
                f"`vocabulary.ignore` must be a list of at most {MAX_IGNORED} phrases but is {ignore!r:.80}.",
                field="vocabulary",
            )
        added: dict[str, str] = {}
        explicit: set[str] = set()
        for canonical, synonyms in extra.items():
            where = f"vocabulary.extra_objects[{canonical!r}]"
            _check_term(canonical, where)
            if isinstance(synonyms, str) or not isinstance(synonyms, Sequence) or len(synonyms) > MAX_SYNONYMS:
                raise InvalidParameter(
                    f"`{where}` must be a list of at most {MAX_SYNONYMS} synonyms but is {synonyms!r:.80}.",
                    field="vocabulary",
                )
            for i, synonym in enumerate(synonyms):
                _check_term(synonym, f"{where}[{i}]")
            for term in (canonical, *synonyms):
                if added.get(term, canonical) != canonical and term in explicit:
                    raise InvalidParameter(
                        f"`vocabulary.extra_objects`: {term!r} is listed for both {added[term]!r} and "
                        f"{canonical!r}; a phrase names one object.",
                        field="vocabulary",
                    )
                added[term] = canonical
                explicit.add(term)
            for term in (canonical, *synonyms):
                added.setdefault(_plural(term), canonical)  # an explicit entry wins over a derived plural
        ignored = set()
        for i, phrase in enumerate(ignore):
            _check_term(phrase, f"vocabulary.ignore[{i}]")
            if phrase in explicit:
                raise InvalidParameter(
                    f"`vocabulary.ignore[{i}]` {phrase!r} is also listed under "
                    f"`vocabulary.extra_objects[{added[phrase]!r}]`: a phrase is an object or ignored, not both.",
                    field="vocabulary",
                )
            ignored.add(phrase)
        objects = {t: c for t, c in self.objects.items() if t not in ignored}
        for term in ignored:
            added.pop(term, None)  # a derived plural that is ignored explicitly
        objects.update(added)
        return Vocabulary(objects, frozenset((self.ignored - added.keys()) | ignored))


def _check_term(term: object, where: str) -> None:
    if not isinstance(term, str) or len(term) > MAX_TERM_CHARS or not _TERM.fullmatch(term):
        raise InvalidParameter(
            f"`{where}` must be 1-4 lower-case words of letters and digits (inner - or ' allowed), single "
            f"spaces, at most {MAX_TERM_CHARS} characters, but is {term!r}.",
            field="vocabulary",
        )


#: The built-in vocabulary: :data:`DESK_VOCABULARY` and :data:`IGNORED_PHRASES`.
DEFAULT_VOCABULARY = Vocabulary.of(DESK_VOCABULARY, IGNORED_PHRASES)


def _vocabulary(vocabulary: Vocabulary | Mapping[str, str] | None) -> Vocabulary:
    """``None``: the built-in one; a plain mapping replaces it (no ignored phrases)."""
    if vocabulary is None:
        return DEFAULT_VOCABULARY
    if isinstance(vocabulary, Vocabulary):
        return vocabulary
    return Vocabulary.of(vocabulary)


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


#: Colour and material words kept in front of an object ("black keyboard"); up to two in a row
#: ("dark grey").
COLOUR_WORDS = frozenset(
    "white black grey gray silver red blue green yellow orange pink purple brown beige gold golden "
    "wooden wood metal metallic glass transparent rgb neon dark light pale bright".split()
)
#: Nouns that describe the scene rather than an object on the desk; with a modifier in front they become
#: scene phrases ("white desk", "dark room", "natural light"); alone they say nothing the lead does not.
SCENE_WORDS = frozenset(
    "desk desks table room bedroom office wall walls background floor lighting light workspace "
    "workstation corner studio".split()
)
#: Words that are never modifiers or objects: articles, prepositions, verbs of captions, counting words,
#: photo words, and brand names (the vocabulary maps branded products; a bare brand names nothing).
_NOT_DESCRIPTIVE = frozenset(
    "a an the this that these those there it its is are was were be has have with and or of on in at to "
    "by for from near next under above behind beside between into onto over full filled covered set sits "
    "sitting placed photo picture image view shot close up top front side q what which where how do does "
    "objects object items item things thing some two three four five several many few one pair pairs lots "
    "lot bunch couple very other each setup desk desks no yes left right middle center "
    "apple logitech dell samsung razer corsair lg asus hp lenovo microsoft sony bose ikea steelseries "
    "hyperx acer".split()
)


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


# ------------------------------------------------------------------------------------------- style


def _invisible_class() -> str:
    """A regex character class body of every control and format code point (Unicode categories Cc, Cf),
    computed from this Python's Unicode tables and written for Python's, JavaScript's and Rust's regex
    dialects (BMP as ``\\uXXXX``, the few astral ones as themselves). Lone surrogates (Cs), which no
    UTF-8 text holds but a JSON ``\\ud800`` escape can make, are refused too, outside the pattern (Rust's
    regex cannot name them). Scanning every code point takes ~0.3 s, so :data:`_INVISIBLE_BY_UNICODE`
    holds the result for known Unicode versions (a unit test checks it against this function)."""
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


#: :func:`_invisible_class` by ``unicodedata.unidata_version`` (Python 3.11: Unicode 14.0.0).
_INVISIBLE_BY_UNICODE: dict[str, str] = {
    "14.0.0": (
        '\\u0000-\\u001f\\u007f-\\u009f\\u00ad\\u0600-\\u0605\\u061c\\u06dd\\u070f\\u0890-\\u0891\\u08e2\\u180e\\u200b-\\u200f\\u202a-\\u202e\\u2060-\\u2064\\u2066-\\u206f\\ufeff\\ufff9-\\ufffb\U000110bd\U000110cd\U00013430-\U00013438\U0001bca0-\U0001bca3\U0001d173-\U0001d17a\U000e0001\U000e0020-\U000e007f'
    ),
}
_INVISIBLE = _INVISIBLE_BY_UNICODE.get(unicodedata.unidata_version) or _invisible_class()
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
