"""LoRA mixes: the named catalogue, the ad-hoc grammar, and one canonical id per mix.

A mix is a set of (adapter, weight) pairs. Its canonical id sorts the adapters by name, writes the
weights in shortest round-trip form and drops zero weights, so ``ott:0.7+3d:0.5``, ``3d:.50+ott:0.70``
and the named ``ott_3d`` are all ``3d:0.5+ott:0.7``. The canonical id is the Ray Serve multiplexed
model id: requests for equal mixes are routed to the replica that already holds them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from deskgen.errors import AdapterUnavailable, InvalidParameter, UnknownMix
from deskgen.limits import MAX_WEIGHT, MIN_WEIGHT
from deskgen_client.rules import ADAPTER_NAME_PATTERN

#: The id of the empty mix (no LoRA, or every weight 0).
BASE_MIX_ID = "base"
ADAPTER_NAME_RE = re.compile(rf"^{ADAPTER_NAME_PATTERN}$")

NAMED_MIXES: dict[str, dict[str, float]] = {
    "dalle_only": {"dalle": 1.0},
    "ott_only": {"ott": 1.0},
    "3d_only": {"3d": 1.0},
    "dalle_ott": {"dalle": 0.7, "ott": 0.5},
    "dalle_3d": {"dalle": 0.7, "3d": 0.5},
    "ott_3d": {"ott": 0.7, "3d": 0.5},
    "mix": {"dalle": 0.6, "ott": 0.4, "3d": 0.4},
}


def _format_weight(weight: float) -> str:
    # Rounded to 4 decimals so 0.7 and 0.70000001 are one mix; repr gives the shortest form.
    return repr(round(weight, 4))


@dataclass(frozen=True)
class Mix:
    """An immutable, canonical LoRA mix: adapters sorted by name, no zero weights."""

    weights: tuple[tuple[str, float], ...]

    @classmethod
    def from_weights(cls, weights: Mapping[str, float], *, field: str = "mix") -> Mix:
        for name, weight in weights.items():
            validate_adapter_name(name, field=field)
            validate_weight(name, weight, field=field)
        kept = sorted((n, round(float(w), 4)) for n, w in weights.items() if round(float(w), 4) != 0.0)
        return cls(tuple(kept))

    @property
    def id(self) -> str:
        if not self.weights:
            return BASE_MIX_ID
        return "+".join(f"{name}:{_format_weight(w)}" for name, w in self.weights)

    @property
    def adapters(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.weights)

    def as_dict(self) -> dict[str, float]:
        return dict(self.weights)

    def __str__(self) -> str:
        return self.id


def validate_adapter_name(name: str, *, field: str = "mix") -> str:
    if not ADAPTER_NAME_RE.fullmatch(name):
        raise InvalidParameter(
            f"`{field}`: adapter names are 1-64 letters, digits, '_' or '-' (no paths) but got {name!r}.",
            field=field,
        )
    return name


def validate_weight(name: str, weight: float, *, field: str = "mix") -> float:
    if not isinstance(weight, (int, float)) or isinstance(weight, bool) or not math.isfinite(weight):
        raise InvalidParameter(f"`{field}`: the weight of {name!r} must be a number but is {weight!r}.", field=field)
    if not MIN_WEIGHT <= weight <= MAX_WEIGHT:
        raise InvalidParameter(
            f"`{field}`: the weight of {name!r} must be in [{MIN_WEIGHT:g}, {MAX_WEIGHT:g}] but is {weight:g}.",
            field=field,
        )
    return float(weight)


def parse_mix_spec(spec: str, *, field: str = "mix") -> dict[str, float]:
    """Parse ``name:weight(+name:weight)*`` into a dict; a bare ``name`` means weight 1.0."""
    spec = spec.strip()
    if not spec:
        raise InvalidParameter(f"`{field}` is empty: name a mix or write `adapter:weight+...`.", field=field)
    weights: dict[str, float] = {}
    for part in spec.split("+"):
        name, sep, raw = part.strip().partition(":")
        name = validate_adapter_name(name.strip(), field=field)
        if name in weights:
            raise InvalidParameter(f"`{field}`: adapter {name!r} appears twice in {spec!r}.", field=field)
        try:
            weight = float(raw) if sep else 1.0
        except ValueError:
            raise InvalidParameter(
                f"`{field}`: the weight of {name!r} must be a number but is {raw.strip()!r}.", field=field
            ) from None
        weights[name] = validate_weight(name, weight, field=field)
    return weights


class MixCatalog:
    """Resolves what a client writes (a named mix, an ad-hoc spec or a canonical id) to a :class:`Mix`.

    ``available`` is the set of adapters the LoRA registry can load; ``unavailable`` maps the adapters
    whose files are present but cannot be loaded to the reason (:meth:`deskgen.loras.LoraRegistry.problems`).
    A mix naming an unavailable adapter raises :class:`AdapterUnavailable` (422) naming it and the
    reason, any other unknown adapter :class:`UnknownMix` listing the available ones. A named mix may
    name an unavailable adapter (it is refused when asked for, the others keep working). ``named``
    defaults to :data:`NAMED_MIXES` and is usually replaced from the Serve ``user_config``.
    """

    def __init__(
        self, available: Iterable[str], named: Mapping[str, Mapping[str, float]] | None = None,
        unavailable: Mapping[str, str] | None = None,
    ) -> None:  # fmt: skip
        self.unavailable = dict(unavailable or {})
        self.available = frozenset(available) - set(self.unavailable)
        named = NAMED_MIXES if named is None else named
        self.named: dict[str, Mix] = {}
        for mix_name, weights in named.items():
            mix = Mix.from_weights(dict(weights), field=f"mixes.{mix_name}")
            self._check_available(mix, f"mixes.{mix_name}")
            self.named[mix_name] = mix

    def resolve(self, spec: str, *, field: str = "mix") -> Mix:
        spec = spec.strip()
        if not spec:
            raise InvalidParameter(f"`{field}` is empty: name a mix or write `adapter:weight+...`.", field=field)
        if spec in self.named:
            return self._check_usable(self.named[spec], field)
        if spec == BASE_MIX_ID:
            return Mix(())
        if ":" not in spec and "+" not in spec:
            raise UnknownMix(
                f"`{field}`: unknown mix {spec!r}; named mixes are {sorted(self.named)} "
                f"(or write `adapter:weight+...` with adapters {sorted(self.available)}).",
                field=field,
            )
        # Unknown adapters first (404): what a client cannot know is answered before how it wrote the
        # weights (a weight out of range or an adapter named twice is then a 400).
        names = [part.partition(":")[0].strip() for part in spec.split("+")]
        self._check_available(Mix(tuple((n, 1.0) for n in names if ADAPTER_NAME_RE.fullmatch(n))), field)
        mix = Mix.from_weights(parse_mix_spec(spec, field=field), field=field)
        self._check_available(mix, field)
        return self._check_usable(mix, field)

    def _check_usable(self, mix: Mix, field: str) -> Mix:
        for name in mix.adapters:
            if name in self.unavailable:
                raise AdapterUnavailable.of(name, self.unavailable[name], field=field)
        return mix

    def _check_available(self, mix: Mix, field: str) -> None:
        missing = [name for name in mix.adapters if name not in self.available and name not in self.unavailable]
        if missing:
            raise UnknownMix(
                f"`{field}`: unknown adapter {missing[0]!r}; available adapters are {sorted(self.available)}.",
                field=field,
            )
