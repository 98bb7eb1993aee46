"""The text rule for a style: what a request's ``style`` may contain (:data:`STYLE_PATTERN`, which the
ingress's OpenAPI document states) and :func:`validate_style`, which applies the same rule.
"""

from __future__ import annotations

import re
import sys
import unicodedata

from deskgen.errors import InvalidParameter
from deskgen.limits import MAX_STYLE_CHARS


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
