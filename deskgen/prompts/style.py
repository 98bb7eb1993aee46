"""The text rule for a style, applied by the model layer: what a request's ``style`` may contain is the
protocol's rule (:data:`deskgen_client.rules.STYLE_PATTERN`, which the OpenAPI document states);
:func:`validate_style` applies it and raises the model layer's error.
"""

from __future__ import annotations

from deskgen.errors import InvalidParameter
from deskgen.limits import MAX_STYLE_CHARS
from deskgen_client.rules import STYLE_PATTERN, style_problem

__all__ = ["STYLE_PATTERN", "validate_style"]


def validate_style(style: str | None, max_chars: int = MAX_STYLE_CHARS) -> str | None:
    """Return ``style`` stripped of surrounding whitespace, or raise :class:`InvalidParameter` (field
    ``style``). ``None`` means no style; a blank string is rejected rather than guessed at."""
    if style is None:
        return None
    problem = style_problem(style, max_chars)
    if problem is not None:
        raise InvalidParameter(problem, field="style")
    assert isinstance(style, str)
    return style.strip()
