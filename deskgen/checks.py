"""Field checks that raise :class:`deskgen.errors.InvalidParameter` naming the field and the rule."""

from __future__ import annotations

from typing import Any

from deskgen.errors import InvalidParameter


def check_int(name: str, value: Any, low: int, high: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidParameter(f"`{name}` must be an integer but is {value!r}.", field=name)
    if not low <= value <= high:
        raise InvalidParameter(f"`{name}` must be in [{low}, {high}] but is {value}.", field=name)


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise InvalidParameter(f"`{name}` must be one of {list(choices)} but is {value!r}.", field=name)


def check_flag(name: str, value: Any, *, optional: bool = False) -> None:
    if not isinstance(value, bool) and not (optional and value is None):
        rule = "true, false or null" if optional else "true or false"
        raise InvalidParameter(f"`{name}` must be {rule} but is {value!r}.", field=name)
