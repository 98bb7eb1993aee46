"""Fusing whatever mix the replica serves (issue 24, part 1): every switch restores the exact base weights
and adds the new mix in batched ops (:mod:`deskgen.generator.switching`), on the tiny SDXL.

The reference is diffusers' ``pipe.fuse_lora`` (peft's per-layer merge) of the same mix. The two differ
by float rounding only; :func:`weight_bound` derives how much, per weight element:

    Let u = 2**-24 (float32 unit roundoff), c_k = w_k * alpha_k / r_k, R = sum of the mix's ranks on the
    layer, K = its adapters there, and T = |W| + sum_k |c_k| (|B_k| @ |A_k|) (elementwise, in float64).
    peft computes W + D_1 + ... + D_K with D_k = fl(fl(B_k @ A_k) * c_k): each D_k within (r_k + 1) u
    |c_k||B_k||A_k| of exact, each of the K additions adding at most u T, so within (R + K + 1) u T of the
    exact W + sum_k c_k B_k A_k (to first order in u). The batched path computes W + (sum over the
    concatenated rank of fl(c_k B_k) A_k): one scaling (u), an R-term inner product (R u) and one
    addition (u), so within (R + 2) u T. Hence |batched - peft| <= (2R + K + 3) u T, and we assert the
    rounder 2 (R + K + 2) u T, elementwise.

The image follows from the weights: to first order its change is J dW with |dW| <= b (the bound above).
The probe perturbs the reference's fused weights by b with random signs (seeded) and measures the image
change; rounding errors are not aligned with J either and are, elementwise, well below b (the test
reports the ratio), so the batched image must lie within the probe's change of the reference image. The
bounds can fail: weights 5 % off (a wrong scale) exceed both.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from deskgen.errors import InvalidParameter
from deskgen.generator import DeskGenerator, GenerationParams, GeneratorSettings, peft_adapter_name
from deskgen.generator.adapters import LORA_COMPONENTS
from deskgen.generator.switching import CHUNK_ELEMENTS, BatchedFuser, MixSwitcher
from deskgen.mixes import Mix
from deskgen.tools.tiny_sdxl import one_torch_thread
from tests.unit.generator_common import settings_for

pytestmark = pytest.mark.unit

U = 2.0**-24  # float32 unit roundoff
PARAMS = GenerationParams(prompt="a desk setup with a monitor and a lamp", seed=11, steps=2, width=64, height=64)
MIXES = {
    1: Mix.from_weights({"ott": 0.7}),  # diffusers layout
    2: Mix.from_weights({"3d": 0.5, "ott": 0.7}),  # kohya + diffusers
    3: Mix.from_weights({"3d": 0.4, "dalle": 0.6, "ott": 0.4}),
}


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def batched(tiny_models: Path) -> DeskGenerator:
    """The default CPU generator: every mix fused, in batched ops."""
    return DeskGenerator.from_pretrained(settings_for(tiny_models))


@pytest.fixture(scope="module")
def reference(tiny_models: Path) -> tuple[DeskGenerator, MixSwitcher]:
    """A generator with unfused peft adapters, and diffusers' fuse_lora (the old fuse path) on its pipeline."""
    gen = DeskGenerator.from_pretrained(settings_for(tiny_models, fuse_active_mix=False))
    gen.ensure_adapters(["3d", "dalle", "ott"])
    return gen, MixSwitcher(gen.pipe, gen.adapters, backup="cpu", method="diffusers")


def base_weights(pipe: Any) -> dict[str, Any]:
    """Every non-LoRA tensor of the UNet and text encoders, by its name without peft's ``base_layer``."""
    out = {}
    for component in LORA_COMPONENTS:
        for key, value in getattr(pipe, component).state_dict().items():
            if "lora_" not in key:
                out[f"{component}.{key.replace('.base_layer', '')}"] = value.detach().clone()
    return out


def lora_layers(pipe: Any) -> dict[str, Any]:
    from peft.tuners.lora import LoraLayer

    return {
        f"{component}.{name}.weight": module
        for component in LORA_COMPONENTS
        for name, module in getattr(pipe, component).named_modules()
        if isinstance(module, LoraLayer)
    }


def abs_terms(layer: Any, peft: str) -> Any:
    """|B| @ |A| in the layout of the layer's weight, in float64."""
    weight = layer.get_base_layer().weight
    a, b = layer.lora_A[peft].weight.detach().double().abs(), layer.lora_B[peft].weight.detach().double().abs()
    return (b.flatten(1) @ a.flatten(1)).reshape(weight.shape)


def weight_bound(layers: dict[str, Any], mix: list[tuple[str, float]]) -> dict[str, Any]:
    """The module docstring's 2 (R + K + 2) u T per element, for every weight the mix (peft name, weight)
    adapts; call it while the weights hold their base values."""
    bounds = {}
    for key, layer in layers.items():
        present = [(peft, w) for peft, w in mix if peft in layer.lora_A]
        if not present:
            continue
        total = layer.get_base_layer().weight.detach().double().abs()
        for peft, w in present:
            total = total + abs(w * layer.lora_alpha[peft] / layer.r[peft]) * abs_terms(layer, peft)
        rank = sum(layer.r[peft] for peft, _ in present)
        bounds[key] = 2 * (rank + len(present) + 2) * U * total
    return bounds


def peft_mix(mix: Mix) -> list[tuple[str, float]]:
    return [(peft_adapter_name(name), w) for name, w in mix.weights]


def float_image(gen: DeskGenerator) -> np.ndarray:
    """The pipeline's float image for PARAMS with its weights as they are (no activation)."""
    import torch

    with gen.lock:
        out = gen.pipe(
            prompt=PARAMS.prompt, negative_prompt=PARAMS.negative_prompt, num_inference_steps=PARAMS.steps,
            guidance_scale=PARAMS.guidance, width=PARAMS.width, height=PARAMS.height, output_type="np",
            generator=torch.Generator("cpu").manual_seed(PARAMS.seed),
        )  # fmt: skip
    return np.asarray(out.images[0], dtype=np.float64)


# -- settings -------------------------------------------------------------------------------------


def test_fusing_every_mix_is_the_default_without_slots() -> None:
    assert GeneratorSettings(device="cpu").resolve().fuse_active_mix is True
    assert GeneratorSettings(device="cpu", hotswap=True).resolve().fuse_active_mix is False
    assert GeneratorSettings(device="cpu", fuse_active_mix=False).resolve().fuse_active_mix is False
    # CUDA: compiled, and every mix fused (no LoRA layer in the compiled UNet); slots only when asked for:
    # unfused mixes on a compiled UNet, or FP8.
    cuda = GeneratorSettings().resolve_for("cuda", "bfloat16")
    assert (cuda.compile, cuda.hotswap, cuda.fuse_active_mix) == (True, False, True)
    slots = GeneratorSettings(fuse_active_mix=False).resolve_for("cuda", "bfloat16")
    assert (slots.compile, slots.hotswap, slots.fuse_active_mix) == (True, True, False)
    eager = GeneratorSettings(compile=False, fuse_active_mix=False).resolve_for("cuda", "bfloat16")
    assert (eager.compile, eager.hotswap, eager.fuse_active_mix) == (False, False, False)
    assert GeneratorSettings(fp8=True).resolve_for("cuda", "bfloat16").fuse_active_mix is False
    # The old setting still parses: the hot mix is activated at load and its adapters stay loaded.
    assert GeneratorSettings(device="cpu", fuse_hot_mix="ott_3d").resolve().fuse_hot_mix == "3d:0.5+ott:0.7"


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"fuse_active_mix": "yes"}, "`fuse_active_mix` must be true, false or null but is 'yes'."),
        ({"fuse_active_mix": True, "fp8": True},
         "`fuse_active_mix` must be off (or null) when `fp8` is on: an FP8 weight cannot hold a fused LoRA delta exactly."),
        ({"fuse_active_mix": True, "hotswap": True},
         "`fuse_active_mix` needs `hotswap` off: hot-swap slots keep every LoRA branch apart, while fusing writes "
         "the mix into the base weights and keeps no LoRA layer."),
    ],
)  # fmt: skip
def test_fuse_active_mix_refuses_what_cannot_hold_a_fused_mix(flags: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidParameter) as info:
        GeneratorSettings(**flags)
    assert (info.value.field, info.value.message) == ("fuse_active_mix", message)


# -- exactness against diffusers' fuse_lora --------------------------------------------------------


@pytest.mark.parametrize("adapters", [1, 2, 3])
def test_batched_fuse_matches_fuse_lora_within_the_derived_bound(
    batched: DeskGenerator, reference: tuple[DeskGenerator, MixSwitcher], adapters: int
) -> None:
    import torch

    mix = MIXES[adapters]
    ref, legacy = reference
    ref.activate_mix(Mix(()))  # base weights: the bound reads |W| from them
    bounds = weight_bound(lora_layers(ref.pipe), peft_mix(mix))
    legacy.fuse(mix, {name: peft_adapter_name(name) for name in mix.adapters})
    try:
        assert batched.activate_mix(mix) > 0.0
        assert batched.fused_mix_id == mix.id
        want, got = base_weights(ref.pipe), base_weights(batched.pipe)
        assert want.keys() == got.keys()
        # Every adapted weight (the tiny LoRAs adapt 152 layers) and nothing else differs from the base.
        assert len(bounds) == 152
        ratios = []
        for key, value in got.items():
            if key not in bounds:
                assert torch.equal(value, want[key]), key
                continue
            diff = (value.double() - want[key].double()).abs()
            assert bool((diff <= bounds[key]).all()), f"{key}: {float(diff.max()):.3g} off"
            ratios.append(float((diff / bounds[key]).max()))
        print(f"{adapters} adapters: max |batched - fuse_lora| / bound = {max(ratios):.3g}")

        # The image: within what a perturbation of the reference's fused weights by +-bound moves it.
        ref_image = float_image(ref)
        image_diff = float(np.abs(float_image(batched) - ref_image).max())
        probe = probe_change(ref, bounds, ref_image)
        print(f"{adapters} adapters: image |batched - fuse_lora| = {image_diff:.3g}, probe bound = {probe:.3g}")
        assert image_diff <= probe
    finally:
        legacy.unfuse()


def probe_change(gen: DeskGenerator, bounds: dict[str, Any], image: np.ndarray, seeds: tuple[int, ...] = (0, 1)) -> float:
    """Max change of ``gen``'s float image when each bounded weight moves by its bound with random signs
    (the larger of two seeded draws); the weights are put back afterwards, bit for bit."""
    import torch

    layers = lora_layers(gen.pipe)
    saved = {key: layers[key].get_base_layer().weight.detach().clone() for key in bounds}
    change = 0.0
    try:
        for seed in seeds:
            signs = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for key, bound in bounds.items():
                    sign = torch.randint(0, 2, bound.shape, generator=signs).double() * 2 - 1
                    weight = layers[key].get_base_layer().weight
                    weight.copy_((saved[key].double() + bound * sign).to(weight.dtype))
            change = max(change, float(np.abs(float_image(gen) - image).max()))
    finally:
        with torch.no_grad():
            for key, value in saved.items():
                layers[key].get_base_layer().weight.copy_(value)
    return change


def test_the_bounds_catch_a_fuse_five_percent_off(
    batched: DeskGenerator, reference: tuple[DeskGenerator, MixSwitcher]
) -> None:
    import torch

    mix = MIXES[2]
    wrong = Mix.from_weights({name: 0.95 * w for name, w in mix.weights})
    ref, legacy = reference
    ref.activate_mix(Mix(()))
    bounds = weight_bound(lora_layers(ref.pipe), peft_mix(mix))
    legacy.fuse(mix, {name: peft_adapter_name(name) for name in mix.adapters})
    try:
        batched.activate_mix(wrong)
        got, want = base_weights(batched.pipe), base_weights(ref.pipe)
        outside = [k for k in bounds if not bool(((got[k].double() - want[k].double()).abs() <= bounds[k]).all())]
        assert len(outside) == len(bounds)
        ref_image = float_image(ref)
        assert float(np.abs(float_image(batched) - ref_image).max()) > probe_change(ref, bounds, ref_image)
    finally:
        legacy.unfuse()
        batched.activate_mix(Mix(()))
    assert all(torch.equal(v, want[k]) for k, v in base_weights(batched.pipe).items() if k not in bounds)


# -- switching: exact restore, no drift, no double counting ----------------------------------------


def test_switching_back_is_bit_identical_to_a_fresh_fuse_and_base_is_exact(
    tiny_models: Path, batched: DeskGenerator
) -> None:
    import torch

    a, b = MIXES[2], MIXES[3]
    fresh = DeskGenerator.from_pretrained(settings_for(tiny_models))
    pristine = base_weights(fresh.pipe)  # never loaded a LoRA
    base_image = fresh.generate(PARAMS, Mix(())).image.tobytes()
    fresh.activate_mix(a)
    fresh_a = base_weights(fresh.pipe)
    a_image = fresh.generate(PARAMS, a).image.tobytes()

    for _ in range(2):  # repeated cycles must not drift
        for mix in (a, b, MIXES[1], a):
            batched.activate_mix(mix)
        now = base_weights(batched.pipe)
        assert [k for k in now if not torch.equal(now[k], fresh_a[k])] == []
        assert batched.generate(PARAMS, a).image.tobytes() == a_image
        batched.activate_mix(b)
        base = batched.generate(PARAMS, Mix(()))
        assert batched.fused_mix_id is None and base.metadata["runtime"]["fused"] is False
        now = base_weights(batched.pipe)
        assert [k for k in now if not torch.equal(now[k], pristine[k])] == []
        assert base.image.tobytes() == base_image
    # All-zero weights are the base mix.
    assert batched.generate(PARAMS, Mix.from_weights({"ott": 0.0})).image.tobytes() == base_image


def test_a_fused_mix_keeps_no_lora_layer_and_draws_the_unfused_image(tiny_models: Path) -> None:
    """With every mix fused the pipeline holds no LoRA layer: after loading three adapters its modules are
    the very objects of the freshly loaded model (what a compiled UNet's graphs were traced on), and the
    fused weights alone draw the unfused mix's image (within half a grey level, as
    tests/unit/test_generator_speed.py bounds fusing). Control: the base image is far from it."""
    mix = MIXES[3]
    gen = DeskGenerator.from_pretrained(settings_for(tiny_models))
    modules = {c: dict(getattr(gen.pipe, c).named_modules()) for c in LORA_COMPONENTS}
    base = float_image(gen)
    result = gen.generate(PARAMS, mix)
    assert (result.metadata["runtime"]["fused"], result.metadata["runtime"]["fuse_active_mix"]) == (True, True)
    assert gen.adapters.kind == "fused" and gen.loaded_adapters() == set(mix.adapters)
    assert lora_layers(gen.pipe) == {}
    for component, before in modules.items():
        after = dict(getattr(gen.pipe, component).named_modules())
        assert after.keys() == before.keys() and all(after[k] is before[k] for k in before), component
        assert getattr(getattr(gen.pipe, component), "peft_config", None) is None
    unfused = DeskGenerator.from_pretrained(settings_for(tiny_models, fuse_active_mix=False))
    unfused.activate_mix(mix)
    assert unfused.fused_mix_id is None and lora_layers(unfused.pipe)
    want = float_image(unfused)
    assert float(np.abs(float_image(gen) - want).max()) < 0.5 / 255
    assert float(np.abs(base - want).max()) > 10 / 255


def test_loading_and_unloading_while_fused(tiny_models: Path) -> None:
    import torch

    gen = DeskGenerator.from_pretrained(settings_for(tiny_models, fuse_hot_mix="ott_3d", fuse_backup="device"))
    pristine = base_weights(DeskGenerator.from_pretrained(settings_for(tiny_models)).pipe)
    hot = MIXES[2]
    assert gen.fused_mix_id == hot.id  # activated at load
    hot_image = gen.generate(PARAMS, hot).image.tobytes()
    gen.ensure_adapters(["dalle"])  # a load never goes into fused layers: restored first
    assert gen.fused_mix_id is None
    assert all(torch.equal(v, pristine[k]) for k, v in base_weights(gen.pipe).items())
    assert gen.generate(PARAMS, MIXES[3]).metadata["runtime"]["fused"] is True
    assert gen.unload_adapters() == ["dalle"]  # the hot mix's adapters stay
    assert gen.active_mix_id == "base"
    assert gen.generate(PARAMS, hot).image.tobytes() == hot_image
    assert set(gen.switcher.batched.factors) == {"style_3d", "style_ott"}


def test_hotswap_keeps_its_slots_and_the_diffusers_fuse(tiny_models: Path) -> None:
    gen = DeskGenerator.from_pretrained(settings_for(tiny_models, hotswap=True, fuse_hot_mix="ott_3d"))
    assert (gen.describe()["fuse_active_mix"], gen.switcher.method) == (False, "diffusers")
    assert gen.fused_mix_id == MIXES[2].id
    assert gen.generate(PARAMS, MIXES[1]).metadata["runtime"]["fused"] is False


# -- convolutions and the per-layer fallback, on a toy model ---------------------------------------


def toy_model() -> Any:
    """Linear, 3x3 / 1x1 Conv2d, Conv1d and a fan_in_fan_out Conv1D (the fallback), two adapters of
    different ranks, the second lacking two layers (zero rows)."""
    import torch
    from peft import LoraConfig, inject_adapter_in_model
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    model = torch.nn.ModuleDict({
        "lin": torch.nn.Linear(8, 6), "lin2": torch.nn.Linear(8, 6), "conv3": torch.nn.Conv2d(4, 6, 3),
        "conv1": torch.nn.Conv2d(4, 6, 1), "conv1d": torch.nn.Conv1d(4, 5, 3), "gpt": Conv1D(6, 8),
    })  # fmt: skip
    everything = ["lin", "lin2", "conv3", "conv1", "conv1d", "gpt"]
    with warnings.catch_warnings():
        # peft sets fan_in_fan_out per layer kind itself, and warns about a second adapter: both meant here.
        warnings.filterwarnings("ignore", message="fan_in_fan_out is set to")
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        inject_adapter_in_model(LoraConfig(target_modules=everything, r=2, lora_alpha=3, init_lora_weights=False),
                                model, adapter_name="a")  # fmt: skip
        inject_adapter_in_model(LoraConfig(target_modules=["lin", "conv3", "conv1d", "gpt"], r=3, lora_alpha=5,
                                           init_lora_weights=False), model, adapter_name="b")  # fmt: skip
    return model


def test_convolutions_batch_and_other_layers_fall_back_to_peft() -> None:
    import torch
    from peft.tuners.lora import LoraLayer

    mix = [("a", 0.8), ("b", -0.6)]
    model, merged = toy_model(), toy_model()
    layers = {f"{n}.weight": m for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    bounds = weight_bound({k: v for k, v in layers.items() if k != "gpt.weight"}, mix)
    fuser = BatchedFuser(SimpleNamespace(unet=model))
    grouped = {peft: {g.shape: len(g.params) for g in fuser.add(peft).groups.values()} for peft in ("a", "b")}
    assert grouped == {
        "a": {(6, 8): 2, (6, 4, 3, 3): 1, (6, 4, 1, 1): 1, (5, 4, 3): 1},
        "b": {(6, 8): 1, (6, 4, 3, 3): 1, (5, 4, 3): 1},  # lin, not lin2: a zero row in the (6, 8) matmul
    }
    assert [param is model["gpt"].get_base_layer().weight for param, _ in fuser.factors["a"].single] == [True]
    with torch.no_grad():
        fuser.fuse(mix)
        for module in merged.modules():  # what diffusers' fuse_lora does: set_adapters, then merge
            if isinstance(module, LoraLayer):
                for peft, w in mix:
                    module.set_scale(peft, w)
                module.merge(adapter_names=[p for p, _ in mix if p in module.lora_A])
    got, want = model.state_dict(), merged.state_dict()
    for key, bound in bounds.items():
        name = key.replace(".weight", ".base_layer.weight")
        assert bool(((got[name].double() - want[name].double()).abs() <= bound).all()), key
    # The fallback sums peft's own deltas: the same terms, one addition order.
    gpt = "gpt.base_layer.weight"
    assert torch.allclose(got[gpt], want[gpt], rtol=0, atol=8 * U * float(want[gpt].abs().max()))
    assert not torch.equal(got[gpt], toy_model().state_dict()[gpt])


def test_a_grouped_convolution_is_refused() -> None:
    import torch
    from peft import LoraConfig, inject_adapter_in_model

    model = torch.nn.ModuleDict({"conv": torch.nn.Conv2d(4, 6, 3, groups=2)})
    with pytest.warns(UserWarning, match="groups > 1"):
        inject_adapter_in_model(LoraConfig(target_modules=["conv"], r=2, init_lora_weights=False), model, adapter_name="a")
    with pytest.raises(RuntimeError, match=r"^adapter 'a' cannot be fused: a grouped convolution"):
        BatchedFuser(SimpleNamespace(unet=model)).add("a")


def test_chunking_changes_no_bit(tiny_models: Path, batched: DeskGenerator) -> None:
    """The chunk size (memory cap of the batched matmul) only splits rows: the same bits."""
    import torch

    batched.activate_mix(MIXES[3])
    whole = base_weights(batched.pipe)
    batched.activate_mix(Mix(()))
    batched.switcher.batched.chunk_elements = 1000  # a few layers per matmul
    try:
        batched.activate_mix(MIXES[3])
        assert all(torch.equal(v, whole[k]) for k, v in base_weights(batched.pipe).items())
    finally:
        batched.switcher.batched.chunk_elements = CHUNK_ELEMENTS


# -- switching by residual: the exact base from the fused weights, minus the delta, plus 2 bits a weight ---


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_switching_by_residual_gives_the_bits_of_switching_by_copy(tiny_models: Path, dtype: str) -> None:
    """``fuse_backup: residual`` (the CUDA default) against ``cpu`` (a full copy put back): after every
    switch, through the base mix and back, both hold the same bits and draw the same image; every base
    tensor came back by residual, none from the copy, and the residual is smaller than what it replaces
    (the tiny LoRAs move their weights by far more than real ones, so ~20 % of the elements escape here;
    tests/unit/test_residual.py sizes it at a LoRA's usual strength)."""
    import torch

    by_copy = DeskGenerator.from_pretrained(settings_for(tiny_models, dtype=dtype, fuse_backup="cpu"))
    by_residual = DeskGenerator.from_pretrained(settings_for(tiny_models, dtype=dtype, fuse_backup="residual"))
    assert by_residual.switcher.by_residual and not by_copy.switcher.by_residual
    pristine = base_weights(by_residual.pipe)
    for mix in (MIXES[2], MIXES[3], MIXES[1], MIXES[2], Mix(()), MIXES[3], MIXES[3]):
        by_copy.activate_mix(mix)
        by_residual.activate_mix(mix)
        want, now = base_weights(by_copy.pipe), base_weights(by_residual.pipe)
        assert [k for k in now if not torch.equal(now[k], want[k])] == [], mix.id
    switcher = by_residual.switcher
    assert switcher.restored["copy"] == 0 and switcher.restored["residual"] > 0
    fused = switcher.fused
    assert fused is not None
    replaced = sum(p.numel() * p.element_size() for p in fused.params)
    assert 0 < switcher.residual_bytes() < replaced
    assert by_residual.generate(PARAMS, MIXES[3]).image.tobytes() == by_copy.generate(PARAMS, MIXES[3]).image.tobytes()
    by_residual.activate_mix(Mix(()))
    now = base_weights(by_residual.pipe)
    assert [k for k in now if not torch.equal(now[k], pristine[k])] == []


def test_a_residual_that_fails_its_checksum_comes_back_from_the_copy(tiny_models: Path) -> None:
    """Fault injection: one chunk's residual with a code flipped (its checksum no longer matches), another
    chunk's residual gone. The unfuse still restores the exact base: those chunks' tensors from the copy,
    the rest by residual."""
    import torch

    from deskgen.generator import residual

    gen = DeskGenerator.from_pretrained(settings_for(tiny_models, fuse_backup="residual"))
    pristine = base_weights(gen.pipe)
    gen.activate_mix(MIXES[3])
    switcher = gen.switcher
    assert len(switcher.residuals) >= 3
    (ids_flipped, flipped), (ids_gone, _) = switcher.residuals[0], switcher.residuals[1]
    zero = int(torch.nonzero(residual._unpack(flipped.packed, flipped.numel) == 0)[0])
    flipped.packed[zero // 4] |= 1 << (2 * (zero % 4))  # this element's key now comes back one too high
    del switcher.residuals[1]
    before = dict(switcher.restored)
    assert switcher.fused is not None
    total = len(switcher.fused.params)
    gen.activate_mix(Mix(()))
    now = base_weights(gen.pipe)
    assert [k for k in now if not torch.equal(now[k], pristine[k])] == []
    assert switcher.restored["copy"] - before["copy"] == len(ids_flipped) + len(ids_gone)
    assert switcher.restored["residual"] - before["residual"] == total - len(ids_flipped) - len(ids_gone)


def test_a_compiled_generator_switches_through_the_compiled_codec(tiny_models: Path) -> None:
    """With ``compile`` (as on a GPU) the residual's passes are compiled too, and switching through mixes
    and back to the base restores the exact base by residual. No generation: the UNet's own compile is
    not what this checks (``make test-gpu`` does)."""
    import torch

    gen = DeskGenerator.from_pretrained(
        settings_for(tiny_models, compile=True, fuse_backup="residual", compile_warmup_size=None)
    )
    assert gen.switcher.batched.codec.compiled
    pristine = base_weights(gen.pipe)
    for mix in (MIXES[3], MIXES[1], MIXES[2], Mix(())):
        gen.activate_mix(mix)
    now = base_weights(gen.pipe)
    assert [k for k in now if not torch.equal(now[k], pristine[k])] == []
    assert gen.switcher.restored["copy"] == 0 and gen.switcher.restored["residual"] > 0
    # Hot-swap slots fuse their hot mix with diffusers and restore it from a copy: no residual, no codec
    # compiled, whatever ``fuse_backup`` and ``compile`` say.
    slots = DeskGenerator.from_pretrained(
        settings_for(tiny_models, compile=True, hotswap=True, fuse_backup="residual", compile_warmup_size=None)
    )
    assert not slots.switcher.by_residual and not slots.switcher.batched.codec.compiled


def test_factors_kept_in_host_memory_fuse_the_same_bits(tiny_models: Path) -> None:
    """``lora_factors: host`` (CUDA's default with every mix fused): the loaded adapters' factors leave the
    weights' device, stacked per weight shape, and every switch (by residual too) gives the bits of
    factors kept beside the weights."""
    import torch

    kept = DeskGenerator.from_pretrained(settings_for(tiny_models, dtype="bfloat16", lora_factors="device"))
    host = DeskGenerator.from_pretrained(
        settings_for(tiny_models, dtype="bfloat16", lora_factors="host", fuse_backup="residual")
    )
    for mix in (MIXES[3], MIXES[1], Mix(()), MIXES[2], MIXES[3]):
        kept.activate_mix(mix)
        host.activate_mix(mix)
        want, now = base_weights(kept.pipe), base_weights(host.pipe)
        assert [k for k in now if not torch.equal(now[k], want[k])] == [], mix.id
    on_device, on_host = host.switcher.batched.factor_bytes()
    assert on_device == 0 and on_host == kept.switcher.batched.factor_bytes()[0] > 0
    assert kept.switcher.batched.factor_bytes()[1] == 0
    assert host.switcher.restored["copy"] == 0
