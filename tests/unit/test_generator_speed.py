"""deskgen.generator speed flags on the tiny SDXL: settings, attention, memory format, VAE, the fused hot
mix (exact restore), hot-swap slots, and (gated) torch.compile without recompiles on a mix switch.

Every test here is ``unit`` except :func:`test_compiled_unet_does_not_recompile_on_mix_switches`: it is a
``gpu`` test that also runs on the CPU with ``DESKGEN_COMPILE_TESTS=1`` (the first compile of the tiny UNet
takes minutes on a busy 2-core machine, too long for the unit tier).
"""

from __future__ import annotations

import itertools
import os
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from deskgen.errors import AdapterUnavailable, InvalidParameter
from deskgen.generator import (
    DeskGenerator,
    GenerationParams,
    GenerationResult,
    GeneratorSettings,
    hot_mix_from_spec,
)
from deskgen.generator.adapters import SlotAdapters
from deskgen.mixes import Mix, MixCatalog
from deskgen.tools.tiny_sdxl import one_torch_thread
from tests.unit.generator_common import PARAMS, settings_for, tiny_unet_inputs

unit = pytest.mark.unit

HOT = "ott_3d"  # 3d:0.5+ott:0.7
MIXES = ["base", "dalle_only", "ott_3d", "mix", "dalle_ott"]


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def catalog() -> MixCatalog:
    return MixCatalog(["3d", "dalle", "ott"])


@pytest.fixture(scope="module")
def plain(tiny_models: Path) -> DeskGenerator:
    """A CPU generator on peft's adapter branches: one adapter per LoRA, nothing fused, nothing compiled
    (``fuse_active_mix: false``; the CPU default fuses the active mix, tests/unit/test_fused_switch.py)."""
    return DeskGenerator.from_pretrained(settings_for(tiny_models, fuse_active_mix=False))


@pytest.fixture(scope="module")
def reference(tiny_models: Path, catalog: MixCatalog) -> dict[str, bytes]:
    """Image bytes per mix from unfused generators; ``base`` from one that never loaded a LoRA."""
    fresh = DeskGenerator.from_pretrained(settings_for(tiny_models, fuse_active_mix=False))
    images = {"base": fresh.generate(PARAMS, Mix(())).image.tobytes()}
    for name in MIXES[1:]:
        images[name] = fresh.generate(PARAMS, catalog.resolve(name)).image.tobytes()
    return images


@pytest.fixture(scope="module")
def fused(tiny_models: Path) -> DeskGenerator:
    return DeskGenerator.from_pretrained(settings_for(tiny_models, fuse_hot_mix=HOT, fuse_active_mix=False))


@pytest.fixture(scope="module")
def hotswap(tiny_models: Path) -> DeskGenerator:
    return DeskGenerator.from_pretrained(settings_for(tiny_models, hotswap=True))


def pixels(result: GenerationResult) -> np.ndarray:
    return np.asarray(result.image, dtype=np.int16)


def base_weights(pipe: Any) -> dict[str, Any]:
    """Every non-LoRA tensor of the UNet and text encoders, by its name without peft's ``base_layer``."""
    out = {}
    for component in ("unet", "text_encoder", "text_encoder_2"):
        for key, value in getattr(pipe, component).state_dict().items():
            if "lora_" not in key:
                out[f"{component}.{key.replace('.base_layer', '')}"] = value
    return out


def changed(pipe: Any, reference: dict[str, Any]) -> list[str]:
    import torch

    now = base_weights(pipe)
    assert now.keys() == reference.keys()
    return sorted(k for k in reference if not torch.equal(now[k], reference[k]))


@pytest.fixture(scope="module")
def pristine_weights(tiny_models: Path) -> dict[str, Any]:
    fresh = DeskGenerator.from_pretrained(settings_for(tiny_models, fuse_active_mix=False))
    return {k: v.clone() for k, v in base_weights(fresh.pipe).items()}


# -- settings -------------------------------------------------------------------------------------


@unit
def test_cpu_defaults_are_the_safe_ones() -> None:
    assert GeneratorSettings(device="cpu").describe() == {
        "device": "cpu", "dtype": "float32", "attention": "sdpa", "channels_last": False, "vae_upcast": False,
        "vae_tiling": False, "vae_slicing": False, "vae_inplace": True, "fuse_hot_mix": None, "fuse_active_mix": True, "fuse_backup": "cpu", "lora_factors": "device", "compile": False,
        "compile_mode": "default", "compile_scope": "blocks", "hotswap": False, "hotswap_slots": 3,
        "hotswap_rank": None, "compile_warmup_size": 1024, "fp8": False, "deepcache_interval": None,
        "scheduler": "default", "fp16_variant": True,
    }  # fmt: skip


@unit
def test_cuda_defaults_resolve_without_a_gpu() -> None:
    bf16 = GeneratorSettings().resolve_for("cuda", "bfloat16")
    # Compiled blocks with every mix fused: what the H200 measurements chose (BENCHMARKS.md, GPU suite).
    assert (bf16.attention, bf16.channels_last, bf16.vae_upcast) == ("sdpa", True, False)
    assert (bf16.compile, bf16.compile_scope, bf16.hotswap, bf16.fuse_active_mix) == (True, "blocks", False, True)
    assert GeneratorSettings(compile=False).resolve_for("cuda", "bfloat16").compile is False
    fp16 = GeneratorSettings().resolve_for("cuda", "float16")
    assert fp16.vae_upcast is True  # SDXL's VAE overflows in float16
    assert GeneratorSettings(vae_upcast=False).resolve_for("cuda", "float16").vae_upcast is False  # fp16-fixed VAE
    assert GeneratorSettings(channels_last=False).resolve_for("cuda", "bfloat16").channels_last is False
    compiled = GeneratorSettings(compile=True, fuse_active_mix=False).resolve_for("cuda", "bfloat16")
    assert (compiled.compile, compiled.hotswap) == (True, True)
    # Every mix fused on a GPU: the base comes back by residual; the slots' fused hot mix by a pinned copy.
    assert (bf16.fuse_backup, compiled.fuse_backup) == ("residual", "cpu")
    assert (bf16.lora_factors, compiled.lora_factors) == ("host", "device")
    assert GeneratorSettings(fuse_backup="device").resolve_for("cuda", "bfloat16").fuse_backup == "device"
    # A switch by residual compiles its codec on CUDA even when the UNet is not compiled; on the CPU only
    # with ``compile`` (whether the switch is by residual is the switcher's rule: test_fused_switch.py).
    assert bf16.compile_residual_codec and compiled.compile_residual_codec
    assert GeneratorSettings(compile=False).resolve_for("cuda", "bfloat16").compile_residual_codec
    assert not GeneratorSettings(fuse_backup="residual").resolve_for("cpu", "float32").compile_residual_codec
    assert GeneratorSettings(fuse_backup="residual", compile=True).resolve_for("cpu", "float32").compile_residual_codec
    with pytest.raises(ValueError, match="resolved"):
        assert GeneratorSettings().compile_residual_codec  # raises: not resolved


@unit
@pytest.mark.parametrize(
    ("flags", "field", "message"),
    [
        ({"attention": "flash"}, "attention", "`attention` must be one of ['sdpa', 'eager', 'default'] but is 'flash'."),
        ({"dtype": "fp8"}, "dtype", "`dtype` must be one of ['float32', 'float16', 'bfloat16'] but is 'fp8'."),
        ({"channels_last": "yes"}, "channels_last", "`channels_last` must be true, false or null but is 'yes'."),
        ({"compile": 1}, "compile", "`compile` must be true, false or null but is 1."),
        ({"compile_scope": "layers"}, "compile_scope", "`compile_scope` must be one of ['unet', 'blocks'] but is 'layers'."),
        ({"fp8": "on"}, "fp8", "`fp8` must be true or false but is 'on'."),
        ({"fp8": True, "hotswap": False}, "hotswap",
         "`hotswap` must be on (or null) when `fp8` is on: peft cannot add adapters to FP8 layers, so LoRAs go "
         "into slots built before the conversion."),
        ({"fp8": True, "fuse_hot_mix": "ott_3d"}, "fuse_hot_mix",
         "`fuse_hot_mix` must be null when `fp8` is on: an FP8 weight cannot hold a fused LoRA delta exactly."),
        ({"deepcache_interval": 1}, "deepcache_interval", "`deepcache_interval` must be in [2, 10] but is 1."),
        ({"deepcache_interval": 3.0}, "deepcache_interval", "`deepcache_interval` must be an integer but is 3.0."),
        ({"deepcache_interval": 3, "compile": True, "compile_scope": "unet"}, "deepcache_interval",
         "`deepcache_interval` needs `compile_scope: blocks` when `compile` is on: DeepCache switches the UNet's "
         "own forward between two paths per step, so only its blocks can be compiled."),
        ({"compile_mode": "fast"}, "compile_mode",
         "`compile_mode` must be one of ['default', 'reduce-overhead', 'max-autotune', 'max-autotune-no-cudagraphs'] "
         "but is 'fast'."),
        ({"fuse_backup": "disk"}, "fuse_backup", "`fuse_backup` must be one of ['residual', 'cpu', 'device'] but is 'disk'."),
        ({"lora_factors": "gpu"}, "lora_factors", "`lora_factors` must be one of ['host', 'device'] but is 'gpu'."),
        ({"hotswap_slots": 0}, "hotswap_slots", "`hotswap_slots` must be in [1, 16] but is 0."),
        ({"hotswap_rank": 2.5}, "hotswap_rank", "`hotswap_rank` must be an integer but is 2.5."),
        ({"compile_warmup_size": 100}, "compile_warmup_size", "`compile_warmup_size` must be a multiple of 8 but is 100."),
        ({"compile": True, "hotswap": False, "fuse_active_mix": False}, "hotswap",
         "`compile` needs every mix fused (`fuse_active_mix`) or hot-swap slots (`hotswap`): a compiled UNet "
         "with one peft adapter per LoRA recompiles on every mix switch."),
        ({"fuse_hot_mix": "nope"}, "fuse_hot_mix",
         "`fuse_hot_mix` must name a built-in mix ['3d_only', 'dalle_3d', 'dalle_only', 'dalle_ott', 'mix', "
         "'ott_3d', 'ott_only'] or be `adapter:weight+...` but is 'nope'."),
        ({"fuse_hot_mix": "base"}, "fuse_hot_mix",
         "`fuse_hot_mix`: the base mix has nothing to fuse; leave it null instead of 'base'."),
        ({"fuse_hot_mix": "ott:0"}, "fuse_hot_mix", "`fuse_hot_mix`: every weight of 'ott:0' is 0, so there is nothing to fuse."),
        ({"fuse_hot_mix": "ott:3"}, "fuse_hot_mix", "`fuse_hot_mix`: the weight of 'ott' must be in [0, 2] but is 3."),
    ],
)  # fmt: skip
def test_bad_flags_raise_precise_errors(flags: dict[str, Any], field: str, message: str) -> None:
    with pytest.raises(InvalidParameter) as info:
        GeneratorSettings(**flags)
    assert (info.value.field, info.value.message) == (field, message)


@unit
def test_vae_upcast_is_refused_where_it_means_nothing() -> None:
    with pytest.raises(InvalidParameter, match=r"^`vae_upcast` applies to float16 only but is True with dtype 'bfloat16'\.$"):
        GeneratorSettings(vae_upcast=True).resolve_for("cuda", "bfloat16")
    with pytest.raises(InvalidParameter, match=r"^`vae_upcast` applies to float16 only but is True with dtype 'float32'\.$"):
        GeneratorSettings(device="cpu", vae_upcast=True).resolve()


@unit
def test_hot_mix_spec_is_canonical() -> None:
    assert hot_mix_from_spec("ott_3d").id == "3d:0.5+ott:0.7"
    assert hot_mix_from_spec(" ott:0.70+3d:.5 ").id == "3d:0.5+ott:0.7"
    assert GeneratorSettings(device="cpu", fuse_hot_mix="ott:0.7+3d:0.5").describe()["fuse_hot_mix"] == "3d:0.5+ott:0.7"


@unit
def test_a_hot_mix_with_an_unknown_adapter_fails_at_load(tiny_models: Path) -> None:
    with pytest.raises(InvalidParameter) as info:
        DeskGenerator.from_pretrained(settings_for(tiny_models, fuse_hot_mix="ott:0.5+nope:1"))
    assert info.value.field == "fuse_hot_mix"
    assert info.value.message == "`fuse_hot_mix`: unknown adapter 'nope'; available adapters are ['3d', 'dalle', 'ott']."


@unit
def test_metadata_carries_the_effective_flags(plain: DeskGenerator) -> None:
    meta = plain.generate(PARAMS, Mix(())).metadata
    assert meta["runtime"] == {**plain.describe(), "fused": False}


# -- attention, memory format, VAE ----------------------------------------------------------------


@unit
def test_sdpa_is_explicit_and_what_torch2_runs_anyway(
    tiny_models: Path, plain: DeskGenerator, reference: dict[str, bytes]
) -> None:
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    for model in (plain.pipe.unet, plain.pipe.vae):
        assert {type(p) for p in model.attn_processors.values()} == {AttnProcessor2_0}
    default = DeskGenerator.from_pretrained(settings_for(tiny_models, attention="default"))
    assert default.generate(PARAMS, Mix(())).image.tobytes() == reference["base"]
    eager = DeskGenerator.from_pretrained(settings_for(tiny_models, attention="eager"))
    for model in (eager.pipe.unet, eager.pipe.vae):
        assert {type(p) for p in model.attn_processors.values()} == {AttnProcessor}
    # Another kernel, the same maths: the 8-bit image differs by at most one grey level.
    diff = np.abs(pixels(eager.generate(PARAMS, Mix(()))) - np.asarray(plain.generate(PARAMS, Mix(())).image, np.int16))
    assert diff.max() <= 1


@unit
def test_channels_last_is_applied_and_deterministic(tiny_models: Path, reference: dict[str, bytes]) -> None:
    import torch

    gen = DeskGenerator.from_pretrained(settings_for(tiny_models, channels_last=True))
    for model in (gen.pipe.unet, gen.pipe.vae):
        convs = [m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.weight.shape[-1] > 1]
        assert convs and all(w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous() for w in convs)
    first = gen.generate(PARAMS, Mix.from_weights({"ott": 1.0}))
    assert gen.generate(PARAMS, Mix(())).image.tobytes() == gen.generate(PARAMS, Mix(())).image.tobytes()
    assert gen.generate(PARAMS, Mix.from_weights({"ott": 1.0})).image.tobytes() == first.image.tobytes()
    base = np.frombuffer(gen.generate(PARAMS, Mix(())).image.tobytes(), np.uint8).astype(np.int16)
    assert np.abs(base - np.frombuffer(reference["base"], np.uint8).astype(np.int16)).max() <= 1


@unit
def test_float16_forces_the_vae_upcast_and_decodes_without_nans(tiny_models: Path) -> None:
    import torch

    gen = DeskGenerator.from_pretrained(settings_for(tiny_models, dtype="float16"))
    assert gen.pipe.vae.config.force_upcast is True
    assert gen.describe()["vae_upcast"] is True
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        image = pixels(gen.generate(GenerationParams(prompt="a desk", steps=2, width=64, height=64), Mix(())))
    assert image.std() > 1.0  # a NaN decode comes out as a flat (black) image
    assert not [w for w in seen if "upcast_vae" in str(w.message)]  # diffusers' own call, not deskgen's: not shown
    assert gen.pipe.vae.dtype == torch.float16  # the pipeline casts it back after the decode
    fixed = DeskGenerator.from_pretrained(settings_for(tiny_models, dtype="float16", vae_upcast=False))
    assert fixed.pipe.vae.config.force_upcast is False


@unit
def test_vae_tiling_and_slicing_flags(tiny_models: Path) -> None:
    gen = DeskGenerator.from_pretrained(settings_for(tiny_models, vae_tiling=True, vae_slicing=True))
    assert (gen.pipe.vae.use_tiling, gen.pipe.vae.use_slicing) == (True, True)
    params = GenerationParams(prompt="a desk", steps=2, width=128, height=96)
    first = gen.generate(params, Mix(()))
    assert first.image.size == (128, 96)
    assert gen.generate(params, Mix(())).image.tobytes() == first.image.tobytes()


# -- the fused hot mix ----------------------------------------------------------------------------


@unit
def test_peft_unfuse_alone_drifts(tiny_models: Path, pristine_weights: dict[str, Any]) -> None:
    """Why the generator keeps exact copies: fuse + unfuse by subtraction does not give W back, even in fp32."""
    gen = DeskGenerator.from_pretrained(settings_for(tiny_models, fuse_active_mix=False))
    gen.activate_mix(Mix.from_weights({"ott": 0.7, "3d": 0.5}))
    gen.pipe.fuse_lora(components=["unet"], adapter_names=["style_ott", "style_3d"])
    gen.pipe.unfuse_lora(components=["unet"])
    assert len(changed(gen.pipe, pristine_weights)) == 136  # every fused UNet layer is off by an ulp or so


@unit
def test_the_hot_mix_is_fused_at_load(fused: DeskGenerator, plain: DeskGenerator) -> None:
    assert fused.fused_mix_id == "3d:0.5+ott:0.7" == fused.active_mix_id
    assert fused.loaded_adapters() == {"3d", "ott"}
    assert fused.switcher.fused is not None and fused.switcher.fused.method == "batched"
    assert fused.describe()["fuse_hot_mix"] == "3d:0.5+ott:0.7"
    result = fused.generate(PARAMS, Mix.from_weights({"ott": 0.7, "3d": 0.5}))
    assert result.metadata["runtime"]["fused"] is True
    assert result.metadata["timings"]["activate_s"] == 0.0  # already active, already fused


#: How far the fused image may be from the unfused one, in the [0, 1] float image: half a grey level.
#: Fusing changes only the fp32 summation order (W' = W + s*B@A rounded once instead of W x + s*B(A(x))),
#: which moved the tiny model's image by 1e-6 to 1.2e-4 (by machine and build); a wrong fuse moves it by
#: far more (the test below).
FUSE_BOUND = 0.5 / 255


def float_image(gen: DeskGenerator, mix: Mix) -> np.ndarray:
    """The pipeline's float image (before PNG rounding) for PARAMS and ``mix``."""
    import torch

    with gen.lock:
        gen.activate_mix(mix)
        out = gen.pipe(
            prompt=PARAMS.prompt, negative_prompt=PARAMS.negative_prompt, num_inference_steps=PARAMS.steps,
            guidance_scale=PARAMS.guidance, width=64, height=64, output_type="np",
            generator=torch.Generator("cpu").manual_seed(PARAMS.seed),
        )  # fmt: skip
    return np.asarray(out.images[0], dtype=np.float64)


@unit
def test_fused_hot_mix_matches_the_unfused_mix(fused: DeskGenerator, plain: DeskGenerator, catalog: MixCatalog) -> None:
    """Fused and unfused differ by summation order only: at most one grey level in the PNG and
    :data:`FUSE_BOUND` in floats."""
    hot = catalog.resolve(HOT)
    fused_result = fused.generate(PARAMS, hot)
    unfused_result = plain.generate(PARAMS, hot)
    assert (fused_result.metadata["runtime"]["fused"], unfused_result.metadata["runtime"]["fused"]) == (True, False)
    assert np.abs(pixels(fused_result) - pixels(unfused_result)).max() <= 1

    float_diff = np.abs(float_image(fused, hot) - float_image(plain, hot)).max()
    assert fused.fused_mix_id == hot.id
    assert float_diff < FUSE_BOUND, f"max abs difference fused vs unfused in the [0, 1] image: {float_diff:.3g}"


@unit
def test_a_fuse_five_percent_off_fails_the_bound(tiny_models: Path, plain: DeskGenerator, catalog: MixCatalog) -> None:
    """The bound can fail: the real fuse path given the hot mix's weights 5 % low (a wrong scale, as a
    fuse that forgot alpha/rank would be far worse) is outside :data:`FUSE_BOUND` of the unfused mix."""
    hot = catalog.resolve(HOT)
    wrong = Mix.from_weights({name: 0.95 * weight for name, weight in hot.as_dict().items()})
    broken = DeskGenerator.from_pretrained(settings_for(tiny_models, fuse_hot_mix=wrong.id, fuse_active_mix=False))
    diff = np.abs(float_image(broken, wrong) - float_image(plain, hot)).max()
    assert broken.fused_mix_id == wrong.id
    assert diff > FUSE_BOUND, f"a 5 % scale error moved the image by only {diff:.3g}"


@unit
def test_fuse_then_other_mix_then_base_is_bit_identical_to_never_fused(
    fused: DeskGenerator,
    catalog: MixCatalog,
    reference: dict[str, bytes],
    pristine_weights: dict[str, Any],
) -> None:
    hot = catalog.resolve(HOT)
    hot_image = fused.generate(PARAMS, hot).image.tobytes()
    for _ in range(3):  # repeated cycles must not drift
        assert fused.fused_mix_id == hot.id
        other = fused.generate(PARAMS, catalog.resolve("dalle_ott"))
        assert fused.fused_mix_id is None
        assert other.image.tobytes() == reference["dalle_ott"]
        base = fused.generate(PARAMS, Mix(()))
        assert base.image.tobytes() == reference["base"]
        assert changed(fused.pipe, pristine_weights) == []  # restored exactly, not by subtraction
        again = fused.generate(PARAMS, hot)
        assert again.metadata["runtime"]["fused"] is True
        assert again.image.tobytes() == hot_image
    # All-zero weights are the base mix: unfused, base bytes.
    zero = fused.generate(PARAMS, Mix.from_weights({"ott": 0.0, "3d": 0.0}))
    assert zero.image.tobytes() == reference["base"]
    assert fused.fused_mix_id is None


@unit
def test_loading_or_unloading_while_fused_restores_first(
    tiny_models: Path, catalog: MixCatalog, reference: dict[str, bytes], pristine_weights: dict[str, Any]
) -> None:
    gen = DeskGenerator.from_pretrained(settings_for(tiny_models, fuse_hot_mix=HOT, fuse_backup="device", fuse_active_mix=False))
    hot = catalog.resolve(HOT)
    hot_image = gen.generate(PARAMS, hot).image.tobytes()
    gen.ensure_adapters(["dalle"])  # a load never goes into fused layers
    assert gen.fused_mix_id is None
    assert changed(gen.pipe, pristine_weights) == []
    assert gen.generate(PARAMS, hot).image.tobytes() == hot_image  # re-fused on use
    assert gen.fused_mix_id == hot.id
    # The hot mix's adapters are pinned: unloading keeps them, and the fused state with them.
    assert gen.unload_adapters() == ["dalle"]
    assert gen.loaded_adapters() == {"3d", "ott"}
    assert gen.generate(PARAMS, hot).image.tobytes() == hot_image
    assert gen.generate(PARAMS, Mix(())).image.tobytes() == reference["base"]


@unit
def test_switching_away_restores_and_back_refuses(fused: DeskGenerator, catalog: MixCatalog) -> None:
    assert fused.activate_mix(catalog.resolve("dalle_only")) > 0.0
    assert fused.fused_mix_id is None
    assert fused.activate_mix(catalog.resolve(HOT)) > 0.0
    assert fused.fused_mix_id == catalog.resolve(HOT).id
    assert fused.activate_mix(catalog.resolve(HOT)) == 0.0


# -- hot-swap slots (what a compiled UNet runs; here without compiling) ---------------------------


def graph_state(gen: DeskGenerator) -> list[tuple[Any, ...]]:
    """What torch.compile's guards see in the UNet's LoRA layers: it must not change on a mix switch."""
    from peft.tuners.lora import LoraLayer

    state = []
    for name, module in gen.pipe.unet.named_modules():
        if isinstance(module, LoraLayer):
            layer: Any = module
            scalings = tuple((k, type(v).__name__, id(v)) for k, v in sorted(layer.scaling.items()))
            weights = tuple(
                (k, id(layer.lora_A[k].weight), tuple(layer.lora_A[k].weight.shape)) for k in sorted(layer.lora_A)
            )
            state.append((name, tuple(layer.active_adapters), layer.disable_adapters, layer.merged, scalings, weights))
    return state


def assert_same_as_peft(image: bytes, reference: bytes, mix: Mix, name: str) -> None:
    """Hot-swap slots against peft's own adapters. With at most one adapter active, zero-padded rank,
    tensor scales and 0-scale slots change no bit (CPU fp32). With several, the slots add their LoRA
    branches in slot order, peft in adapter order: float addition is not associative, so a pixel may
    differ by one grey level (seen on 1 of 4096 pixels with one set of tiny LoRAs, none with another)."""
    if len(mix.adapters) <= 1:
        assert image == reference, name
    else:
        diff = np.abs(np.frombuffer(image, np.uint8).astype(int) - np.frombuffer(reference, np.uint8).astype(int))
        assert diff.max() <= 1, (name, int(diff.max()))


@unit
def test_hotswap_slots_match_peft_adapters(
    hotswap: DeskGenerator, catalog: MixCatalog, reference: dict[str, bytes]
) -> None:
    before = graph_state(hotswap)
    assert len(before) == 136 and all(s[4][0][1] == "Tensor" for s in before)
    for name in [*MIXES, "base", "dalle_ott", "ott_only"]:
        result = hotswap.generate(PARAMS, catalog.resolve(name))
        if name in reference:
            assert_same_as_peft(result.image.tobytes(), reference[name], catalog.resolve(name), name)
        assert graph_state(hotswap) == before, f"LoRA layer state changed on switching to {name}"
    assert result.metadata["runtime"]["hotswap"] is True
    assert hotswap.describe()["hotswap_rank"] == 4  # the tiny LoRAs' rank
    assert hotswap.loaded_adapters() == {"3d", "dalle", "ott"}


@unit
def test_hotswap_switch_back_is_identical_and_scale_only(hotswap: DeskGenerator, catalog: MixCatalog) -> None:
    first = hotswap.generate(PARAMS, catalog.resolve("mix")).image.tobytes()
    assert isinstance(hotswap.adapters, SlotAdapters)
    holds = dict(hotswap.adapters.slots.holds)
    assert sorted(h for h in holds.values() if h is not None) == ["3d", "dalle", "ott"]
    hotswap.generate(PARAMS, catalog.resolve("dalle_only"))
    hotswap.generate(PARAMS, Mix(()))
    assert hotswap.generate(PARAMS, catalog.resolve("mix")).image.tobytes() == first
    assert hotswap.adapters.slots.holds == holds  # every adapter stayed in its slot


@unit
def test_hotswap_refuses_a_mix_larger_than_its_slots(tiny_models: Path, catalog: MixCatalog) -> None:
    gen = DeskGenerator.from_pretrained(settings_for(tiny_models, hotswap=True, hotswap_slots=2))
    with pytest.raises(InvalidParameter) as info:
        gen.generate(PARAMS, catalog.resolve("mix"))
    assert info.value.field == "mix"
    assert info.value.message == (
        "`mix` '3d:0.4+dalle:0.6+ott:0.4' has 3 adapters but this generator holds at most 2 at once (`hotswap_slots`)."
    )
    assert gen.loaded_adapters() == set()
    ott_3d = gen.generate(PARAMS, catalog.resolve("ott_3d"))
    assert ott_3d.metadata["mix_id"] == "3d:0.5+ott:0.7"
    # Swapping dalle in evicts one of them from its slot; the image is still exact.
    gen.generate(PARAMS, catalog.resolve("dalle_ott"))
    assert gen.generate(PARAMS, catalog.resolve("ott_3d")).image.tobytes() == ott_3d.image.tobytes()


@unit
def test_hotswap_rank_too_small_is_refused(tiny_models: Path) -> None:
    with pytest.raises(InvalidParameter) as info:
        DeskGenerator.from_pretrained(settings_for(tiny_models, hotswap=True, hotswap_rank=2))
    assert info.value.field == "hotswap_rank"
    assert info.value.message == (
        "`hotswap_rank` must be at least the rank of every adapter but is 2; ['3d', 'dalle', 'ott'] have rank 4."
    )


@unit
def test_hotswap_refuses_an_adapter_outside_the_slot_layout(tiny_models: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "loras"
    folder.mkdir()
    shutil.copy(tiny_models / "loras" / "ott.safetensors", folder / "ott.safetensors")
    gen = DeskGenerator.from_pretrained(settings_for(tiny_models, folder, hotswap=True))
    # Added after the slots were laid out, and adapting a feed-forward layer no slot has.
    tensors = load_file(str(tiny_models / "loras" / "dalle.safetensors"))
    extra = "lora_unet_input_blocks_4_1_transformer_blocks_0_ff_net_2"
    tensors[f"{extra}.lora_down.weight"] = tensors["lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight"][:, :1].repeat(1, 128).clone()
    tensors[f"{extra}.lora_up.weight"] = tensors["lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_up.weight"].clone()
    tensors[f"{extra}.alpha"] = tensors["lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.alpha"].clone()
    save_file(tensors, str(folder / "wide.safetensors"))
    # The request's adapter cannot be used on this replica: a 422 naming it and why, not a 500.
    with pytest.raises(AdapterUnavailable, match=r"adapter 'wide' is unavailable: LoRA 'wide' adapts 1 UNet layers \(e\.g\. down_blocks\.1\.attentions\.0\.transformer_blocks\.0\.ff\.net\.2\) that the hot-swap LoRA slots do not have"):
        gen.generate(PARAMS, Mix.from_weights({"wide": 1.0}))
    assert gen.loaded_adapters() == set()
    assert gen.generate(PARAMS, Mix.from_weights({"ott": 1.0})).metadata["mix_id"] == "ott:1.0"


@unit
def test_hotswap_unload_falls_back_to_base(
    tiny_models: Path, catalog: MixCatalog, reference: dict[str, bytes]
) -> None:
    gen = DeskGenerator.from_pretrained(settings_for(tiny_models, hotswap=True))
    mix = catalog.resolve("dalle_ott")
    assert gen.generate(PARAMS, mix).image.tobytes() == reference["dalle_ott"]
    assert gen.unload_adapters(keep=["ott"]) == ["dalle"]
    assert gen.active_mix_id == "base"
    assert gen.generate(PARAMS, Mix(())).image.tobytes() == reference["base"]
    assert gen.generate(PARAMS, mix).image.tobytes() == reference["dalle_ott"]  # reloaded, same image
    assert sorted(gen.unload_adapters()) == ["dalle", "ott"]
    assert gen.unload_adapters() == []
    assert gen.generate(PARAMS, Mix(())).image.tobytes() == reference["base"]


@unit
def test_hotswap_with_a_fused_hot_mix(
    tiny_models: Path, catalog: MixCatalog, reference: dict[str, bytes], pristine_weights: dict[str, Any]
) -> None:
    gen = DeskGenerator.from_pretrained(settings_for(tiny_models, hotswap=True, fuse_hot_mix=HOT))
    hot = catalog.resolve(HOT)
    assert gen.fused_mix_id == hot.id
    hot_image = gen.generate(PARAMS, hot).image.tobytes()
    assert np.abs(
        np.frombuffer(hot_image, np.uint8).astype(np.int16) - np.frombuffer(reference[HOT], np.uint8).astype(np.int16)
    ).max() <= 1
    mix = catalog.resolve("mix")
    assert_same_as_peft(gen.generate(PARAMS, mix).image.tobytes(), reference["mix"], mix, "mix")
    assert gen.generate(PARAMS, Mix(())).image.tobytes() == reference["base"]
    assert changed(gen.pipe, pristine_weights) == []
    assert gen.generate(PARAMS, hot).image.tobytes() == hot_image


# -- torch.compile (gpu tier; on the CPU with DESKGEN_COMPILE_TESTS=1) ----------------------------


def _compile_tests_enabled() -> bool:
    import torch

    return torch.cuda.is_available() or os.environ.get("DESKGEN_COMPILE_TESTS") == "1"


@pytest.mark.gpu
@pytest.mark.timeout(1800)
@pytest.mark.parametrize(
    ("scope", "hot", "fused"),
    # Production's configuration first (blocks, every mix fused): a device call that runs out of time
    # still answers for what is deployed.
    [("blocks", None, True), ("unet", None, True), ("blocks", None, False), ("blocks", HOT, False),
     ("unet", None, False), ("unet", HOT, False)],
    ids=["blocks-fused", "unet-fused", "blocks-slots", "blocks-slots-hot", "unet-slots", "unet-slots-hot"],
)  # fmt: skip
def test_compiled_unet_does_not_recompile_on_mix_switches(
    tiny_models: Path, catalog: MixCatalog, tmp_path: Path, scope: str, hot: str | None, fused: bool
) -> None:
    """Compile at the load-time warm-up (scope ``unet``: one graph, a second for the fused state with a
    hot mix in slots; ``blocks``: one graph per block shape, and its fused variants), then switch through
    mixes: no new graph, no recompile, the same bytes for the same mix, the same function as eager.
    ``fused`` (the default): every mix fused, no LoRA layer in the compiled UNet, and a LoRA file added
    after the start with twice the rank and more layers (``wider``) loads and generates without a
    recompile either. Measured on the 2-core CPU: warm-up 90-150 s (cold inductor cache ~230 s)."""
    if not _compile_tests_enabled():
        pytest.skip("needs CUDA, or DESKGEN_COMPILE_TESTS=1 to compile on the CPU (minutes)")
    import torch
    import torch._dynamo
    from torch._dynamo.utils import counters

    from deskgen.tools.tiny_sdxl import write_lora_variant

    device = "cuda" if torch.cuda.is_available() else "cpu"
    loras = tmp_path / "loras"
    shutil.copytree(tiny_models / "loras", loras)
    # The eager reference computes the same function: fused mixes for fused, unfused slots otherwise.
    eager = DeskGenerator.from_pretrained(settings_for(tiny_models, loras, device=device, hotswap=not fused))
    slots = {} if fused else {"fuse_active_mix": False}
    settings = settings_for(tiny_models, loras, device=device, compile=True, compile_scope=scope,
                            compile_warmup_size=64, fuse_hot_mix=hot, **slots)  # fmt: skip
    graphs_before = counters["stats"]["unique_graphs"]
    gen = DeskGenerator.from_pretrained(settings)
    assert gen.adapters.kind == ("fused" if fused else "hotswap")
    assert counters["stats"]["unique_graphs"] > 0
    if scope == "unet":
        # The whole UNet is one graph (no graph break); fusing flips peft's "merged" flags: a second graph.
        # (Fewer when an earlier test in this process compiled the same graph: dynamo reuses it.)
        assert counters["stats"]["unique_graphs"] <= graphs_before + (1 if hot is None else 2)
        assert hasattr(gen.pipe.unet, "_compiled_call_impl") or hasattr(gen.pipe.unet, "_orig_mod")
    else:
        blocks = [m for m in gen.pipe.unet.modules() if type(m).__name__ in ("BasicTransformerBlock", "ResnetBlock2D")]
        assert blocks and all(getattr(m, "_compiled_call_impl", None) is not None for m in blocks)
        assert getattr(gen.pipe.unet, "_compiled_call_impl", None) is None
    assert gen.warmup_s is not None
    assert gen.fused_mix_id == (None if hot is None else catalog.resolve(hot).id)
    seen: dict[str, bytes] = {}
    with torch._dynamo.config.patch(error_on_recompile=True):
        for name in ["base", "dalle_only", "ott_3d", "mix", "ott_only", "base", "ott_3d", "dalle_3d", "mix"]:
            before = counters["stats"]["unique_graphs"]
            result = gen.generate(PARAMS, catalog.resolve(name))
            assert counters["stats"]["unique_graphs"] == before, f"switching to {name} compiled a new graph"
            assert result.metadata["runtime"]["fused"] is (name == hot or (fused and name != "base"))
            image = result.image.tobytes()
            if name in seen:
                assert image == seen[name], f"{name} changed after switching away and back"
            seen[name] = image
    assert len(set(seen.values())) == len(seen)  # every mix still looks different
    if gen.switcher.by_residual:  # CUDA's default: every switch put the base back by residual, exactly
        assert gen.switcher.batched.codec.compiled
        assert gen.switcher.restored["copy"] == 0 and gen.switcher.restored["residual"] > 0
    if fused:
        # A file added after the start, wider than every adapter the replica knew: no recompile either.
        write_lora_variant("wider", tiny_models / "loras", loras / "wider.safetensors")
        wider = Mix.from_weights({"wider": 0.6, "ott": 0.4})
        with torch._dynamo.config.patch(error_on_recompile=True):
            before = counters["stats"]["unique_graphs"]
            image = gen.generate(PARAMS, wider).image.tobytes()
            assert counters["stats"]["unique_graphs"] == before, "a new LoRA compiled a new graph"
            assert image not in seen.values()
            assert gen.generate(PARAMS, catalog.resolve("ott_only")).image.tobytes() == seen["ott_only"]
    # The same function as eager, for every mix. In float32 other kernels round differently and the random
    # tiny UNet (LoRA branches far larger than the layers they adapt) amplifies that (measured on the
    # 2-core CPU: most mixes bit-identical, dalle_only up to 1e-1 relative at the UNet output, an
    # amplification of ~1e6 over float32's 1e-7); in float64 the same amplification leaves 1e-11 to 2e-8
    # with slots (measured), and a wrong mix or scale differs by more than 1e-2 (asserted below). Fused
    # weights are far larger than the base ones in this tiny model, and the compiled kernels' other
    # summation order leaves up to 3e-6 (measured on the 2-core CPU): 1e-4 for fused mixes, still two
    # orders of magnitude below the nearest other mix.
    tolerance = 1e-4 if fused else 1e-6
    outputs: dict[str, Any] = {}
    eager_unet, compiled_unet = eager.pipe.unet, gen.pipe.unet
    inputs = tiny_unet_inputs(eager_unet, torch.float64)
    eager_unet.double()
    compiled_unet.double()
    try:
        for name in ["base", "dalle_only", "ott_only", "mix", *(["wider"] if fused else [])]:
            mix = wider if name == "wider" else catalog.resolve(name)
            eager.activate_mix(mix)
            gen.activate_mix(mix)
            if name == hot:
                continue  # fused weights: another rounding of the same sum, checked in float32 above
            with torch.no_grad():
                want = eager_unet(**inputs, return_dict=False)[0]
                got = compiled_unet(**inputs, return_dict=False)[0]
            assert float((got - want).abs().max() / want.abs().mean()) < tolerance, name
            outputs[name] = want
    finally:
        eager_unet.float()
        compiled_unet.float()
    for a, b in itertools.combinations(outputs, 2):  # the check can fail: any other mix is far off
        assert float((outputs[a] - outputs[b]).abs().max() / outputs[b].abs().mean()) > 1e-2, (a, b)
    if hot is None and isinstance(gen.adapters, SlotAdapters):
        # Control (the check can fail): diffusers' set_adapters turns the scale tensors back into floats.
        from torch._dynamo.exc import RecompileError

        gen.pipe.unet.set_adapters(gen.adapters.slots.names, [0.0] * len(gen.adapters.slots.names))
        with torch._dynamo.config.patch(error_on_recompile=True), pytest.raises(RecompileError):
            gen.generate(PARAMS, catalog.resolve("mix"))


# -- named speed profiles -------------------------------------------------------------------------


@unit
def test_speed_profiles_expand_under_the_deployment_options() -> None:
    from deskgen.generator import SPEED_PROFILES, settings_from_options

    assert settings_from_options({}) == GeneratorSettings()
    assert settings_from_options({"speed_profile": "exact", "fuse_hot_mix": "dalle_ott"}).fuse_hot_mix == "dalle_ott"
    cached = settings_from_options({"speed_profile": "deepcache", "fuse_hot_mix": "dalle_ott"})
    assert (cached.deepcache_interval, cached.fuse_hot_mix) == (3, "dalle_ott")
    assert settings_from_options({"speed_profile": "deepcache", "deepcache_interval": 2}).deepcache_interval == 2
    fp8 = settings_from_options({"speed_profile": "fp8"})
    assert (fp8.fp8, fp8.fuse_hot_mix) == (True, None)
    assert "exact" in SPEED_PROFILES and all(isinstance(v, dict) for v in SPEED_PROFILES.values())
    for name in SPEED_PROFILES:  # every profile is a valid setting on its own
        settings_from_options({"speed_profile": name}).resolve_for("cuda", "bfloat16")


@unit
@pytest.mark.parametrize(
    ("options", "field", "message"),
    [
        ({"speed_profile": "turbo"}, "speed_profile",
         "`speed_profile` must be one of ['deepcache', 'exact', 'fp8', 'fp8_deepcache'] but is 'turbo'."),
        ({"speed_profile": "fp8", "fuse_hot_mix": "ott_3d"}, "fuse_hot_mix",
         "`fuse_hot_mix` must be null when `fp8` is on: an FP8 weight cannot hold a fused LoRA delta exactly."),
    ],
)  # fmt: skip
def test_bad_speed_profiles_raise(options: dict[str, Any], field: str, message: str) -> None:
    from deskgen.generator import settings_from_options

    with pytest.raises(InvalidParameter) as info:
        settings_from_options(options)
    assert (info.value.field, info.value.message) == (field, message)


@unit
def test_an_unknown_option_names_itself() -> None:
    from deskgen.generator import settings_from_options

    with pytest.raises(InvalidParameter) as info:
        settings_from_options({"compile_scop": "blocks"})
    assert info.value.field == "compile_scop"
    assert info.value.message.startswith("`compile_scop` is not a generator setting; the settings are [")
