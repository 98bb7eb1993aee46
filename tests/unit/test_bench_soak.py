"""The soak's LoRA folder and mix cycle (bench/soak.py): more adapters than a replica keeps loaded, so the
soak reads and unloads adapters, not only mixes."""

from __future__ import annotations

from pathlib import Path

import pytest
from safetensors.numpy import load_file

from bench import soak
from bench.router_sim import Replica, Timings, adapters_of
from deployments.generator import MAX_CACHED_MIXES, MAX_LOADED_ADAPTERS
from deskgen.loras import LoraRegistry
from deskgen.mixes import MixCatalog

pytestmark = pytest.mark.unit


def test_the_added_adapters_are_named_in_turn_and_too_few_are_refused() -> None:
    assert soak.extra_adapters(3) == []
    assert soak.extra_adapters(6) == ["soak4", "soak5", "soak6"]
    with pytest.raises(ValueError, match="at least 3"):
        soak.extra_adapters(2)


def test_the_folder_holds_every_adapter_loadable_each_with_its_own_weights(tiny_models: Path, tmp_path: Path) -> None:
    folder = soak.soak_loras(8, tmp_path / "loras")
    registry = LoraRegistry(folder)
    names = ["3d", "dalle", "ott", "soak4", "soak5", "soak6", "soak7", "soak8"]
    assert sorted(registry.usable()) == names
    assert registry.problems() == {}
    # soak4 is dalle's file (kohya) with its up factors scaled by 1.1 and its down factors as they were;
    # soak7 is dalle's again with 1.4; soak5 ott's (diffusers layout) with 1.2.
    dalle, soak4, soak7 = (load_file(str(folder / f"{n}.safetensors")) for n in ("dalle", "soak4", "soak7"))
    assert soak4.keys() == dalle.keys()
    ups = [k for k in dalle if "lora_up" in k]
    downs = [k for k in dalle if "lora_down" in k]
    assert ups and downs
    for key in ups:
        assert soak4[key] == pytest.approx(1.1 * dalle[key], rel=1e-6)
        assert soak7[key] == pytest.approx(1.4 * dalle[key], rel=1e-6)
    for key in downs:
        assert (soak4[key] == dalle[key]).all()
    ott, soak5 = (load_file(str(folder / f"{n}.safetensors")) for n in ("ott", "soak5"))
    for key in (k for k in ott if "lora_B" in k):
        assert soak5[key] == pytest.approx(1.2 * ott[key], rel=1e-6)


def test_every_mix_resolves_and_the_cycle_reads_adapters_again_once_warm(tiny_models: Path, tmp_path: Path) -> None:
    registry = LoraRegistry(soak.soak_loras(8, tmp_path / "loras"))
    catalog = MixCatalog(registry.usable())
    mixes = soak.soak_mixes(8)
    ids = [catalog.resolve(spec).id for spec in mixes]
    assert len(set(ids)) == len(mixes) == len(soak.MIXES) + 2 * 5
    used = set().union(*(adapters_of(spec) for spec in mixes))
    assert len(used) == 8 > MAX_LOADED_ADAPTERS
    # One replica going round the cycle, as the soak's clients make it (the replica's keep rule, as
    # bench.router_sim models it): once warm, every cycle still reads adapters, with 8 adapters; with the
    # tiny three alone, none.
    timings = Timings(image_s=1.0, switch_s=0.0, adapter_load_s=1.0, jitter=0.0)
    for adapters, reads_expected in ((8, True), (3, False)):
        replica = Replica(0, MAX_CACHED_MIXES)
        cycle = soak.soak_mixes(adapters)
        for spec in cycle:
            replica.prepare(spec, timings)
        warm = replica.adapter_loads
        for spec in cycle:
            replica.prepare(spec, timings)
        assert (replica.adapter_loads > warm) is reads_expected, (adapters, warm, replica.adapter_loads)
