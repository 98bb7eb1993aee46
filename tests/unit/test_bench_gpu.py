"""The GPU suite's switch measurement under every placement (``bench/gpu.py``), on the tiny models: the one
prepared device call runs it on the loaded production generator, so it must leave that generator as it
found it and measure what it says (each placement's own path)."""

from __future__ import annotations

from pathlib import Path

import pytest

from deskgen.generator import DeskGenerator
from deskgen.generator.adapters import LORA_COMPONENTS
from deskgen.mixes import Mix
from tests.unit.generator_common import PARAMS, settings_for

pytestmark = pytest.mark.unit


def test_every_placement_switches_exactly_and_the_generator_gets_its_own_switcher_back(tiny_models: Path) -> None:
    import torch

    from bench.gpu import PLACEMENTS, Scenario, switch_placements

    gen = DeskGenerator.from_pretrained(
        settings_for(tiny_models, dtype="bfloat16", fuse_backup="residual", lora_factors="host")
    )
    gen.ensure_adapters(["3d", "dalle", "ott"])
    mix = Mix.from_weights({"dalle": 0.7, "ott": 0.5})
    before = gen.generate(PARAMS, mix).image.tobytes()
    gen.activate_mix(Mix(()))
    weights = {f"{c}.{k}": v.clone() for c in LORA_COMPONENTS for k, v in getattr(gen.pipe, c).state_dict().items()}
    own, factors = gen.switcher, gen.switcher.batched.factor_bytes()

    found = switch_placements(gen, Scenario(device="cpu", size=64, steps=2, n=1, tiny=True))

    assert [(v["fuse_backup"], v["lora_factors"]) for v in found] == list(PLACEMENTS)
    for v in found:
        name = f"{v['fuse_backup']}/{v['lora_factors']}"
        assert v["base_exact"], name
        assert len(v["switch_s"]) == 21 and all(s > 0 for s in v["switch_s"]), name
        # Each placement measured its own path: residuals only where the backup is by residual ...
        if v["fuse_backup"] == "residual":
            assert v["restored"]["residual"] > 0 and v["restored"]["copy"] == 0, name
        else:
            assert v["restored"]["residual"] == 0 and v["restored"]["copy"] > 0, name
        assert v["copy_where"] == ("device" if v["fuse_backup"] == "device" else "cpu"), name
        # ... and the factors where the placement puts them (in MiB: on the weights' device, in host memory).
        on_device, on_host = v["factors_mib"]
        assert (on_device > 0, on_host > 0) == ((True, False) if v["lora_factors"] == "device" else (False, True)), name
    # The generator as it was: its own switcher and factors, the base weights bit for bit, the same image.
    assert gen.switcher is own and own.batched.factor_bytes() == factors and gen.fused_mix_id is None
    now = {f"{c}.{k}": v for c in LORA_COMPONENTS for k, v in getattr(gen.pipe, c).state_dict().items()}
    assert [k for k in weights if not torch.equal(now[k], weights[k])] == []
    assert gen.generate(PARAMS, mix).image.tobytes() == before


def test_a_placement_that_fails_half_way_leaves_the_base_weights_and_the_own_switcher(
    tiny_models: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    import bench.gpu
    from bench.gpu import Scenario, switch_placements

    gen = DeskGenerator.from_pretrained(settings_for(tiny_models, dtype="bfloat16", fuse_backup="residual"))
    gen.ensure_adapters(["3d", "dalle", "ott"])
    gen.activate_mix(Mix(()))
    weights = {f"{c}.{k}": v.clone() for c in LORA_COMPONENTS for k, v in getattr(gen.pipe, c).state_dict().items()}
    own = gen.switcher

    def fails_fused(gen: DeskGenerator, sc: Scenario) -> None:  # a fault injected mid-measurement: a mix fused
        gen.activate_mix(Mix.from_weights({"dalle": 0.7, "ott": 0.5}))
        raise RuntimeError("injected")

    monkeypatch.setattr(bench.gpu, "switch_alone", fails_fused)
    with pytest.raises(RuntimeError, match="injected"):
        switch_placements(gen, Scenario(device="cpu", size=64, steps=2, n=1, tiny=True))
    assert gen.switcher is own and gen.fused_mix_id is None and gen.active_mix_id == Mix(()).id
    now = {f"{c}.{k}": v for c in LORA_COMPONENTS for k, v in getattr(gen.pipe, c).state_dict().items()}
    assert [k for k in weights if not torch.equal(now[k], weights[k])] == []
