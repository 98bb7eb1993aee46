"""LoRA files checked when a generator starts (issue 14, point 3): each kind of file diffusers cannot load
is listed as unavailable with its reason, a mix naming it is a 422 naming adapter and reason, every other
mix keeps working; a UNet-only kohya file loads."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from deployments.http_errors import status_of
from deskgen.errors import AdapterUnavailable, UnknownMix
from deskgen.generator import DeskGenerator
from deskgen.loras import LoraRegistry, lora_file_problem
from deskgen.mixes import Mix, MixCatalog
from deskgen.tools.tiny_sdxl import GOOD_LORA_VARIANTS, LORA_VARIANTS, one_torch_thread, write_lora_variant
from tests.unit.generator_common import PARAMS, settings_for

pytestmark = pytest.mark.unit

#: What each bad kind is refused for (the start of the reason); ``None``: the header passes and the
#: model check on a replica refuses it.
HEADER_REASONS: dict[str, str | None] = {
    "loha": "a LyCORIS LoHa network (keys like 'lora_te1_text_model_encoder_layers_0_self_attn_k_proj.hada_w1_a')",
    "dora": "a DoRA file ('lora_te1_text_model_encoder_layers_0_self_attn_k_proj.dora_scale'): diffusers would drop",
    "truncated": "truncated: its tensors need 333704 bytes but the file has 166852",
    "unknown_layout": "neither kohya_ss (lora_unet_...) nor diffusers (....lora_A.weight) LoRA keys "
                      "(e.g. 'model.diffusion_model.input_blocks.1.weight')",
    "unpaired": "'lora_te1_text_model_encoder_layers_0_self_attn_k_proj.lora_down.weight' has no 'lora_up.weight' partner",
    "extra_layer": None,
    "unet_only": None,
    "wider": None,
}
BAD = [kind for kind in LORA_VARIANTS if kind not in GOOD_LORA_VARIANTS]


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def folder(tiny_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The three tiny adapters and one file of every variant."""
    out = tmp_path_factory.mktemp("loras")
    for path in (tiny_models / "loras").glob("*.safetensors"):
        shutil.copy(path, out / path.name)
    for kind in LORA_VARIANTS:
        write_lora_variant(kind, tiny_models / "loras", out / f"{kind}.safetensors")
    return out


@pytest.fixture(scope="module")
def gen(tiny_models: Path, folder: Path) -> DeskGenerator:
    return DeskGenerator.from_pretrained(settings_for(tiny_models, folder))


# -- the header check (pure: the ingress runs it) ---------------------------------------------------


@pytest.mark.parametrize("kind", LORA_VARIANTS)
def test_header_check_names_the_problem(folder: Path, kind: str) -> None:
    problem = lora_file_problem(folder / f"{kind}.safetensors")
    expected = HEADER_REASONS[kind]
    if expected is None:
        assert problem is None
    else:
        assert problem is not None and problem.startswith(expected), problem


def test_header_check_passes_the_real_layouts_and_refuses_garbage(tiny_models: Path, tmp_path: Path) -> None:
    for name in ("dalle", "3d", "ott"):
        assert lora_file_problem(tiny_models / "loras" / f"{name}.safetensors") is None
    (tmp_path / "empty.safetensors").write_bytes(b"")
    assert lora_file_problem(tmp_path / "empty.safetensors") == (
        "not a safetensors file: 0 bytes, shorter than the 8-byte header length")
    (tmp_path / "text.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    assert lora_file_problem(tmp_path / "text.safetensors") == "not a safetensors file: its header is not JSON"
    (tmp_path / "huge.safetensors").write_bytes(b"\xff" * 8 + b"{}")
    assert lora_file_problem(tmp_path / "huge.safetensors").startswith("not a safetensors file (or truncated)")  # type: ignore[union-attr]


def test_the_registry_lists_problems_cached_per_file_version(folder: Path, tmp_path: Path) -> None:
    registry = LoraRegistry(folder)
    assert set(registry.problems()) == {k for k, v in HEADER_REASONS.items() if v is not None}
    assert registry.usable() == ["3d", "dalle", "extra_layer", "ott", "unet_only", "wider"]
    # A file replaced by a good one is checked again.
    scratch = tmp_path / "scratch"
    shutil.copytree(folder, scratch)
    registry = LoraRegistry(scratch)
    assert "loha" in registry.problems()
    shutil.copy(scratch / "dalle.safetensors", scratch / "loha.safetensors")
    assert "loha" not in registry.problems()


def test_the_header_check_imports_no_torch() -> None:
    code = "import sys, deskgen.loras, deskgen.mixes; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_catalog_answers_422_for_an_unavailable_adapter_and_keeps_the_rest() -> None:
    reason = "truncated: its tensors need 10 bytes but the file has 5"
    named = {"dalle_only": {"dalle": 1.0}, "bad_mix": {"bad": 0.5, "dalle": 0.5}}
    catalog = MixCatalog(["dalle", "bad"], named, unavailable={"bad": reason})
    assert catalog.available == {"dalle"}
    assert catalog.resolve("dalle_only").id == "dalle:1.0"
    for spec in ("bad_mix", "bad:0.7", "dalle:0.5+bad:1"):
        with pytest.raises(AdapterUnavailable) as info:
            catalog.resolve(spec)
        assert status_of(info.value) == 422
        assert info.value.to_dict() == {
            "code": "adapter_unavailable", "field": "mix", "adapter": "bad", "reason": reason,
            "message": f"`mix`: adapter 'bad' is unavailable: {reason}.",
        }  # fmt: skip
    assert catalog.resolve("bad:0+dalle:0.5").id == "dalle:0.5"  # weight 0: not used, so not refused
    with pytest.raises(UnknownMix, match=r"available adapters are \['dalle'\]"):
        catalog.resolve("nope:1")


# -- the generator: checked at start, 422 per request, the replica unaffected -----------------------


def test_generator_lists_each_bad_file_with_its_reason_at_start(gen: DeskGenerator) -> None:
    unavailable = gen.unavailable
    assert sorted(unavailable) == sorted(BAD)
    for kind, expected in HEADER_REASONS.items():
        if expected is not None:
            assert unavailable[kind].startswith(expected)
    assert unavailable["extra_layer"] == (
        "only 152 of its 153 layers match this model; is it a LoRA for SDXL, and for this base model?")
    assert gen.available_adapters() == ["3d", "dalle", "ott", "unet_only", "wider"]
    assert gen.loaded_adapters() == set()  # checked without loading anything


@pytest.mark.parametrize("kind", BAD)
def test_a_mix_naming_a_bad_file_is_refused_and_others_keep_working(gen: DeskGenerator, kind: str) -> None:
    good = Mix.from_weights({"dalle": 0.7, "ott": 0.5})
    expected = gen.generate(PARAMS, good).png(timings=False)
    with pytest.raises(AdapterUnavailable) as info:
        gen.generate(PARAMS, Mix.from_weights({"dalle": 0.5, kind: 1.0}))
    assert status_of(info.value) == 422
    assert info.value.extra == {"adapter": kind, "reason": gen.unavailable[kind]}
    assert kind not in gen.loaded_adapters()
    assert gen.generate(PARAMS, good).png(timings=False) == expected


def test_a_unet_only_kohya_file_loads_and_changes_only_through_the_unet(gen: DeskGenerator, tiny_models: Path) -> None:
    base = np.asarray(gen.generate(PARAMS, Mix(())).image, dtype=np.int16)
    result = gen.generate(PARAMS, Mix.from_weights({"unet_only": 1.0}))
    assert np.abs(np.asarray(result.image, dtype=np.int16) - base).mean() > 5.0
    # Every mix is fused (the default): the weights the adapter's factors write, per component.
    adapted = {id(p) for p in gen.adapters.factors["style_unet_only"].params}
    per_component = {
        name: sum(1 for p in getattr(gen.pipe, name).parameters() if id(p) in adapted)
        for name in ("unet", "text_encoder", "text_encoder_2")
    }
    assert per_component["unet"] == gen.registry.module_count("unet_only") > 0
    assert per_component["text_encoder"] == per_component["text_encoder_2"] == 0


def test_a_file_that_fails_to_load_despite_the_checks_is_a_422_too(
    tiny_models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The load-time count is the safety net behind the start-up check.
    import deskgen.generator.core as core

    folder = tmp_path / "loras"
    folder.mkdir()
    write_lora_variant("extra_layer", tiny_models / "loras", folder / "broken.safetensors")
    shutil.copy(tiny_models / "loras" / "ott.safetensors", folder / "ott.safetensors")
    monkeypatch.setattr(core, "mapping_problem", lambda *args: None)
    fresh = DeskGenerator.from_pretrained(settings_for(tiny_models, folder))
    assert fresh.unavailable == {}
    with pytest.raises(AdapterUnavailable, match=r"adapter 'broken' is unavailable: only 152 of its 153 layers"):
        fresh.generate(PARAMS, Mix.from_weights({"broken": 1.0}))
    assert "broken" in fresh.unavailable and fresh.loaded_adapters() == set()
    assert fresh.generate(PARAMS, Mix.from_weights({"ott": 1.0})).metadata["mix_id"] == "ott:1.0"


def test_a_bad_file_added_later_is_checked_on_first_use(tiny_models: Path, tmp_path: Path) -> None:
    folder = tmp_path / "loras"
    folder.mkdir()
    shutil.copy(tiny_models / "loras" / "ott.safetensors", folder / "ott.safetensors")
    fresh = DeskGenerator.from_pretrained(settings_for(tiny_models, folder))
    write_lora_variant("loha", tiny_models / "loras", folder / "late.safetensors")
    with pytest.raises(AdapterUnavailable, match="LyCORIS LoHa"):
        fresh.generate(PARAMS, Mix.from_weights({"late": 1.0}))
    assert fresh.available_adapters() == ["ott"] and list(fresh.unavailable) == ["late"]


def test_hotswap_mode_starts_with_bad_files_in_the_folder(tiny_models: Path, folder: Path) -> None:
    # The slots are laid out from the usable files only: a bad one must not stop the replica starting.
    fresh = DeskGenerator.from_pretrained(settings_for(tiny_models, folder, hotswap=True))
    assert sorted(fresh.unavailable) == sorted(BAD)
    assert fresh.generate(PARAMS, Mix.from_weights({"unet_only": 1.0, "ott": 0.5})).metadata["mix_id"] == "ott:0.5+unet_only:1.0"
    with pytest.raises(AdapterUnavailable):
        fresh.generate(PARAMS, Mix.from_weights({"dora": 1.0}))


# -- a file added later: any LoRA on the fused path, listed unavailable beforehand on slots (issue 24, 2) --


def test_a_wider_file_added_later_loads_fused_and_is_listed_unavailable_on_slots_before_use(
    tiny_models: Path, tmp_path: Path
) -> None:
    """``wider`` (twice the rank of every tiny adapter, and 17 feed-forward layers none of them adapts),
    written after both generators started: the fused default loads it like any file; hot-swap slots
    (laid out at start) cannot hold it, and the background check lists it unavailable with the reason
    before any request names it, which then gets a 422 with that reason while the other mixes work."""
    from deskgen.generator.adapters import SlotAdapters

    folder = tmp_path / "loras"
    shutil.copytree(tiny_models / "loras", folder)
    fused = DeskGenerator.from_pretrained(settings_for(tiny_models, folder))
    slots = DeskGenerator.from_pretrained(settings_for(tiny_models, folder, hotswap=True))
    assert isinstance(slots.adapters, SlotAdapters) and fused.adapters.kind == "fused"
    ott = slots.generate(PARAMS, Mix.from_weights({"ott": 1.0})).png(timings=False)
    write_lora_variant("wider", tiny_models / "loras", folder / "wider.safetensors")
    for gen in (fused, slots):
        assert gen.unchecked_adapters() == ["wider"] and "wider" not in gen.unavailable

    assert fused.check_new_adapters() == {"wider": None} and fused.unchecked_adapters() == []
    base = np.asarray(fused.generate(PARAMS, Mix(())).image, dtype=np.int16)
    wide = fused.generate(PARAMS, Mix.from_weights({"wider": 1.0}))
    assert np.abs(np.asarray(wide.image, dtype=np.int16) - base).mean() > 5.0
    assert wide.metadata["adapters"]["wider"] == fused.registry.sha256("wider")
    assert fused.adapters.factors["style_wider"].layers == fused.registry.module_count("wider") == 169

    checked = slots.check_new_adapters()
    reason = slots.unavailable["wider"]
    assert checked == {"wider": reason}
    assert reason.startswith("LoRA 'wider' adapts 17 UNet layers (e.g. down_blocks.1.attentions.0.transformer_blocks")
    assert "restart the replica to include it" in reason and "take any LoRA without a restart" in reason
    assert slots.available_adapters() == ["3d", "dalle", "ott"]
    with pytest.raises(AdapterUnavailable) as info:
        slots.generate(PARAMS, Mix.from_weights({"wider": 1.0, "ott": 0.5}))
    assert info.value.extra == {"adapter": "wider", "reason": reason}
    assert slots.generate(PARAMS, Mix.from_weights({"ott": 1.0})).png(timings=False) == ott


def test_the_replica_watches_the_folder_in_the_background(tiny_models: Path, tmp_path: Path) -> None:
    """GeneratorReplica.watch_adapters (the Generator deployment's background thread): a file added to the
    folder gets its verdict without any request, and the thread ends when told to."""
    import threading

    from deployments.generator import GeneratorReplica

    folder = tmp_path / "loras"
    shutil.copytree(tiny_models / "loras", folder)
    replica = GeneratorReplica(DeskGenerator.from_pretrained(settings_for(tiny_models, folder, hotswap=True)))
    stop = threading.Event()
    watch = threading.Thread(target=replica.watch_adapters, args=(stop, 0.05), daemon=True)
    watch.start()
    try:
        write_lora_variant("wider", tiny_models / "loras", folder / "wider.safetensors")
        write_lora_variant("unet_only", tiny_models / "loras", folder / "late.safetensors")
        deadline = time.monotonic() + 60
        while replica.generator.unchecked_adapters() and time.monotonic() < deadline:
            time.sleep(0.05)
        info = replica.info()
        assert "wider" in info["unavailable"] and "late" in info["adapters"]
        assert info["loaded_adapters"] == []  # checked, nothing loaded
    finally:
        stop.set()
        watch.join(timeout=30)
    assert not watch.is_alive()


@pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute")  # the loads outside quiet_adapter_load
def test_a_file_that_adapts_no_text_encoder_loads_without_diffusers_warning_of_it(tiny_models: Path, folder: Path) -> None:
    """diffusers warns "No LoRA keys associated to CLIPTextModel ... safe to ignore" twice per load of a file that
    adapts the UNet only (as most SDXL trainings save): a replica's loads are quiet about that, and only that."""
    import logging

    from deskgen.loras import quiet_adapter_load

    pipe = DeskGenerator.from_pretrained(settings_for(tiny_models, folder, fuse_active_mix=False)).pipe
    messages: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    def no_keys() -> list[str]:
        return [m for m in messages if m.startswith("No LoRA keys associated to ")]

    handler = Keep(logging.WARNING)
    library = logging.getLogger("diffusers")
    level = library.level
    library.setLevel(logging.WARNING)  # diffusers' default, whatever DIFFUSERS_VERBOSITY says here
    library.addHandler(handler)
    try:
        pipe.load_lora_weights(str(folder), weight_name="unet_only.safetensors", adapter_name="loud")
        assert [m.split(" found")[0] for m in no_keys()] == ["No LoRA keys associated to CLIPTextModel",
                                                             "No LoRA keys associated to CLIPTextModelWithProjection"]  # fmt: skip
        messages.clear()
        with quiet_adapter_load():
            pipe.load_lora_weights(str(folder), weight_name="unet_only.safetensors", adapter_name="quiet")
            logging.getLogger("diffusers.loaders.lora_base").warning("another warning")
        assert no_keys() == [] and "another warning" in messages
        messages.clear()
        pipe.load_lora_weights(str(folder), weight_name="unet_only.safetensors", adapter_name="loud_again")
        assert len(no_keys()) == 2  # only while the load runs
    finally:
        library.removeHandler(handler)
        library.setLevel(level)
    assert {"loud", "quiet", "loud_again"} <= set(pipe.get_list_adapters()["unet"])


def test_adapters_are_read_from_bytes_never_through_load_file(
    tiny_models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """safetensors 0.8's memory-mapped ``load_file`` keeps memory per tensor for the life of the process
    (``python -m bench.soak --loads 150`` measures it): every LoRA file a replica loads or checks is read
    as bytes instead, for every strategy, with the same factors diffusers' own file path gives."""
    import safetensors.torch

    from deskgen.generator.switching import collect_factors
    from deskgen.loras import quiet_adapter_load

    reference = DeskGenerator.from_pretrained(settings_for(tiny_models, fuse_active_mix=False)).pipe
    with quiet_adapter_load():
        for name in ("dalle", "ott"):  # kohya and diffusers layouts
            reference.load_lora_weights(str(tiny_models / "loras"), weight_name=f"{name}.safetensors", adapter_name=name)

    def refused(*args: object, **kwargs: object) -> None:
        raise AssertionError("safetensors.torch.load_file was called")

    folder = tmp_path / "loras"
    shutil.copytree(tiny_models / "loras", folder)
    # The base model is read once at start (its own loader); from then on, no load_file.
    gens = [DeskGenerator.from_pretrained(settings_for(tiny_models, folder, **flags))
            for flags in ({}, {"fuse_active_mix": False}, {"hotswap": True})]  # fmt: skip
    monkeypatch.setattr(safetensors.torch, "load_file", refused)
    write_lora_variant("wider", tiny_models / "loras", folder / "wider.safetensors")
    for gen in gens:
        gen.generate(PARAMS, Mix.from_weights({"dalle": 0.6, "ott": 0.4}))
        assert list(gen.check_new_adapters()) == ["wider"]
    fused = gens[0]
    for name in ("dalle", "ott"):
        got, want = fused.adapters.factors[f"style_{name}"], collect_factors(reference, name)
        assert got.groups.keys() == want.groups.keys()
        for g, w in zip(got.groups.values(), want.groups.values(), strict=True):
            assert (g.alphas, g.divisors) == (w.alphas, w.divisors)
            assert all(a.equal(b) for a, b in zip(g.a + g.b, w.a + w.b, strict=True))
