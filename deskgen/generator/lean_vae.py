"""A VAE decode with fewer full-resolution tensors alive at once, and the same bits.

At 1024 px the VAE decode is the generator's memory peak: its last blocks hold several 1024x1024 maps of
128-256 channels (256-512 MiB each in bfloat16) at once. diffusers' ``ResnetBlock2D`` keeps each
activation's input alive next to its output (``SiLU`` out of place), builds the residual sum in two new
tensors (``(input + hidden) / scale``), and every caller (the up-blocks' loops, ``Decoder.forward``)
keeps a block's input alive until the block returns. :func:`lean_decoder` changes that, computing the
same values:

- the decoder's resnets do ``silu_`` on the norm's fresh output, ``hidden.add_(shortcut)`` (addition
  commutes exactly) and ``div_`` only when the scale is not 1;
- the decoder's forward runs the up-blocks' resnets and upsamplers itself and hands each one its input
  through a list it pops (:func:`_owned_resnet`, :func:`_owned_upsample`), so an input is freed as soon
  as its last use is done: after ``conv_shortcut`` (computed before ``conv2`` instead of after; the
  same operation on the same tensor) or after the nearest-neighbour interpolation.

Same kernels, same operands: the same bits (tests/unit/test_lean_vae.py). On the full-size SDXL VAE at
1024 px in bfloat16, live tensors at the peak: 1.50 GiB with diffusers' forward, 1.25 GiB lean
(``python -m bench.vram``).

Only while no gradient is recorded (serving runs under ``torch.inference_mode``); with autograd on, the
original forwards run (in-place ops would break the backward pass).
"""

from __future__ import annotations

import types
from typing import Any


def lean_decoder(vae: Any) -> int:
    """Give ``vae.decoder``'s resnets the in-place forward and its final activation ``inplace``. Returns
    how many resnets changed (those without a time embedding, resampling or dropout in training)."""
    import torch
    from diffusers.models.resnet import ResnetBlock2D

    decoder = getattr(vae, "decoder", None)
    if decoder is None:
        return 0
    changed = 0
    for module in decoder.modules():
        if isinstance(module, ResnetBlock2D) and _eligible(module):
            module.forward = types.MethodType(_lean_forward, module)  # type: ignore[method-assign]
            changed += 1
    if isinstance(getattr(decoder, "conv_act", None), torch.nn.SiLU):
        decoder.conv_act.inplace = True  # applied to conv_norm_out's fresh output
    if all(hasattr(block, "resnets") and hasattr(block, "upsamplers") for block in decoder.up_blocks):
        decoder.forward = types.MethodType(_lean_decoder_forward, decoder)
    return changed


def _eligible(block: Any) -> bool:
    import torch

    return (
        block.time_emb_proj is None
        and block.upsample is None
        and block.downsample is None
        and isinstance(block.nonlinearity, torch.nn.SiLU)
        and isinstance(block.norm1, torch.nn.GroupNorm)
        and isinstance(block.norm2, torch.nn.GroupNorm)
    )


def _lean_forward(self: Any, input_tensor: Any, temb: Any = None, *args: Any, **kwargs: Any) -> Any:
    """``ResnetBlock2D.forward`` for a block without time embedding or resampling, in place where exact."""
    import torch

    if torch.is_grad_enabled() or temb is not None or args or kwargs or (self.training and self.dropout.p > 0):
        return type(self).forward(self, input_tensor, temb, *args, **kwargs)
    return _owned_resnet(self, [input_tensor])


def _owned_resnet(block: Any, holder: list[Any]) -> Any:
    """A lean resnet (:func:`_lean_forward`'s arithmetic) that pops its input from ``holder``, so the input
    is freed after its last use when the caller kept no other reference."""
    import torch.nn.functional as F

    x = holder.pop()
    hidden = F.silu(block.norm1(x), inplace=True)
    hidden = block.conv1(hidden)
    shortcut = block.conv_shortcut(x) if block.conv_shortcut is not None else x
    del x
    hidden = F.silu(block.norm2(hidden), inplace=True)
    hidden = block.conv2(block.dropout(hidden))
    hidden.add_(shortcut)  # == input + hidden, bit for bit (IEEE addition commutes)
    del shortcut
    if block.output_scale_factor != 1.0:
        hidden.div_(block.output_scale_factor)
    return hidden


def _owned_upsample(upsampler: Any, holder: list[Any]) -> Any:
    """``Upsample2D.forward`` (nearest x2, then its conv) popping its input from ``holder``; any other kind
    of upsampler is called as it is."""
    import torch.nn.functional as F

    x = holder.pop()
    plain = (upsampler.norm is None and not upsampler.use_conv_transpose and upsampler.interpolate
             and upsampler.use_conv and upsampler.name == "conv")  # fmt: skip
    if not plain:
        return upsampler(x)
    if x.shape[0] >= 64 or x.numel() * 2 > 2**31:  # as diffusers does, for large inputs
        x = x.contiguous()
    y = F.interpolate(x, scale_factor=2.0, mode="nearest")
    del x
    return upsampler.conv(y)


def _lean_decoder_forward(self: Any, sample: Any, latent_embeds: Any = None) -> Any:
    """``Decoder.forward`` running the up-blocks' resnets and upsamplers itself, each input handed over
    (popped) so that it dies with its last use."""
    import torch

    if torch.is_grad_enabled() or latent_embeds is not None:
        return type(self).forward(self, sample, latent_embeds)
    sample = self.conv_in(sample)
    sample = self.mid_block(sample, None)
    for up_block in self.up_blocks:
        for resnet in up_block.resnets:
            holder = [sample]
            del sample
            sample = _owned_resnet(resnet, holder) if _eligible(resnet) else resnet(holder.pop(), temb=None)
        for upsampler in up_block.upsamplers or ():
            holder = [sample]
            del sample
            sample = _owned_upsample(upsampler, holder)
    sample = self.conv_act(self.conv_norm_out(sample))
    return self.conv_out(sample)
