"""deskgen.fp8 on the CPU (``torch._scaled_mm`` has a CPU kernel): the FP8 linear's numerics, which UNet
layers are converted, and a tiny-SDXL generator with FP8 layers under hot-swapped LoRA slots."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from deskgen.fp8 import E4M3_MAX, Fp8Linear, quantize_unet_linears
from deskgen.generator import DeskGenerator
from deskgen.mixes import Mix, MixCatalog
from deskgen.tools.tiny_sdxl import one_torch_thread
from tests.unit.generator_common import PARAMS, settings_for

unit = pytest.mark.unit

#: e4m3 keeps 3 mantissa bits: a value rounds to within 2**-4 of itself (relative). A matmul of two such
#: roundings has a relative (Frobenius) error of at most about that, far less on average.
E4M3_RELATIVE_STEP = 2.0**-4


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    with one_torch_thread():
        yield


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float(torch.linalg.norm(out.detach().double() - ref.detach().double()) / torch.linalg.norm(ref.detach().double()))


@unit
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fp8_linear_computes_the_linear_within_e4m3_precision(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    linear = torch.nn.Linear(64, 48)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(48, 64, generator=gen) * (1 + seed))
        linear.bias.copy_(torch.randn(48, generator=gen))
    x = torch.randn(2, 5, 64, generator=gen) * 10 ** (seed - 1)  # any scale: the row scales absorb it
    fp8 = Fp8Linear.from_linear(linear)
    out = fp8(x)
    ref = linear(x)
    assert out.shape == ref.shape == (2, 5, 48)
    assert out.dtype == torch.float32 and bool(torch.isfinite(out).all())
    err = relative_error(out - linear.bias, ref - linear.bias)
    assert 0 < err < E4M3_RELATIVE_STEP, err
    # The stored weight is float8 with one scale per output channel, and dequantises to the weight.
    assert fp8.weight_fp8.dtype == torch.float8_e4m3fn and fp8.weight_scale.shape == (1, 48)
    assert float(fp8.weight_fp8.float().abs().max()) <= E4M3_MAX
    assert relative_error(fp8.dequantized_weight(), linear.weight.detach()) < E4M3_RELATIVE_STEP / 2


@unit
def test_fp8_linear_keeps_zero_rows_exact() -> None:
    linear = torch.nn.Linear(32, 16, bias=False)
    x = torch.zeros(3, 32)
    x[1] = torch.randn(32)
    out = Fp8Linear.from_linear(linear)(x)
    assert bool((out[0] == 0).all()) and bool((out[2] == 0).all())  # a zero row is not a NaN (amax clamped)
    assert bool(torch.isfinite(out).all())


def _tiny_unet(tiny_models: Path) -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(str(tiny_models / "sdxl" / "unet"))


@unit
def test_quantize_converts_the_token_linears_and_nothing_else(tiny_models: Path) -> None:
    unet = _tiny_unet(tiny_models)
    linears = {name: m for name, m in unet.named_modules() if isinstance(m, torch.nn.Linear)}
    total = sum(p.numel() for p in unet.parameters())
    report = quantize_unet_linears(unet)
    converted = {name for name, m in unet.named_modules() if isinstance(m, Fp8Linear)}
    assert converted and report.layers == len(converted)
    assert all(".transformer_blocks." in n or n.endswith(("proj_in", "proj_out")) for n in converted)
    # Cross-attention keys/values read the 77 text tokens: left in the model's dtype, like the embeddings.
    assert not any(n.endswith(("attn2.to_k", "attn2.to_v")) for n in converted)
    assert not any(n.startswith(("time_embedding", "add_embedding")) for n in converted)
    assert any(n.endswith("attn2.to_k") for n in linears)
    assert report.params == sum(linears[n].weight.numel() for n in converted)
    assert report.unet_params == total and 0 < report.fraction < 1
    assert quantize_unet_linears(unet).layers == 0  # idempotent


@pytest.fixture(scope="module")
def fp8_gen(tiny_models: Path) -> DeskGenerator:
    return DeskGenerator.from_pretrained(settings_for(tiny_models, fp8=True))


@unit
def test_fp8_generator_keeps_lora_slots_around_fp8_base_layers(fp8_gen: DeskGenerator) -> None:
    from peft.tuners.lora import LoraLayer

    assert fp8_gen.runtime.hotswap and fp8_gen.runtime.fp8
    assert fp8_gen.fp8_report is not None and fp8_gen.fp8_report.layers > 0
    wrapped = [m for m in fp8_gen.pipe.unet.modules() if isinstance(m, LoraLayer)]
    assert wrapped and any(isinstance(m.get_base_layer(), Fp8Linear) for m in wrapped)


@unit
def test_fp8_generator_switches_mixes_deterministically(fp8_gen: DeskGenerator) -> None:
    catalog = MixCatalog(["3d", "dalle", "ott"])
    images = {}
    for name in ["ott_3d", "dalle_ott", "base", "ott_3d"]:
        result = fp8_gen.generate(PARAMS, catalog.resolve(name) if name != "base" else Mix(()))
        assert result.metadata["runtime"]["fp8"] is True
        pixels = np.asarray(result.image)
        assert pixels.std() > 0
        if name in images:
            assert np.array_equal(images[name], pixels), f"{name} changed after switching away and back"
        images[name] = pixels
    assert not np.array_equal(images["ott_3d"], images["dalle_ott"])
    assert not np.array_equal(images["ott_3d"], images["base"])
