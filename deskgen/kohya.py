"""kohya_ss (sd-scripts) naming of SDXL LoRA keys, in one place.

The registry reads it to tell a file's layout (:mod:`deskgen.loras`); the tiny-model builder writes
tiny files with it and the full-size benchmark builds full-size key sets with it, so the files a test
loads are named exactly as the files in the wild.

    UNet:           lora_unet_ + the module in the original SGM block numbering, dots -> underscores
    text encoders:  lora_te1_ / lora_te2_ + ``text_model.<module>``, dots -> underscores
    tensors:        <key>.lora_down.weight [r, in], <key>.lora_up.weight [out, r], <key>.alpha (0-d)
"""

from __future__ import annotations

UNET_PREFIX = "lora_unet_"
TEXT_ENCODER_PREFIXES = {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
#: Every prefix a kohya key may start with (``lora_te_`` is SD 1.x's single text encoder).
PREFIXES = (UNET_PREFIX, "lora_te_", *TEXT_ENCODER_PREFIXES.values())
DOWN = ".lora_down.weight"
UP = ".lora_up.weight"
ALPHA = ".alpha"


def unet_name(diffusers_name: str, layers_per_block: int = 2) -> str:
    """A UNet attention module's kohya_ss name, in the original SGM block numbering.

    ``down_blocks.i.attentions.j`` -> ``input_blocks.{1+3i+j}.1``, ``mid_block.attentions.0`` ->
    ``middle_block.1``, ``up_blocks.i.attentions.j`` -> ``output_blocks.{3i+j}.1`` (3 = layers + 1:
    each SGM level also holds a down/upsampler), then dots become underscores:
    ``down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q`` ->
    ``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``.
    """
    parts = diffusers_name.split(".")
    per_level = layers_per_block + 1
    if parts[0] == "down_blocks" and parts[2] == "attentions":
        head, rest = f"input_blocks.{1 + per_level * int(parts[1]) + int(parts[3])}.1", parts[4:]
    elif parts[0] == "mid_block" and parts[1] == "attentions":
        head, rest = "middle_block.1", parts[3:]
    elif parts[0] == "up_blocks" and parts[2] == "attentions":
        head, rest = f"output_blocks.{per_level * int(parts[1]) + int(parts[3])}.1", parts[4:]
    else:
        raise ValueError(f"no SGM name for UNet module {diffusers_name!r}")
    return UNET_PREFIX + ".".join([head, *rest]).replace(".", "_")


def file_module_name(component: str, module_name: str) -> str:
    """A text-encoder module as LoRA files spell it: ``text_model.encoder.layers.0...``.

    transformers 5 flattened ``CLIPTextModel`` (``encoder.layers.0...``) but not
    ``CLIPTextModelWithProjection``; every SDXL LoRA trained so far names both encoders' modules
    ``text_model.…``. UNet names are returned unchanged."""
    if component in TEXT_ENCODER_PREFIXES and not module_name.startswith("text_model."):
        return "text_model." + module_name
    return module_name


def text_encoder_name(component: str, module_name: str) -> str:
    """``lora_te1_``/``lora_te2_`` + the module name as LoRA files spell it, dots -> underscores."""
    return TEXT_ENCODER_PREFIXES[component] + file_module_name(component, module_name).replace(".", "_")


def module_key(component: str, module_name: str, layers_per_block: int = 2) -> str:
    """The kohya key of one LoRA'd module of ``component`` (``unet``, ``text_encoder``, ``text_encoder_2``)."""
    if component == "unet":
        return unet_name(module_name, layers_per_block)
    return text_encoder_name(component, module_name)
