"""The in-place VAE decode (:mod:`deskgen.generator.lean_vae`): the same bits with fewer bytes alive.

The tiny SDXL's VAE decodes seeded latents with diffusers' forwards and with the lean ones; the images must
be identical bit for bit (float32 and bfloat16, contiguous and channels_last), and the peak of live
tensor bytes (bench/vram.py's dispatch mode, on real CPU tensors) lower. With autograd on, the original
forward runs."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from bench.vram import measure
from deskgen.generator.lean_vae import lean_decoder

pytestmark = pytest.mark.unit

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def tiny_vae(tiny_models: Path) -> Any:
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(tiny_models / "sdxl", subfolder="vae").eval()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_the_lean_decode_draws_the_same_bits_with_a_lower_peak(tiny_vae: Any, dtype: str, channels_last: bool) -> None:
    plain = copy.deepcopy(tiny_vae).to(getattr(torch, dtype))
    lean = copy.deepcopy(plain)
    if channels_last:
        plain.to(memory_format=torch.channels_last)
        lean.to(memory_format=torch.channels_last)
    changed = lean_decoder(lean)
    assert changed == sum(type(m).__name__ == "ResnetBlock2D" for m in lean.decoder.modules()) > 0
    assert "forward" in vars(lean.decoder)  # the up-blocks' loop, each input handed over
    # What the tiny VAE exercises: upsamplers, and a resnet that changes the channel count (conv_shortcut).
    blocks = lean.decoder.up_blocks
    assert any(b.upsamplers for b in blocks) and any(r.conv_shortcut is not None for b in blocks for r in b.resnets)
    gen = torch.Generator().manual_seed(5)
    latents = torch.randn(1, plain.config.latent_channels, 32, 32, generator=gen).to(getattr(torch, dtype))
    want_peak, _ = measure(lambda: plain.decode(latents).sample)
    got_peak, _ = measure(lambda: lean.decode(latents).sample)
    with torch.inference_mode():
        want = plain.decode(latents).sample
        got = lean.decode(latents).sample
    assert got.dtype == want.dtype and torch.equal(got, want)
    assert got_peak < want_peak


def test_with_autograd_on_the_original_forward_runs(tiny_vae: Any) -> None:
    """Training code that decodes with gradients gets diffusers' forward: a backward pass works and the
    gradients equal the unpatched model's."""
    plain = copy.deepcopy(tiny_vae)
    lean = copy.deepcopy(tiny_vae)
    lean_decoder(lean)
    latents = torch.randn(1, plain.config.latent_channels, 16, 16, generator=torch.Generator().manual_seed(6))
    grads = []
    for model in (plain, lean):
        z = latents.clone().requires_grad_(True)
        model.decode(z).sample.square().mean().backward()
        grads.append(z.grad)
    assert grads[0] is not None and torch.equal(grads[0], grads[1])


def test_the_generator_decodes_lean_by_default(tiny_models: Path) -> None:
    """``vae_inplace`` (on by default) patches the pipeline's VAE; off, it stays diffusers' own."""
    from deskgen.generator import DeskGenerator
    from tests.unit.generator_common import settings_for

    def patched(gen: Any) -> int:
        return sum("forward" in vars(m) for m in gen.pipe.vae.decoder.modules())

    assert patched(DeskGenerator.from_pretrained(settings_for(tiny_models))) > 0
    assert patched(DeskGenerator.from_pretrained(settings_for(tiny_models, vae_inplace=False))) == 0
