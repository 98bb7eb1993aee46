"""The typed configuration of one LoRA training run, checked before anything is loaded.

Every field is bounded; a value out of bounds raises :class:`~deskgen.errors.InvalidParameter` naming the
field and the rule, so the CLI can exit 2 before a model is read or a file is written.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any, Literal

from deskgen.errors import InvalidParameter
from deskgen.mixes import NAMED_MIXES, validate_adapter_name

Layout = Literal["diffusers", "kohya"]
LAYOUTS: tuple[str, ...] = ("diffusers", "kohya")
DTYPES: tuple[str, ...] = ("float32", "bfloat16")

#: The modules a style LoRA adapts, as the public SDXL LoRAs (and deskgen's LoRA check) expect them.
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")

MAX_RANK = 128
MIN_LEARNING_RATE = 1e-6
MAX_LEARNING_RATE = 1e-2
MAX_STEPS = 100_000
MIN_RESOLUTION = 64
MAX_RESOLUTION = 2048
#: The resolution must be a multiple of this: the VAE halves it three times, the UNet twice more.
RESOLUTION_MULTIPLE = 32
MAX_BATCH_SIZE = 64


@dataclass(frozen=True)
class LoraTrainingConfig:
    """One run: which base model, which adapter it writes, and the optimiser's settings."""

    #: The adapter's name: the file ``<lora_dir>/<name>.safetensors`` and the name mixes use.
    name: str
    #: The SDXL base (hub id or folder), the generator's ``model_id``.
    base_model: str
    #: LoRA rank and alpha (the update is scaled by alpha / rank; alpha defaults to the rank).
    rank: int = 16
    alpha: float | None = None
    learning_rate: float = 1e-4
    #: Optimiser steps (0 writes the untrained adapter: its up-projections are zero, i.e. the base model).
    steps: int = 500
    #: Training images are resized (shorter side) and centre-cropped to resolution x resolution.
    resolution: int = 1024
    batch_size: int = 1
    seed: int = 0
    #: Also train LoRAs on both text encoders' attention projections.
    train_text_encoders: bool = False
    #: A checkpoint every N steps (0: only at the end).
    checkpoint_every: int = 0
    #: The output's key layout: diffusers/peft (``unet.…lora_A.weight``) or kohya_ss (``lora_unet_…``).
    layout: Layout = "diffusers"
    #: Weights' dtype for the frozen base: None = bfloat16 on CUDA, float32 on the CPU.
    dtype: str | None = None
    #: Recompute activations in the backward pass (less memory, ~30 % slower).
    gradient_checkpointing: bool = False
    #: Images whose shorter side is below this are refused (default: half the resolution).
    min_image_side: int | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        validate_adapter_name(self.name, field="name")
        if self.name in NAMED_MIXES:
            raise InvalidParameter(
                f"`name` {self.name!r} is a named mix; choose another adapter name.", field="name"
            )
        if not isinstance(self.base_model, str) or not self.base_model:
            raise InvalidParameter("`base_model` must be a hub id or a folder.", field="base_model")
        _check_int("rank", self.rank, 1, MAX_RANK)
        if self.alpha is not None and not (_is_number(self.alpha) and 0 < self.alpha <= 4 * MAX_RANK):
            raise InvalidParameter(
                f"`alpha` must be a number in (0, {4 * MAX_RANK}] but is {self.alpha!r}.", field="alpha"
            )
        if not (
            _is_number(self.learning_rate) and MIN_LEARNING_RATE <= self.learning_rate <= MAX_LEARNING_RATE
        ):
            raise InvalidParameter(
                f"`learning_rate` must be between {MIN_LEARNING_RATE:g} and {MAX_LEARNING_RATE:g} but is "
                f"{self.learning_rate!r}.",
                field="learning_rate",
            )
        _check_int("steps", self.steps, 0, MAX_STEPS)
        _check_int("resolution", self.resolution, MIN_RESOLUTION, MAX_RESOLUTION)
        if self.resolution % RESOLUTION_MULTIPLE:
            raise InvalidParameter(
                f"`resolution` must be a multiple of {RESOLUTION_MULTIPLE} but is {self.resolution}.",
                field="resolution",
            )
        _check_int("batch_size", self.batch_size, 1, MAX_BATCH_SIZE)
        _check_int("seed", self.seed, 0, 2**32 - 1)
        _check_int("checkpoint_every", self.checkpoint_every, 0, MAX_STEPS)
        if self.layout not in LAYOUTS:
            raise InvalidParameter(
                f"`layout` must be one of {list(LAYOUTS)} but is {self.layout!r}.", field="layout"
            )
        if self.dtype is not None and self.dtype not in DTYPES:
            raise InvalidParameter(
                f"`dtype` must be one of {list(DTYPES)} or null but is {self.dtype!r}.", field="dtype"
            )
        for flag in ("train_text_encoders", "gradient_checkpointing"):
            if not isinstance(getattr(self, flag), bool):
                raise InvalidParameter(f"`{flag}` must be true or false.", field=flag)
        if self.min_image_side is not None:
            _check_int("min_image_side", self.min_image_side, 1, MAX_RESOLUTION)

    @property
    def effective_alpha(self) -> float:
        return float(self.rank if self.alpha is None else self.alpha)

    @property
    def scale(self) -> float:
        """The factor on B·A in the forward pass (and baked into B in the diffusers layout)."""
        return self.effective_alpha / self.rank

    @property
    def smallest_side(self) -> int:
        return (
            self.min_image_side
            if self.min_image_side is not None
            else max(MIN_RESOLUTION // 2, self.resolution // 2)
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> LoraTrainingConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise InvalidParameter(
                f"`{unknown[0]}` is not a training setting; the settings are {sorted(known)}.",
                field=unknown[0],
            )
        return cls(**values)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_int(field: str, value: Any, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidParameter(
            f"`{field}` must be an integer from {low} to {high} but is {value!r}.", field=field
        )
