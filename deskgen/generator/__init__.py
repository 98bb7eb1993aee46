"""The generator stage: one SDXL pipeline, style LoRAs mixed onto it, images with their recipe attached.

Ray-free on purpose: ``deployments/generator.py`` wraps :class:`DeskGenerator` and adds multiplexing and
config; unit tests drive this class directly on the tiny models. The package, a file per responsibility:

- :mod:`~deskgen.generator.params` — what to draw (:class:`GenerationParams`) and the result;
- :mod:`~deskgen.generator.settings` — :class:`GeneratorSettings` (one type: asked for, and resolved)
  and the named :data:`SPEED_PROFILES`;
- :mod:`~deskgen.generator.optimise` — attention, memory format, VAE decode, compilation;
- :mod:`~deskgen.generator.adapters` — the LoRA strategies: peft adapters, or hot-swap slots;
- :mod:`~deskgen.generator.fusing` — a mix fused into the base weights, restored exactly;
- :mod:`~deskgen.generator.prompts` — prompts longer than CLIP's 77 tokens, in chunks, for both encoders;
- :mod:`~deskgen.generator.recipe` — the sampler (``scheduler``), the model revision and fp16 weights;
- :mod:`~deskgen.generator.core` — :class:`DeskGenerator`, which ties them together.

    gen = DeskGenerator.from_pretrained(GeneratorSettings(model_id="models/tiny/sdxl"))
    result = gen.generate(GenerationParams(prompt="a desk setup", width=64, height=64, steps=4), mix)
    result.png()  # PNG bytes with the metadata (seed, mix, adapter hashes, ...) in an iTXt chunk

Speed flags (fields of :class:`GeneratorSettings`, set per deployment in serve_config.yaml
``args.generator_options``; :meth:`GeneratorSettings.describe` gives their effective values, which every
image's metadata carries under ``runtime``):

- ``dtype``: bfloat16 on CUDA (float16 where bf16 is unsupported), float32 on CPU; float16 is optional
  (see ``vae_upcast``).
- ``attention`` = ``"sdpa"``: UNet + VAE attention. ``sdpa`` sets diffusers' ``AttnProcessor2_0`` (torch
  scaled_dot_product_attention: flash / memory-efficient kernels on CUDA) explicitly; ``eager`` the classic
  ``AttnProcessor`` (for comparison); ``default`` leaves what diffusers picked (SDPA on torch 2).
- ``channels_last``: on for CUDA, off on CPU. UNet and VAE convolutions in NHWC memory format.
- ``vae_upcast``: on for float16, else off. Decode with the VAE in float32 (``vae.config.force_upcast``;
  SDXL's VAE overflows to NaN / black images in float16); the pipeline casts the VAE up before and back
  after every decode. bfloat16 needs none: it has float32's range.
- ``vae_tiling`` / ``vae_slicing`` = off: decode in overlapping tiles (memory at large sizes; changes the
  pixels of images larger than the VAE's tile) / one image of a batch at a time (same pixels).
- ``vae_inplace`` = on: the VAE decoder's resnets compute in place where exact (a lower memory peak at
  1024 px, the same pixels; :mod:`deskgen.generator.lean_vae`).
- ``fuse_active_mix`` (= not ``hotswap``): whatever mix is active is fused into the base weights (base
  speed for every mix): a switch restores the exact base weights and adds the new mix's summed low-rank
  deltas in a few batched operations (:mod:`deskgen.generator.switching`), and the pipeline keeps no
  LoRA layer (:class:`~deskgen.generator.adapters.FusedAdapters`), compiled or not. False: peft's unfused
  branches (hot-swap slots with ``compile``).
- ``fuse_hot_mix`` = None: a mix loaded at start; without ``fuse_active_mix`` (slots) the one mix fused
  into the base weights while it is active; any other mix first restores the exact base weights.
  ``fuse_backup`` (= ``"residual"`` on CUDA with ``fuse_active_mix``, else ``"cpu"``): how a switch gets
  the exact base back: from the fused weights minus the recomputed delta plus a 2-bit correction per
  weight kept in host memory (:mod:`deskgen.generator.residual`), or from a full copy in pinned host
  memory (``"cpu"``) or on the GPU (``"device"``). ``lora_factors`` (= ``"host"`` on CUDA with
  ``fuse_active_mix``, else ``"device"``): where the loaded adapters' low-rank factors wait between
  switches (pinned host memory: no GPU memory per loaded adapter; a switch copies its mixes' factors over).
- ``compile``: on for CUDA, off on CPU. ``torch.compile`` (``compile_mode`` = ``"default"``) of the UNet's
  blocks (``compile_scope`` = ``"blocks"``: every transformer block and resnet; ``"unet"``: one graph),
  warmed up at load at ``compile_warmup_size`` = 1024 px. A fused mix changes weights in place, which
  the compiled graphs read as inputs: no recompile on a switch.
- ``hotswap`` (= ``fp8``, or ``compile`` without ``fuse_active_mix``): UNet LoRAs hot-swapped into ``hotswap_slots`` = 3 fixed slots
  padded to ``hotswap_rank`` (None: the largest adapter rank), so a compiled UNet never recompiles on a
  switch. The text encoders are not compiled: the text-encoder half of each LoRA loads the normal peft way.
- ``fp8`` = off: the UNet's token linears in float8 (:mod:`deskgen.fp8`); not with ``fuse_hot_mix``.
- ``deepcache_interval`` = None: DeepCache (:mod:`deskgen.deepcache`), an approximate speed tier that
  changes the image; never on by default, offered as the named profile ``deepcache``.

Why these defaults (measured on an H200 at 1024 px, 30 steps, BENCHMARKS.md "GPU suite"): bf16 has
fp32's range, so nothing overflows (no VAE upcast, no NaN guard) and it is as fast as fp16 on
Ampere/Hopper; SDPA is what torch 2 runs anyway, now explicit and reported; channels_last lets cuDNN
pick its NHWC convolution kernels. Unfused LoRA branches cost more than anything else (5.1 s/image
with two adapters vs 2.2 s fused: thousands of small kernels per step), so every mix is fused while it
is active (``fuse_active_mix``; until 2026-12 only the operator's ``fuse_hot_mix`` was). Compiling the blocks
took the fused mix from 2.19 to 1.78 s and hot-swapped mixes from 5.1 to 3.6 s, for a warm-up of
~15-50 s at replica start (before it takes traffic), so it is on for CUDA. FP8 halves the UNet's
linear weights (peak 7.1 GiB instead of 8.7-9.0) but its unfused slots keep it slow (4.7 s); DeepCache
every third step cut 1.78 s to 0.74 s at a measurable distance from the exact image.
"""

from deskgen.generator.adapters import LORA_COMPONENTS, peft_adapter_name
from deskgen.generator.core import WARMUP_PROMPT, WARMUP_STEPS, DeskGenerator
from deskgen.generator.optimise import COMPILED_BLOCKS, compile_unet, optimise_pipeline
from deskgen.generator.params import GenerationParams, GenerationResult, StepCallback
from deskgen.generator.recipe import SCHEDULERS
from deskgen.generator.settings import (
    ATTENTIONS,
    COMPILE_MODES,
    COMPILE_SCOPES,
    DEFAULT_LORA_DIR,
    DEFAULT_MODEL_ID,
    DTYPES,
    FUSE_BACKUPS,
    SPEED_PROFILES,
    GeneratorSettings,
    hot_mix_from_spec,
    settings_from_options,
)
from deskgen.limits import MAX_GUIDANCE, MAX_PROMPT_CHARS, MAX_SEED, MIN_GUIDANCE, SizeLimits
from deskgen.prompts.build import DEFAULT_NEGATIVE_PROMPT

__all__ = [
    "ATTENTIONS",
    "COMPILED_BLOCKS",
    "COMPILE_MODES",
    "COMPILE_SCOPES",
    "DEFAULT_LORA_DIR",
    "DEFAULT_MODEL_ID",
    "DEFAULT_NEGATIVE_PROMPT",
    "DTYPES",
    "FUSE_BACKUPS",
    "LORA_COMPONENTS",
    "MAX_GUIDANCE",
    "MAX_PROMPT_CHARS",
    "MAX_SEED",
    "MIN_GUIDANCE",
    "SCHEDULERS",
    "SPEED_PROFILES",
    "WARMUP_PROMPT",
    "WARMUP_STEPS",
    "DeskGenerator",
    "GenerationParams",
    "GenerationResult",
    "GeneratorSettings",
    "SizeLimits",
    "StepCallback",
    "compile_unet",
    "hot_mix_from_spec",
    "optimise_pipeline",
    "peft_adapter_name",
    "settings_from_options",
]
