"""What the generator test modules share: the tiny generation and settings pointing at the tiny models."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from deskgen.generator import GenerationParams, GeneratorSettings

PARAMS = GenerationParams(prompt="a desk setup with a monitor and a lamp", seed=7, steps=3, width=64, height=64)


def settings_for(tiny_models: Path, lora_dir: Path | None = None, **flags: Any) -> GeneratorSettings:
    """CPU settings for the tiny SDXL (``lora_dir`` defaults to the tiny LoRAs); ``flags`` are speed flags."""
    values = {"device": "cpu", **flags}
    return GeneratorSettings(model_id=str(tiny_models / "sdxl"), lora_dir=str(lora_dir or tiny_models / "loras"), **values)
