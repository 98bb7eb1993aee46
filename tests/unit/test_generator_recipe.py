"""Sampler, model revision and weights variant (issue 14, point 5): configurable, validated, recorded."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from deskgen.errors import InvalidParameter
from deskgen.generator import DeskGenerator, GeneratorSettings, settings_from_options
from deskgen.generator.recipe import SCHEDULERS, has_fp16_variant, model_revision, weights_variant
from deskgen.mixes import Mix
from deskgen.pngmeta import read_png_metadata
from deskgen.tools.tiny_sdxl import one_torch_thread
from tests.unit.generator_common import PARAMS, settings_for

pytestmark = pytest.mark.unit

EXPECTED_CLASS = {
    "default": "EulerDiscreteScheduler",  # what the tiny folder ships
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",
    "dpmpp_2m_karras": "DPMSolverMultistepScheduler",
    "ddim": "DDIMScheduler",
    "unipc": "UniPCMultistepScheduler",
}


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    with one_torch_thread():
        yield


def test_every_scheduler_draws_an_image_and_is_recorded(tiny_models: Path) -> None:
    assert set(SCHEDULERS) == set(EXPECTED_CLASS)
    images: dict[str, bytes] = {}
    for name in SCHEDULERS:
        gen = DeskGenerator.from_pretrained(settings_for(tiny_models, scheduler=name))
        result = gen.generate(PARAMS, Mix.from_weights({"ott": 0.5}))
        recorded = read_png_metadata(result.png(timings=False))
        assert recorded["scheduler"]["name"] == name and recorded["runtime"]["scheduler"] == name
        assert recorded["scheduler"]["class"] == EXPECTED_CLASS[name] == type(gen.pipe.scheduler).__name__
        config = recorded["scheduler"]["config"]
        # The folder's training schedule stays; only the sampler changes.
        assert (config["beta_schedule"], config["beta_start"], config["prediction_type"]) == ("scaled_linear", 0.00085, "epsilon")
        images[name] = result.image.tobytes()
        # Reproducible: the same recipe gives the same bytes.
        assert gen.generate(PARAMS, Mix.from_weights({"ott": 0.5})).image.tobytes() == images[name]
    karras = read_png_metadata(
        DeskGenerator.from_pretrained(settings_for(tiny_models, scheduler="dpmpp_2m_karras")).generate(PARAMS, Mix(())).png()
    )["scheduler"]["config"]
    assert (karras["use_karras_sigmas"], karras["algorithm_type"], karras["solver_order"]) == (True, "dpmsolver++", 2)
    assert images["default"] == images["euler"]  # the tiny folder ships Euler with these settings
    assert len({images[n] for n in ("euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras", "ddim", "unipc")}) == 6


@pytest.mark.parametrize("value", ["heun", "Euler", "", None, 3])
def test_an_unknown_scheduler_is_refused_naming_the_setting(value: object) -> None:
    with pytest.raises(InvalidParameter) as info:
        GeneratorSettings(scheduler=value)  # type: ignore[arg-type]
    assert info.value.field == "scheduler"
    assert info.value.message == f"`scheduler` must be one of {list(SCHEDULERS)} but is {value!r}."
    with pytest.raises(InvalidParameter, match="`scheduler` must be one of"):
        settings_from_options({"scheduler": value})
    assert settings_from_options({"scheduler": "euler_a"}).scheduler == "euler_a"


def test_the_model_revision_is_recorded_and_tracks_the_folder(tiny_models: Path, tmp_path: Path) -> None:
    gen = DeskGenerator.from_pretrained(settings_for(tiny_models))
    revision = gen.generate(PARAMS, Mix(())).metadata["model_revision"]
    assert revision == model_revision(str(tiny_models / "sdxl")) and revision.startswith("files:") and len(revision) == 22
    copy = tmp_path / "sdxl"
    shutil.copytree(tiny_models / "sdxl", copy)
    assert model_revision(str(copy)) == revision  # a copy is the same model
    config = copy / "scheduler" / "scheduler_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "steps_offset": 0}))
    assert model_revision(str(copy)) != revision  # a changed config is another revision


def test_a_hub_snapshot_is_recorded_by_its_commit(tmp_path: Path) -> None:
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = tmp_path / "models--fluently--Fluently-XL-v2" / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot / "model_index.json").write_text("{}")
    assert model_revision(str(snapshot)) == f"hub:{commit}"


def test_fp16_weights_only_on_cuda_in_16_bits(tiny_models: Path, tmp_path: Path) -> None:
    folder = tmp_path / "sdxl"
    shutil.copytree(tiny_models / "sdxl", folder)
    assert not has_fp16_variant(str(folder))
    assert weights_variant(str(folder), device="cuda", dtype="bfloat16") is None
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    shutil.copy(weights, weights.with_name("diffusion_pytorch_model.fp16.safetensors"))
    assert has_fp16_variant(str(folder))
    assert weights_variant(str(folder), device="cuda", dtype="bfloat16") == "fp16"
    assert weights_variant(str(folder), device="cuda:0", dtype="float16") == "fp16"
    assert weights_variant(str(folder), device="cuda", dtype="float32") is None
    assert weights_variant(str(folder), device="cpu", dtype="bfloat16") is None
    assert weights_variant(str(folder), device="cuda", dtype="float16", allowed=False) is None
    with pytest.raises(InvalidParameter, match=r"^`fp16_variant` must be true or false but is 'yes'\.$"):
        GeneratorSettings(fp16_variant="yes")  # type: ignore[arg-type]
