"""The API's fixed rules: the bounds no server configuration can move and the text rules of its fields.

They are part of the protocol, so they live here, in the client's distribution, and the server imports
them from here (``deskgen.limits`` re-exports the bounds beside its own): a bound or a pattern is written
once, and the OpenAPI document, the server's checks and the client all read the same one. The limits
a deployment may change (image sides, steps, upload size) are not here: ``GET /v1/limits`` answers them.
"""

from __future__ import annotations

import re
import sys
import unicodedata
from typing import Literal

#: A seed is a 32-bit unsigned integer (torch.Generator accepts more; clients and PNG metadata do not).
MAX_SEED = 2**32 - 1
#: Characters in a prompt or a negative prompt (the text encoders see 77 tokens; longer text is cut).
MAX_PROMPT_CHARS = 2000
#: Classifier-free guidance scale.
MIN_GUIDANCE = 0.0
MAX_GUIDANCE = 30.0
#: Characters in a style concept woven into the prompt, and in a user id.
MAX_STYLE_CHARS = 200
MAX_USER_ID_CHARS = 200
#: A request id (the ``X-Request-Id`` a client may send; it is also the image id feedback names).
REQUEST_ID_PATTERN = r"^[A-Za-z0-9._-]{1,64}$"
#: Characters in a mix specification (`adapter:weight+...`).
MAX_MIX_SPEC_CHARS = 300
#: A request's own deadline (`timeout_s`), seconds.
MAX_TIMEOUT_S = 600.0
#: The VAE works in 8-pixel cells: image sides are multiples of this.
SIDE_MULTIPLE = 8
#: Products a request may ask the locator to find, and characters per product name (the detector's text
#: encoder sees 16 tokens of "a photo of a <product>"; longer names are cut there).
MAX_PRODUCTS = 16
MAX_PRODUCT_CHARS = 48

#: An adapter's name (a LoRA file's stem in the server's ``lora_dir``).
ADAPTER_NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}"
_WEIGHT = r"(?::(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+))?"
#: What a client may write as a mix: a named mix, ``base``, or ``adapter[:weight]+...`` (the weights'
#: range and the adapters' existence are checked against the server's catalogue).
MIX_SPEC_PATTERN = rf"^{ADAPTER_NAME_PATTERN}{_WEIGHT}(?:\+{ADAPTER_NAME_PATTERN}{_WEIGHT})*$"
MIX_SPEC_RULE = ("a named mix, `base`, or `adapter:weight+...` (adapter names are 1-64 letters, digits, '_' or '-', "
                 "weights decimal numbers, no spaces)")  # fmt: skip

#: A product name: visible text, no commas (a form separates names with them).
PRODUCT_PATTERN = r"^[^\x00-\x1f\x7f-\x9f,]*[^\s\x00-\x1f\x7f-\x9f,][^\x00-\x1f\x7f-\x9f,]*$"
PRODUCT_RULE = f"1-{MAX_PRODUCT_CHARS} characters of visible text, no commas"

#: What a request writes to get today's concept preset, and a preset's name.
AUTO = "auto"
CONCEPT_NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,63}$"
CONCEPT_PATTERN = f"^(?:{AUTO}|{CONCEPT_NAME_PATTERN[1:-1]})$"

#: What a user did with an image (``POST /v1/feedback``).
FeedbackEvent = Literal["like", "dislike", "download", "select"]
FEEDBACK_EVENTS: tuple[str, ...] = ("like", "dislike", "download", "select")


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
#: A style: no control, format or surrogate characters, and at least one visible one. The OpenAPI
#: document states this pattern; :func:`style_problem` applies the same one.
STYLE_PATTERN = f"^[^{_INVISIBLE}]*[^{_INVISIBLE}\\s][^{_INVISIBLE}]*$"
_HAS_INVISIBLE = re.compile(f"[{_INVISIBLE}\\ud800-\\udfff]")


def style_problem(style: object, max_chars: int = MAX_STYLE_CHARS) -> str | None:
    """What is wrong with ``style`` as a style concept (a sentence naming the field and the rule), or
    ``None`` when it is acceptable (strip it before use). A blank string is wrong rather than guessed at."""
    if not isinstance(style, str):
        return f"`style` must be a string but is {type(style).__name__}: {style!r}."
    if len(style) > max_chars:
        return f"`style` must be at most {max_chars} characters but is {len(style)}: {style[:40]!r}..."
    if _HAS_INVISIBLE.search(style):
        return f"`style` must not contain control or format characters but is {style!r}."
    if not style.strip():
        return f"`style` must be non-blank text or omitted but is {style!r}."
    return None
