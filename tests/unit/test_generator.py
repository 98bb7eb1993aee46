"""deskgen.generator.DeskGenerator on the tiny SDXL + tiny LoRAs: determinism, mixes, errors, metadata."""

from __future__ import annotations

import hashlib
import math
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from deployments.http_errors import status_of
from deskgen.errors import AdapterUnavailable, InvalidParameter, ModelFilesMissing, UnknownMix
from deskgen.generator import (
    DEFAULT_NEGATIVE_PROMPT,
    DeskGenerator,
    GenerationParams,
    GenerationResult,
    GeneratorSettings,
    SizeLimits,
    peft_adapter_name,
)
from deskgen.mixes import NAMED_MIXES, Mix, MixCatalog
from deskgen.pngmeta import read_png_metadata
from deskgen.tools.tiny_sdxl import one_torch_thread
from tests.unit.generator_common import PARAMS, settings_for

pytestmark = pytest.mark.unit



@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    # Tiny models gain nothing from threads, and on a busy CPU two OpenMP threads ran ~50x slower.
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def gen(tiny_models: Path) -> DeskGenerator:
    return DeskGenerator.from_pretrained(settings_for(tiny_models))


@pytest.fixture(scope="module")
def catalog(gen: DeskGenerator) -> MixCatalog:
    return MixCatalog(gen.available_adapters())


@pytest.fixture(scope="module")
def pristine_base(tiny_models: Path) -> bytes:
    """The base image from a generator that never loaded a LoRA (its layers were never wrapped)."""
    fresh = DeskGenerator.from_pretrained(settings_for(tiny_models))
    result = fresh.generate(PARAMS, Mix(()))
    assert fresh.loaded_adapters() == set()
    return result.png(timings=False)


def _values(tensor: Any) -> tuple[float, ...]:
    return tuple(tensor.detach().flatten().tolist())


def pixels(result: GenerationResult) -> np.ndarray:
    return np.asarray(result.image, dtype=np.int16)


# -- the tiny pipeline ----------------------------------------------------------------------------


def test_tiny_tokenizers_match_their_text_encoders(gen: DeskGenerator) -> None:
    pipe = gen.pipe
    for tokenizer, encoder in ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)):
        config = encoder.config
        assert (len(tokenizer), tokenizer.model_max_length) == (config.vocab_size, 77)
        assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (
            config.bos_token_id, config.eos_token_id, config.pad_token_id,
        )  # fmt: skip
        ids = tokenizer("a desk setup with a monitor").input_ids
        assert tokenizer.convert_ids_to_tokens(ids) == [
            "<|startoftext|>", "a</w>", "desk</w>", "setup</w>", "with</w>", "a</w>", "monitor</w>", "<|endoftext|>",
        ]  # fmt: skip
    assert pipe.vae_scale_factor == 8
    assert pipe.unet.config.addition_embed_type == "text_time"
    assert pipe.unet.config.layers_per_block == 2  # kohya's SGM block numbering relies on it


# -- determinism and mixes ------------------------------------------------------------------------


def test_same_seed_and_mix_give_identical_bytes_after_switching(gen: DeskGenerator, catalog: MixCatalog) -> None:
    mix = catalog.resolve("dalle_ott")
    first = gen.generate(PARAMS, mix)
    other = gen.generate(PARAMS, catalog.resolve("3d_only"))
    again = gen.generate(PARAMS, mix)
    assert first.png(timings=False) == again.png(timings=False)
    assert first.png(timings=False) != other.png(timings=False)
    # Another seed is another image.
    assert gen.generate(GenerationParams(**{**vars(PARAMS), "seed": 8}), mix).image.tobytes() != first.image.tobytes()


def test_every_named_mix_gives_a_different_image(gen: DeskGenerator, catalog: MixCatalog) -> None:
    images = {name: gen.generate(PARAMS, catalog.resolve(name)).image.tobytes() for name in [*NAMED_MIXES, "base"]}
    assert len(set(images.values())) == len(images)


def test_a_mix_switch_visibly_changes_the_image(gen: DeskGenerator, catalog: MixCatalog) -> None:
    base = pixels(gen.generate(PARAMS, catalog.resolve("base")))
    for name in ("dalle_only", "ott_only", "3d_only", "mix"):
        change = np.abs(pixels(gen.generate(PARAMS, catalog.resolve(name))) - base).mean()
        assert change > 5.0, f"{name} changes the image by only {change:.2f} grey levels"


def test_base_mix_is_bit_identical_to_a_generator_without_loras(
    gen: DeskGenerator, catalog: MixCatalog, pristine_base: bytes
) -> None:
    gen.ensure_adapters(["dalle", "ott", "3d"])
    gen.activate_mix(catalog.resolve("mix"))
    assert gen.generate(PARAMS, catalog.resolve("base")).png(timings=False) == pristine_base
    # A mix whose weights are all 0 is the base mix.
    zero = Mix.from_weights({"dalle": 0.0, "ott": 0.0, "3d": 0.0})
    assert zero.id == "base"
    assert gen.generate(PARAMS, zero).png(timings=False) == pristine_base
    assert gen.active_mix_id == "base"


@pytest.mark.parametrize(("name", "layout"), [("dalle", "kohya"), ("3d", "kohya"), ("ott", "diffusers")])
def test_kohya_and_diffusers_adapters_load_whole_and_change_the_output(
    gen: DeskGenerator, name: str, layout: str, pristine_base: bytes
) -> None:
    from safetensors.torch import load_file

    assert gen.registry.layout(name) == layout
    result = gen.generate(PARAMS, Mix.from_weights({name: 1.0}))
    assert result.png(timings=False) != pristine_base
    # Every (down, up) pair of the file sits, unchanged, among the low-rank factors the generator keeps for
    # this adapter (every mix is fused: the pipeline holds no LoRA layer), one pair per adapted layer, and
    # there is no pair the file lacks: nothing was dropped or duplicated on conversion.
    factors = gen.adapters.factors[peft_adapter_name(name)]
    assert factors.single == []
    in_pipe = sorted((_values(a), _values(b)) for g in factors.groups.values() for a, b in zip(g.a, g.b, strict=True))
    assert len({id(p) for p in factors.params}) == len(in_pipe)
    tensors = load_file(str(gen.registry.path(name)))
    pairs = {
        ".lora_down.weight": ".lora_up.weight",  # kohya
        ".lora_A.weight": ".lora_B.weight",  # diffusers / peft
    }
    in_file = sorted(
        (_values(t), _values(tensors[k.removesuffix(down) + up]))
        for k, t in tensors.items()
        for down, up in pairs.items()
        if k.endswith(down)
    )
    assert in_pipe == in_file
    assert len(in_file) == gen.registry.module_count(name)


def test_weights_scale_the_effect(gen: DeskGenerator) -> None:
    base = pixels(gen.generate(PARAMS, Mix(())))
    half = np.abs(pixels(gen.generate(PARAMS, Mix.from_weights({"ott": 0.5}))) - base).mean()
    full = np.abs(pixels(gen.generate(PARAMS, Mix.from_weights({"ott": 1.0}))) - base).mean()
    assert 0 < half < full


# -- state: loading, switching, unloading ---------------------------------------------------------


def test_switching_mixes_never_reloads_the_base(gen: DeskGenerator, catalog: MixCatalog) -> None:
    before = DeskGenerator.base_loads
    for name in ("dalle_only", "mix", "base", "ott_3d", "dalle_only"):
        gen.activate_mix(catalog.resolve(name))
        assert gen.active_mix_id == catalog.resolve(name).id
    gen.generate(PARAMS, catalog.resolve("dalle_3d"))
    assert DeskGenerator.base_loads == before
    assert gen.activate_mix(catalog.resolve("dalle_3d")) == 0.0  # already active: nothing to do


def test_adapters_load_lazily_once(tiny_models: Path) -> None:
    before = DeskGenerator.base_loads
    fresh = DeskGenerator.from_pretrained(settings_for(tiny_models))
    assert DeskGenerator.base_loads == before + 1
    assert fresh.available_adapters() == ["3d", "dalle", "ott"]
    assert fresh.loaded_adapters() == set()
    fresh.activate_mix(Mix.from_weights({"ott": 0.5}))
    assert fresh.loaded_adapters() == {"ott"}
    fresh.ensure_adapters(["ott", "3d"])
    assert fresh.loaded_adapters() == {"ott", "3d"}


def test_unload_adapters_is_idempotent_and_falls_back_to_base(
    tiny_models: Path, catalog: MixCatalog, pristine_base: bytes
) -> None:
    fresh = DeskGenerator.from_pretrained(settings_for(tiny_models))
    mix = catalog.resolve("dalle_ott")
    before = fresh.generate(PARAMS, mix).png(timings=False)
    assert fresh.unload_adapters(keep=["ott"]) == ["dalle"]
    assert fresh.unload_adapters(keep=["ott"]) == []
    assert fresh.loaded_adapters() == {"ott"}
    assert fresh.active_mix_id == "base"  # its mix lost an adapter
    assert fresh.generate(PARAMS, Mix(())).png(timings=False) == pristine_base
    # Reloading the deleted adapter gives the same image as before.
    assert fresh.generate(PARAMS, mix).png(timings=False) == before
    assert sorted(fresh.unload_adapters()) == ["dalle", "ott"]
    assert fresh.unload_adapters() == []
    assert fresh.generate(PARAMS, Mix(())).png(timings=False) == pristine_base


def test_unloading_an_inactive_adapter_keeps_the_active_mix(tiny_models: Path) -> None:
    fresh = DeskGenerator.from_pretrained(settings_for(tiny_models))
    ott = Mix.from_weights({"ott": 1.0})
    expected = fresh.generate(PARAMS, ott).png(timings=False)
    fresh.ensure_adapters(["dalle"])
    assert fresh.unload_adapters(keep=["ott"]) == ["dalle"]
    assert fresh.active_mix_id == "ott:1.0"
    assert fresh.generate(PARAMS, ott).png(timings=False) == expected


def test_adapter_names_are_public_names_whatever_peft_needs(tiny_models: Path, tmp_path: Path) -> None:
    # "my-style" has a hyphen, "training" is an attribute of torch modules: both must work, and a copy
    # of a file must give exactly the image of the original.
    folder = tmp_path / "loras"
    folder.mkdir()
    for target in ("ott", "my-style", "training"):
        shutil.copy(tiny_models / "loras" / "ott.safetensors", folder / f"{target}.safetensors")
    fresh = DeskGenerator.from_pretrained(settings_for(tiny_models, folder))
    reference = fresh.generate(PARAMS, Mix.from_weights({"ott": 0.8})).image.tobytes()
    for name in ("my-style", "training"):
        result = fresh.generate(PARAMS, Mix.from_weights({name: 0.8}))
        assert result.image.tobytes() == reference
        assert result.metadata["mix_id"] == f"{name}:0.8"
    assert fresh.loaded_adapters() == {"ott", "my-style", "training"}


def test_a_lora_with_layers_the_model_lacks_is_refused(tiny_models: Path, tmp_path: Path) -> None:
    # diffusers only warns when a kohya key maps to no module; the generator counts what loaded.
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(tiny_models / "loras" / "dalle.safetensors"))
    real = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    for suffix in (".lora_down.weight", ".lora_up.weight", ".alpha"):
        tensors[real.replace("blocks_0_", "blocks_7_") + suffix] = tensors[real + suffix].clone()
    folder = tmp_path / "loras"
    folder.mkdir()
    save_file(tensors, str(folder / "broken.safetensors"))
    shutil.copy(tiny_models / "loras" / "ott.safetensors", folder / "ott.safetensors")
    fresh = DeskGenerator.from_pretrained(settings_for(tiny_models, folder))
    # Found when the generator starts (key mapping, no load), and refused as the request's fault (422).
    problem = "only 152 of its 153 layers match this model; is it a LoRA for SDXL, and for this base model?"
    assert fresh.unavailable == {"broken": problem}
    assert fresh.available_adapters() == ["ott"]
    with pytest.raises(AdapterUnavailable) as info:
        fresh.generate(PARAMS, Mix.from_weights({"broken": 1.0}))
    assert (status_of(info.value), info.value.extra) == (422, {"adapter": "broken", "reason": problem})
    assert fresh.loaded_adapters() == set()
    assert fresh.generate(PARAMS, Mix.from_weights({"ott": 1.0})).metadata["mix_id"] == "ott:1.0"


def test_concurrent_generations_are_serialised_and_correct(gen: DeskGenerator, catalog: MixCatalog) -> None:
    names = ["dalle_only", "ott_only", "3d_only", "mix"]
    expected = {name: gen.generate(PARAMS, catalog.resolve(name)).image.tobytes() for name in names}
    got: dict[str, bytes] = {}
    errors: list[BaseException] = []

    def worker(name: str) -> None:
        try:
            got[name] = gen.generate(PARAMS, catalog.resolve(name)).image.tobytes()
        except BaseException as exc:  # surfaced by the assert below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(name,)) for name in names]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert got == expected


# -- results --------------------------------------------------------------------------------------


def test_png_metadata_round_trip(gen: DeskGenerator, catalog: MixCatalog, tiny_models: Path) -> None:
    result = gen.generate(PARAMS, catalog.resolve("ott_3d"))
    assert read_png_metadata(result.png()) == result.metadata
    meta = result.metadata
    assert {k: meta[k] for k in ("seed", "steps", "guidance", "width", "height", "prompt", "negative_prompt")} == {
        "seed": 7, "steps": 3, "guidance": 5.0, "width": 64, "height": 64,
        "prompt": PARAMS.prompt, "negative_prompt": DEFAULT_NEGATIVE_PROMPT,
    }  # fmt: skip
    assert meta["mix_id"] == "3d:0.5+ott:0.7"
    assert meta["mix"] == {"3d": 0.5, "ott": 0.7}
    assert meta["adapters"] == {
        name: hashlib.sha256((tiny_models / "loras" / f"{name}.safetensors").read_bytes()).hexdigest()
        for name in ("3d", "ott")
    }
    assert meta["model_id"] == str(tiny_models / "sdxl")
    assert set(meta["timings"]) == {"activate_s", "generate_s", "denoise_s", "decode_s"}
    assert all(v >= 0 and math.isfinite(v) for v in meta["timings"].values())
    t = meta["timings"]
    assert 0 < t["denoise_s"] < t["generate_s"] and t["denoise_s"] + t["decode_s"] == pytest.approx(t["generate_s"], abs=2e-6)
    assert "timings" not in read_png_metadata(result.png(timings=False))
    assert result.image.size == (64, 64) and result.image.mode == "RGB"


def test_base_metadata_has_no_adapters(gen: DeskGenerator) -> None:
    meta = gen.generate(PARAMS, Mix(())).metadata
    assert (meta["mix_id"], meta["mix"], meta["adapters"]) == ("base", {}, {})


def test_on_step_is_called_once_per_step_in_order(gen: DeskGenerator) -> None:
    calls: list[tuple[int, int]] = []
    params = GenerationParams(prompt="a desk", steps=4, width=64, height=64)
    gen.generate(params, Mix.from_weights({"dalle": 1.0}), on_step=lambda step, total: calls.append((step, total)))
    assert calls == [(1, 4), (2, 4), (3, 4), (4, 4)]


def test_non_square_size(gen: DeskGenerator) -> None:
    result = gen.generate(GenerationParams(prompt="a desk", steps=2, width=96, height=64), Mix(()))
    assert result.image.size == (96, 64)


# -- errors ---------------------------------------------------------------------------------------


def test_unknown_adapter_raises_and_leaves_the_generator_usable(tiny_models: Path) -> None:
    gen = DeskGenerator.from_pretrained(settings_for(tiny_models))
    with pytest.raises(UnknownMix) as info:
        gen.generate(PARAMS, Mix.from_weights({"dalle": 0.5, "nope": 1.0}))
    assert info.value.message == "`mix`: unknown adapter 'nope'; available adapters are ['3d', 'dalle', 'ott']."
    assert info.value.field == "mix"
    assert gen.loaded_adapters() == set()  # every name is checked before anything loads
    assert gen.generate(PARAMS, Mix.from_weights({"dalle": 0.5})).metadata["mix_id"] == "dalle:0.5"


@pytest.mark.parametrize(
    ("changes", "field", "message"),
    [
        ({"width": 500}, "width", "`width` must be a multiple of 8 but is 500."),
        ({"height": 2056}, "height", "`height` must be in [64, 2048] but is 2056."),
        ({"width": 56}, "width", "`width` must be in [64, 2048] but is 56."),
        ({"width": 64.0}, "width", "`width` must be an integer but is 64.0."),
        ({"steps": 0}, "steps", "`steps` must be in [1, 150] but is 0."),
        ({"steps": 151}, "steps", "`steps` must be in [1, 150] but is 151."),
        ({"steps": True}, "steps", "`steps` must be an integer but is True."),
        ({"guidance": math.nan}, "guidance", "`guidance` must be a finite number in [0, 30] but is nan."),
        ({"guidance": 30.5}, "guidance", "`guidance` must be a finite number in [0, 30] but is 30.5."),
        ({"seed": -1}, "seed", "`seed` must be in [0, 4294967295] but is -1."),
        ({"seed": 2**32}, "seed", "`seed` must be in [0, 4294967295] but is 4294967296."),
        ({"prompt": "  "}, "prompt", "`prompt` must be a non-empty string."),
        ({"prompt": "x" * 2203}, "prompt", "`prompt` must be at most 2202 characters (with a concept's fragment) but has 2203."),
        ({"negative_prompt": "x" * 2001}, "negative_prompt",
         "`negative_prompt` must be at most 2000 characters but has 2001."),
    ],
)
def test_bad_parameters_raise_precise_errors(changes: dict[str, object], field: str, message: str) -> None:
    params = GenerationParams(**{**vars(PARAMS), **changes})  # type: ignore[arg-type]
    with pytest.raises(InvalidParameter) as info:
        params.validate()
    assert (info.value.field, info.value.message, status_of(info.value)) == (field, message, 400)


def test_limits_are_configurable_and_enforced_by_generate(gen: DeskGenerator) -> None:
    params = GenerationParams(prompt="a desk", width=128, height=64, steps=2)
    assert params.validate(SizeLimits(max_side=128)) is params
    with pytest.raises(InvalidParameter, match=r"^`width` must be in \[64, 96\] but is 128\.$"):
        params.validate(SizeLimits(max_side=96))
    with pytest.raises(InvalidParameter, match=r"^`steps` must be in \[1, 1\] but is 2\.$"):
        params.validate(SizeLimits(max_steps=1))
    with pytest.raises(InvalidParameter, match=r"^`width` must be a multiple of 8 but is 500\.$"):
        gen.generate(GenerationParams(prompt="a desk", width=500, height=64, steps=2), Mix(()))


def test_missing_model_folder_raises_model_files_missing(tiny_models: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelFilesMissing) as info:
        DeskGenerator.from_pretrained(GeneratorSettings(model_id=str(tmp_path / "sdxl"), lora_dir=str(tiny_models / "loras")))
    assert info.value.path == str(tmp_path / "sdxl")
    with pytest.raises(ModelFilesMissing, match="LoRA folder not found at"):
        DeskGenerator.from_pretrained(GeneratorSettings(model_id=str(tiny_models / "sdxl"), lora_dir=str(tmp_path / "x")))


def test_bad_dtype_and_device_are_refused() -> None:
    with pytest.raises(InvalidParameter, match=r"`dtype` must be one of \['float32', 'float16', 'bfloat16'\] but is 'fp8'\."):
        GeneratorSettings(dtype="fp8").resolved_dtype("cpu")
    assert GeneratorSettings().resolved_dtype("cpu") == "float32"
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(InvalidParameter, match=r"^`device` is 'cuda' but no CUDA device is available\.$"):
            GeneratorSettings(device="cuda").resolved_device()
        assert GeneratorSettings().resolved_device() == "cpu"


def test_importing_the_generator_does_not_import_torch() -> None:
    import subprocess
    import sys

    code = "import sys, deskgen.generator, deskgen.loras, deskgen.tools.tiny_sdxl; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"

