"""Pipeline-wide speed settings: attention processors, memory format, VAE decode, compilation."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from deskgen.generator.settings import GeneratorSettings

#: The UNet block classes ``compile_scope="blocks"`` compiles.
COMPILED_BLOCKS = ("BasicTransformerBlock", "ResnetBlock2D")


def optimise_pipeline(pipe: Any, runtime: GeneratorSettings) -> None:
    """Apply the pipeline-wide speed settings of ``runtime`` to a loaded pipeline (in place, idempotent).

    Attention processors, memory format and VAE decode settings; not LoRA state and not compilation,
    which :class:`DeskGenerator` owns.
    """
    import torch

    # 1. Attention: set the processor explicitly so what runs is what the metadata says.
    if runtime.attention != "default":
        from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

        processor = AttnProcessor2_0() if runtime.attention == "sdpa" else AttnProcessor()
        pipe.unet.set_attn_processor(processor)
        pipe.vae.set_attn_processor(processor)
    # 2. Memory format: NHWC convolutions (cuDNN's fast path for fp16/bf16 on tensor cores).
    if runtime.channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    # 3. VAE: SDXL's VAE overflows in float16; with force_upcast the pipeline decodes in float32 (it
    #    casts the VAE up before and back after each decode). bfloat16 has float32's range: no upcast.
    if runtime.dtype == "float16":
        pipe.vae.register_to_config(force_upcast=runtime.vae_upcast)
    if runtime.vae_tiling:
        pipe.vae.enable_tiling()
    if runtime.vae_slicing:
        pipe.vae.enable_slicing()
    if runtime.vae_inplace:
        from deskgen.generator.lean_vae import lean_decoder

        lean_decoder(pipe.vae)


def compile_unet(unet: Any, mode: str, scope: str) -> int:
    """``torch.compile`` the UNet (``scope="unet"``) or each of its :data:`COMPILED_BLOCKS` (``"blocks"``),
    in place and lazily (the first call per shape compiles). Returns the number of modules wrapped."""
    if scope == "unet":
        unet.compile(mode=mode)
        return 1
    import torch

    blocks = [m for m in unet.modules() if type(m).__name__ in COMPILED_BLOCKS]
    # Every compiled block runs through nn.Module._call_impl, one code object to dynamo: its cache must
    # hold one entry per block shape (SDXL: 2 transformer and ~15 resnet shapes), and static shapes keep
    # one specialised graph per shape instead of dynamic-shape kernels.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    for block in blocks:
        block.compile(mode=mode, dynamic=False)
    return len(blocks)

