"""deskgen.deepcache on the tiny SDXL UNet: the shallow path is the exact tail of the UNet, steps are
scheduled per generation, and a DeepCache generator is deterministic and approximate by design."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from deskgen.deepcache import DeepCache
from deskgen.errors import InvalidParameter
from deskgen.generator import DeskGenerator
from deskgen.mixes import MixCatalog
from deskgen.tools.tiny_sdxl import one_torch_thread
from tests.unit.generator_common import PARAMS, settings_for, tiny_unet_inputs

unit = pytest.mark.unit


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def unet(tiny_models: Path) -> Any:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(str(tiny_models / "sdxl" / "unet")).eval()


def unet_inputs(unet: Any, seed: int) -> dict[str, Any]:
    return tiny_unet_inputs(unet, torch.float32, seed=seed)


@unit
@pytest.mark.parametrize("seed", [0, 1])
def test_the_shallow_path_is_the_exact_tail_of_the_unet(unet: Any, seed: int) -> None:
    """Fed the deep feature of the same inputs, the shallow step reproduces the full UNet bit for bit:
    it runs exactly the blocks the full forward runs after that feature, with the same skips."""
    cache = DeepCache(unet, interval=2)
    try:
        inputs = unet_inputs(unet, seed)
        with torch.no_grad():
            cache.reset()
            full = unet(**inputs, return_dict=False)[0]
            assert cache._deep is not None and cache.full_steps == 1
            shallow = unet(**inputs, return_dict=False)[0]  # step 1 of interval 2: shallow, same inputs
        assert cache.shallow_steps == 1
        assert torch.equal(full, shallow)
        other = unet_inputs(unet, seed + 10)
        with torch.no_grad():
            moved = unet(**{**other, "encoder_hidden_states": inputs["encoder_hidden_states"]}, return_dict=False)[0]
        assert not torch.equal(moved, full)  # step 2: full again, on new inputs
        assert cache.full_steps == 2
    finally:
        cache.remove()


@unit
def test_remove_restores_the_plain_forward(unet: Any) -> None:
    inputs = unet_inputs(unet, 3)
    with torch.no_grad():
        before = unet(**inputs, return_dict=False)[0]
        cache = DeepCache(unet, interval=3)
        cache.remove()
        assert "forward" not in unet.__dict__
        after = unet(**inputs, return_dict=False)[0]
    assert torch.equal(before, after)


@unit
@pytest.mark.parametrize("interval", [1, 11, 2.5, True])
def test_bad_intervals_raise(unet: Any, interval: Any) -> None:
    with pytest.raises(InvalidParameter) as info:
        DeepCache(unet, interval=interval)
    assert info.value.field == "deepcache_interval"
    assert "forward" not in unet.__dict__


@pytest.fixture(scope="module")
def generators(tiny_models: Path) -> tuple[DeskGenerator, DeskGenerator]:
    exact = DeskGenerator.from_pretrained(settings_for(tiny_models))
    cached = DeskGenerator.from_pretrained(settings_for(tiny_models, deepcache_interval=3))
    return exact, cached


@unit
def test_a_deepcache_generator_schedules_steps_per_generation(generators: tuple[DeskGenerator, DeskGenerator]) -> None:
    _, cached = generators
    cache = cached.deepcache
    assert cache is not None
    mix = MixCatalog(["3d", "dalle", "ott"]).resolve("ott_3d")
    params = PARAMS.__class__(**{**PARAMS.__dict__, "steps": 7})
    full, shallow = cache.full_steps, cache.shallow_steps
    first = np.asarray(cached.generate(params, mix).image)
    # Steps 0, 3, 6 full; 1, 2, 4, 5 shallow.
    assert (cache.full_steps - full, cache.shallow_steps - shallow) == (3, 4)
    second = np.asarray(cached.generate(params, mix).image)  # the counter restarts: same schedule, same bytes
    assert (cache.full_steps - full, cache.shallow_steps - shallow) == (6, 8)
    assert np.array_equal(first, second)
    assert cached.generate(params, mix).metadata["runtime"]["deepcache_interval"] == 3


@unit
def test_deepcache_is_close_to_the_exact_image_but_not_equal(generators: tuple[DeskGenerator, DeskGenerator]) -> None:
    exact, cached = generators
    mix = MixCatalog(["3d", "dalle", "ott"]).resolve("dalle_ott")
    a = np.asarray(exact.generate(PARAMS, mix).image, dtype=np.float64)
    b = np.asarray(cached.generate(PARAMS, mix).image, dtype=np.float64)
    assert not np.array_equal(a, b)  # an approximation: never sold as the exact image
    noise = np.asarray(exact.generate(PARAMS.__class__(**{**PARAMS.__dict__, "seed": PARAMS.seed + 1}), mix).image,
                       dtype=np.float64)  # fmt: skip
    # Closer to the exact image of its seed than another seed's image is.
    assert np.abs(a - b).mean() < np.abs(a - noise).mean()
