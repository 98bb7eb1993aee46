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


def tiny_unet_inputs(unet: Any, dtype: Any, seed: int = 0) -> dict[str, Any]:
    """One UNet call's inputs for the tiny SDXL at 64 px (latents 8x8), CFG batch of 2, seeded, on the UNet's
    device (drawn on the CPU, so a seed gives the same inputs on every device)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    config = unet.config
    text_dim = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    inputs = {
        "sample": torch.randn(2, config.in_channels, 8, 8, generator=gen, dtype=dtype),
        "timestep": torch.tensor(float(torch.randint(1, 999, (1,), generator=gen)), dtype=dtype),
        "encoder_hidden_states": torch.randn(2, 7, config.cross_attention_dim, generator=gen, dtype=dtype),
        "added_cond_kwargs": {
            "text_embeds": torch.randn(2, text_dim, generator=gen, dtype=dtype),
            "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * 2, dtype=dtype),
        },
    }
    added = {key: value.to(unet.device) for key, value in inputs.pop("added_cond_kwargs").items()}
    return {**{key: value.to(unet.device) for key, value in inputs.items()}, "added_cond_kwargs": added}
