"""The desk-object vocabulary: which caption phrases name which desk object, and the word lists around it.

:data:`DESK_VOCABULARY` maps surface forms (plurals, synonyms, brands) to canonical objects,
:data:`IGNORED_PHRASES` holds phrases that name no object ("coffee table"), :class:`Vocabulary` matches
them in a caption (longest phrase first) and validates extensions from config
(:meth:`Vocabulary.extended`); :data:`COLOUR_WORDS`, :data:`SCENE_WORDS` and ``_NOT_DESCRIPTIVE`` are the
context words the caption reader keeps or sets aside next to the objects.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property

from deskgen.errors import InvalidParameter

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


# ----------------------------------------------------------------------------------- context words

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
