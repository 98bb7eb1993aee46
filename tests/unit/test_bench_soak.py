"""The soak's LoRA folder and mix cycle (bench/soak.py): more adapters than a replica keeps loaded, so the
soak reads and unloads adapters, not only mixes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file

from bench import soak
from bench.router_sim import Replica, Timings, adapters_of
from deployments.generator import DEFAULT_CACHE
from deskgen.loras import LoraRegistry
from deskgen.mixes import MixCatalog

pytestmark = pytest.mark.unit


def test_the_added_adapters_are_named_in_turn_and_too_few_are_refused() -> None:
    assert soak.extra_adapters(3) == []
    assert soak.extra_adapters(6) == ["soak4", "soak5", "soak6"]
    with pytest.raises(ValueError, match="at least 3"):
        soak.extra_adapters(2)


def test_the_folder_holds_every_adapter_loadable_each_with_its_own_weights_ranks_and_layers(
    tiny_models: Path, tmp_path: Path
) -> None:
    folder = soak.soak_loras(8, tmp_path / "loras")
    registry = LoraRegistry(folder)
    names = ["3d", "dalle", "ott", "soak4", "soak5", "soak6", "soak7", "soak8"]
    assert sorted(registry.usable()) == names
    assert registry.problems() == {}
    files = {n: load_file(str(folder / f"{n}.safetensors")) for n in names}
    dalle, ott = files["dalle"], files["ott"]
    # soak4: dalle's file (kohya) with its up factors scaled by 1.1, its down factors and alphas as they were.
    assert files["soak4"].keys() == dalle.keys()
    ups = [k for k in dalle if "lora_up" in k]
    assert ups and any(k.startswith("lora_te") for k in ups)
    for key in dalle:
        want = 1.1 * dalle[key] if key in ups else dalle[key]
        assert files["soak4"][key] == pytest.approx(want, rel=1e-6), key
    # soak7: dalle's again, scaled by 1.4, at twice the rank: its first 4 rows (down) and columns (up) are dalle's;
    # and more layers than any tiny adapter: the feed-forward output of each UNet transformer block dalle adapts.
    blocks = [k.removesuffix("attn1_to_q.lora_down.weight") for k in dalle if k.endswith("_attn1_to_q.lora_down.weight")
              and k.startswith("lora_unet_")]  # fmt: skip
    ff = {f"{b}ff_net_2{suffix}" for b in blocks for suffix in (".lora_down.weight", ".lora_up.weight", ".alpha")}
    assert blocks and not ff & dalle.keys() and files["soak7"].keys() == dalle.keys() | ff
    for block in blocks:
        q = dalle[f"{block}attn1_to_q.lora_down.weight"]
        down7, up7 = files["soak7"][f"{block}ff_net_2.lora_down.weight"], files["soak7"][f"{block}ff_net_2.lora_up.weight"]
        assert down7.shape == (8, 4 * q.shape[1]) and up7.shape == (q.shape[1], 8)  # inner width 4 x dim -> dim
        assert down7.std() > 0 and up7.std() > 0
        assert files["soak7"][f"{block}ff_net_2.alpha"] == dalle[f"{block}attn1_to_q.alpha"]
    for key in (k for k in dalle if "lora_down" in k):
        up = key.replace("lora_down", "lora_up")
        down7, up7 = files["soak7"][key], files["soak7"][up]
        assert down7.shape == (8, dalle[key].shape[1]) and up7.shape == (dalle[up].shape[0], 8)
        assert (down7[:4] == dalle[key]).all() and up7[:, :4] == pytest.approx(1.4 * dalle[up], rel=1e-6)
        assert not (down7[4:] == 0).all()
    # soak5: ott's (diffusers layout), scaled by 1.2, rank 8, on the UNet's to_q and to_v alone; its metadata says so.
    qv = {k for k in ott if k.startswith("unet.") and (".to_q." in k or ".to_v." in k)}
    assert qv and files["soak5"].keys() == qv
    for key in (k for k in qv if "lora_B" in k):
        assert files["soak5"][key][:, :4] == pytest.approx(1.2 * ott[key], rel=1e-6)
    with safe_open(str(folder / "soak5.safetensors"), "np") as reader:
        config = json.loads(reader.metadata()["lora_adapter_metadata"])
    assert config == {"unet.lora_alpha": 2, "unet.r": 8, "unet.target_modules": ["to_q", "to_v"]}
    # soak6: 3d's (kohya) at rank 4 on to_q and to_v (kohya names); soak8: ott's at rank 4, to_q and to_v.
    assert files["soak6"].keys() == {k for k in files["3d"] if k.split(".")[0].endswith(("_to_q", "_to_v"))}
    assert {v.shape[0] for k, v in files["soak6"].items() if "lora_down" in k} == {4}
    assert files["soak8"].keys() == qv


def test_same_shapes_keep_the_origins_layers_and_ranks(tiny_models: Path, tmp_path: Path) -> None:
    folder = soak.soak_loras(8, tmp_path / "loras", shapes="same")
    for adapter in soak.added_adapters(8, "same"):
        mine, origin = (load_file(str(folder / f"{n}.safetensors")) for n in (adapter.name, adapter.origin))
        assert {k: v.shape for k, v in mine.items()} == {k: v.shape for k, v in origin.items()}
    with pytest.raises(ValueError, match="--shapes"):
        soak.added_adapters(8, "odd")


def test_one_mix_of_every_added_adapter_loads_and_moves_the_image_on_both_paths(tiny_models: Path, tmp_path: Path) -> None:
    from deskgen.generator import DeskGenerator, GenerationParams
    from deskgen.mixes import Mix
    from deskgen.tools.tiny_sdxl import one_torch_thread
    from tests.unit.generator_common import settings_for

    folder = soak.soak_loras(8, tmp_path / "loras")
    params = GenerationParams(prompt="a tidy desk", seed=3, steps=1, width=64, height=64)
    added = soak.extra_adapters(8)
    mixes = [Mix.from_weights({name: 0.8 for name in part}) for part in (added[:3], added[3:])]  # slots hold 3
    with one_torch_thread():
        for flags in ({}, {"hotswap": True}):
            gen = DeskGenerator.from_pretrained(settings_for(tiny_models, folder, **flags))
            base = np.asarray(gen.generate(params, Mix(())).image, dtype=float)
            for mix in mixes:
                mixed = np.asarray(gen.generate(params, mix).image, dtype=float)
                assert np.abs(mixed - base).mean() > 1.0, (flags, mix)
                assert set(mix.adapters) <= gen.loaded_adapters(), (flags, mix)


def test_every_mix_resolves_and_the_cycle_reads_adapters_again_once_warm(tiny_models: Path, tmp_path: Path) -> None:
    registry = LoraRegistry(soak.soak_loras(8, tmp_path / "loras"))
    catalog = MixCatalog(registry.usable())
    mixes = soak.soak_mixes(8)
    ids = [catalog.resolve(spec).id for spec in mixes]
    assert len(set(ids)) == len(mixes) == len(soak.MIXES) + 2 * 5
    used = set().union(*(adapters_of(spec) for spec in mixes))
    assert len(used) == 8 > DEFAULT_CACHE.keep_adapters
    # One replica going round the cycle, as the soak's clients make it (the replica's keep rule, as
    # bench.router_sim models it): once warm, every cycle still reads adapters, with 8 adapters; with the
    # tiny three alone, none.
    timings = Timings(image_s=1.0, switch_s=0.0, adapter_load_s=1.0, jitter=0.0)
    for adapters, reads_expected in ((8, True), (3, False)):
        replica = Replica(0, DEFAULT_CACHE.mixes)
        cycle = soak.soak_mixes(adapters)
        for spec in cycle:
            replica.prepare(spec, timings)
        warm = replica.adapter_loads
        for spec in cycle:
            replica.prepare(spec, timings)
        assert (replica.adapter_loads > warm) is reads_expected, (adapters, warm, replica.adapter_loads)
