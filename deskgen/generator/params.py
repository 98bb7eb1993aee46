"""What to draw (:class:`GenerationParams`) and what comes back (:class:`GenerationResult`)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from deskgen.checks import check_int
from deskgen.errors import InvalidParameter
from deskgen.limits import (
    DEFAULT_SIZE_LIMITS,
    MAX_GUIDANCE,
    MAX_PROMPT_CHARS,
    MAX_SEED,
    MAX_WOVEN_PROMPT_CHARS,
    MIN_GUIDANCE,
    SIDE_MULTIPLE,
    SizeLimits,
)
from deskgen.pngmeta import encode_png
from deskgen.prompts.build import DEFAULT_NEGATIVE_PROMPT

if TYPE_CHECKING:
    from PIL import Image

#: ``on_step(step, total)``: called after each denoising step, ``step`` counting from 1.
StepCallback = Callable[[int, int], None]


@dataclass(frozen=True)
class GenerationParams:
    """What to draw. :meth:`validate` checks every field; the generator calls it again before running."""

    prompt: str
    negative_prompt: str = DEFAULT_NEGATIVE_PROMPT
    seed: int = 0
    steps: int = 30
    guidance: float = 5.0
    width: int = 1024
    height: int = 1024
    #: The concept preset the prompt was woven with (deskgen.concepts), recorded in the metadata.
    concept: str | None = None

    def validate(self, limits: SizeLimits = DEFAULT_SIZE_LIMITS) -> GenerationParams:
        """Return ``self`` if every field is in range, else raise InvalidParameter naming the first bad field."""
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise InvalidParameter("`prompt` must be a non-empty string.", field="prompt")
        if len(self.prompt) > MAX_WOVEN_PROMPT_CHARS:
            raise InvalidParameter(
                f"`prompt` must be at most {MAX_WOVEN_PROMPT_CHARS} characters (with a concept's fragment) but has "
                f"{len(self.prompt)}.", field="prompt",
            )  # fmt: skip
        if not isinstance(self.negative_prompt, str):
            raise InvalidParameter(
                f"`negative_prompt` must be a string but is {self.negative_prompt!r}.", field="negative_prompt"
            )
        if len(self.negative_prompt) > MAX_PROMPT_CHARS:
            raise InvalidParameter(
                f"`negative_prompt` must be at most {MAX_PROMPT_CHARS} characters but has {len(self.negative_prompt)}.",
                field="negative_prompt",
            )
        check_int("seed", self.seed, 0, MAX_SEED)
        check_int("steps", self.steps, 1, limits.max_steps)
        if (
            not isinstance(self.guidance, (int, float))
            or isinstance(self.guidance, bool)
            or not math.isfinite(self.guidance)
            or not MIN_GUIDANCE <= self.guidance <= MAX_GUIDANCE
        ):
            raise InvalidParameter(
                f"`guidance` must be a finite number in [{MIN_GUIDANCE:g}, {MAX_GUIDANCE:g}] but is {self.guidance!r}.",
                field="guidance",
            )
        for name in ("width", "height"):
            value = getattr(self, name)
            check_int(name, value, limits.min_side, limits.max_side)
            if value % SIDE_MULTIPLE:
                # The VAE downsamples by 8: other sizes would be silently cropped by the pipeline.
                raise InvalidParameter(f"`{name}` must be a multiple of {SIDE_MULTIPLE} but is {value}.", field=name)
        return self


@dataclass
class GenerationResult:
    """One image and its recipe. ``metadata`` is JSON-serialisable; everything but ``timings`` is
    deterministic, so the same request always yields the same ``png(timings=False)`` bytes."""

    image: Image.Image
    metadata: dict[str, Any]

    def png(self, *, timings: bool = True) -> bytes:
        """PNG bytes with ``metadata`` in the ``deskgen`` iTXt chunk (without ``timings`` if False)."""
        metadata = self.metadata if timings else {k: v for k, v in self.metadata.items() if k != "timings"}
        return encode_png(self.image, metadata)
