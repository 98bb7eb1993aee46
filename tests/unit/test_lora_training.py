"""Issue 26: training the service's own style LoRA, without Ray (the Ray Train job: tests/serve).

On the tiny SDXL: bad input is refused naming the item before anything loads; training lowers the
denoising loss on its set while the zero-step control leaves it exactly at the base's; the written file,
in both layouts, loads through the generator's production path, computes what the trained model computes
and changes the image; a truncated or wrong-shape file is refused by the service's LoRA check; a
checkpoint restores the run exactly; the command exits 2 on bad input and writes nothing."""

from __future__ import annotations

import dataclasses
import io
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image, ImageDraw

from deskgen.errors import InvalidParameter
from deskgen.generator import DeskGenerator
from deskgen.lora_training.config import LoraTrainingConfig
from deskgen.lora_training.data import TrainingExample, data_sha256, folder_examples
from deskgen.lora_training.output import read_training_metadata, training_metadata, write_lora
from deskgen.lora_training.trainer import LoraTrainer, prepare
from deskgen.loras import lora_file_problem
from deskgen.mixes import Mix
from deskgen.paths import PROJECT_ROOT
from deskgen.tools.tiny_sdxl import one_torch_thread
from tests.unit.generator_common import PARAMS, settings_for, tiny_unet_inputs

pytestmark = pytest.mark.unit

CAPTIONS = ["a desk with a lamp", "a desk with a monitor", "a wooden desk with a plant"]


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    with one_torch_thread():
        yield


def desk_png(k: int, size: tuple[int, int] = (80, 72)) -> bytes:
    image = Image.new("RGB", size, (40 * k, 90, 200 - 30 * k))
    ImageDraw.Draw(image).rectangle((10 + 5 * k, 10, 40 + 5 * k, 50), fill=(250, 250, 250))
    data = io.BytesIO()
    image.save(data, "PNG")
    return data.getvalue()


def write_folder(folder: Path, count: int = 3) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(count):
        (folder / f"desk{k}.png").write_bytes(desk_png(k))
        (folder / f"desk{k}.txt").write_text(CAPTIONS[k % len(CAPTIONS)] + "\n")
    return folder


def config(tiny_models: Path, **values: Any) -> LoraTrainingConfig:
    defaults: dict[str, Any] = {"name": "mydesk", "base_model": str(tiny_models / "sdxl"), "rank": 4, "resolution": 64,
                                "steps": 30, "learning_rate": 1e-2}  # fmt: skip
    return LoraTrainingConfig(**{**defaults, **values})


def trained(
    tiny_models: Path, examples: list[TrainingExample], **values: Any
) -> tuple[LoraTrainer, list[Any]]:
    cfg = config(tiny_models, **values)
    trainer = LoraTrainer(cfg)
    batch = [prepare(e, cfg) for e in examples]
    for step in range(cfg.steps):
        trainer.step([batch[step % len(batch)]])
    return trainer, batch


@pytest.fixture(scope="module")
def examples(tiny_models: Path, tmp_path_factory: pytest.TempPathFactory) -> list[TrainingExample]:
    folder = write_folder(tmp_path_factory.mktemp("desks"))
    return folder_examples(folder, config(tiny_models))


# -- bad input ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "field", "start"),
    [
        ({"rank": 0}, "rank", "`rank` must be an integer from 1 to 128 but is 0."),
        ({"rank": 129}, "rank", "`rank` must be an integer from 1 to 128 but is 129."),
        ({"learning_rate": 0.5}, "learning_rate", "`learning_rate` must be between 1e-06 and 0.01 but is 0.5."),
        ({"learning_rate": float("nan")}, "learning_rate", "`learning_rate` must be between"),
        ({"resolution": 100}, "resolution", "`resolution` must be a multiple of 32 but is 100."),
        ({"steps": -1}, "steps", "`steps` must be an integer from 0 to 100000 but is -1."),
        ({"name": "../x"}, "name", "`name`: adapter names are 1-64 letters"),
        ({"name": "dalle_ott"}, "name", "`name` 'dalle_ott' is a named mix"),
        ({"layout": "ckpt"}, "layout", "`layout` must be one of ['diffusers', 'kohya'] but is 'ckpt'."),
    ],
)  # fmt: skip
def test_settings_out_of_bounds_name_the_field(
    tiny_models: Path, values: dict[str, Any], field: str, start: str
) -> None:
    with pytest.raises(InvalidParameter) as info:
        config(tiny_models, **values)
    assert info.value.field == field
    assert info.value.message.startswith(start)


def test_bad_folders_are_refused_naming_the_item(tiny_models: Path, tmp_path: Path) -> None:
    cfg = config(tiny_models)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InvalidParameter, match="holds no images"):
        folder_examples(empty, cfg)
    with pytest.raises(InvalidParameter, match="is not a folder"):
        folder_examples(tmp_path / "missing", cfg)
    small = write_folder(tmp_path / "small")
    (small / "tiny.png").write_bytes(desk_png(0, size=(20, 40)))
    (small / "tiny.txt").write_text("a desk")
    with pytest.raises(InvalidParameter) as info:
        folder_examples(small, cfg)
    assert (
        "tiny.png is 20x40; training at 64 px needs images whose shorter side is at least 32 px"
        in info.value.message
    )
    broken = write_folder(tmp_path / "broken")
    (broken / "half.png").write_bytes(desk_png(1)[:50])
    with pytest.raises(InvalidParameter, match=r"half\.png is not an image Pillow can decode"):
        folder_examples(broken, cfg)
    uncaptioned = write_folder(tmp_path / "uncaptioned")
    (uncaptioned / "desk1.txt").write_text("  \n")
    with pytest.raises(
        InvalidParameter, match=r"desk1\.png has no caption \(desk1\.txt is missing or empty\)"
    ):
        folder_examples(uncaptioned, cfg)
    # With a captioner (the service's BLIP in the command), the image is captioned instead.
    captioned = folder_examples(
        uncaptioned, cfg, captioner=lambda image: f"captioned {image.size[0]}x{image.size[1]}"
    )
    assert [e.caption for e in captioned] == [CAPTIONS[0], "captioned 80x72", CAPTIONS[2]]


def test_the_data_hash_follows_images_and_captions_not_their_order(examples: list[TrainingExample]) -> None:
    assert data_sha256(examples) == data_sha256(list(reversed(examples)))
    changed = [TrainingExample(examples[0].source, examples[0].image, "another caption"), *examples[1:]]
    assert data_sha256(changed) != data_sha256(examples)


# -- training -------------------------------------------------------------------------------------


def test_training_lowers_the_loss_on_its_set_and_zero_steps_do_not(
    tiny_models: Path, examples: list[TrainingExample]
) -> None:
    """The loss on the training set (the same seeded noise and timesteps for every state) drops after 30
    steps; the zero-step control (the adapter as initialised: B = 0) gives exactly the base's loss.

    Measured on the 2-core CPU: base 1.1399, trained 1.05 (-7.6 %). Shuffled captions are no control on
    this random tiny base: a LoRA trained on other images, or on the same images with shuffled captions,
    lowers this set's loss as much (400 steps: 1.0183 vs 1.0183 vs 1.0183), because what it learns first
    is a correction of the random UNet's output that holds for any image."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    trainer, batch = trained(tiny_models, examples)
    untrained, _ = trained(tiny_models, examples, steps=0)
    base = LoraTrainer(config(tiny_models, steps=0))
    for module in base.unet.modules():
        if isinstance(module, BaseTunerLayer):
            module.enable_adapters(False)  # the base UNet alone
    base_loss = base.evaluate(batch)
    assert trainer.evaluate(batch) < 0.97 * base_loss
    # The control: no step, no change (bit for bit: the same draws, B = 0).
    assert untrained.evaluate(batch) == base_loss
    tensors = untrained.lora_tensors()
    assert all(float(t.abs().max()) == 0.0 for k, t in tensors.items() if k.endswith("lora_B.weight"))


def test_a_checkpoint_restores_the_run_exactly(tiny_models: Path, examples: list[TrainingExample]) -> None:
    """10 steps, a checkpoint, 10 more in a new trainer == 20 steps in one: the same LoRA weights. A run
    may be resumed with more steps; not with another rank."""
    straight, batch = trained(tiny_models, examples, steps=20)
    first, _ = trained(tiny_models, examples, steps=10)
    state = first.state_dict()
    resumed = LoraTrainer(config(tiny_models, steps=10))
    resumed.load_state_dict(state)
    assert resumed.steps_done == 10
    for step in range(10, 20):
        resumed.step([batch[step % len(batch)]])
    want, got = straight.lora_tensors(), resumed.lora_tensors()
    assert want.keys() == got.keys()
    assert all(bool((want[k] == got[k]).all()) for k in want)
    with pytest.raises(ValueError, match=r"other settings \(rank\)"):
        LoraTrainer(config(tiny_models, rank=8)).load_state_dict(state)


@pytest.mark.parametrize("layout", ["diffusers", "kohya"])
def test_the_output_loads_through_the_production_path_and_computes_what_was_trained(
    tiny_models: Path, examples: list[TrainingExample], tmp_path: Path, layout: str
) -> None:
    """alpha != rank (the scale must survive the layout), text encoders trained too."""
    import torch

    trainer, _ = trained(tiny_models, examples, steps=10, layout=layout, alpha=2.0, train_text_encoders=True)
    loras = tmp_path / "loras"
    shutil.copytree(tiny_models / "loras", loras)
    metadata = training_metadata(
        trainer.config, data_sha256=data_sha256(examples), examples=3, steps=10, final_loss=0.5
    )
    path = write_lora(trainer.lora_tensors(), metadata, loras, "mydesk")
    assert lora_file_problem(path) is None
    assert read_training_metadata(path)["training"]["layout"] == layout
    assert read_training_metadata(path)["data_sha256"] == data_sha256(examples)
    assert not list(loras.glob(".*partial"))
    gen = DeskGenerator.from_pretrained(settings_for(tiny_models, loras))
    assert gen.adapter_problem("mydesk") is None
    assert "mydesk" in gen.available_adapters()
    base_image = gen.generate(PARAMS, Mix.from_weights({})).image.tobytes()
    image = gen.generate(PARAMS, Mix.from_weights({"mydesk": 1.0})).image.tobytes()
    assert image != base_image
    # The served UNet (the adapter fused into it) computes what the trained peft model computes.
    unet = gen.pipe.unet
    inputs = tiny_unet_inputs(unet, torch.float32)
    trainer.unet.eval()
    with torch.no_grad():
        got = unet(**inputs, return_dict=False)[0]
        want = trainer.unet(**inputs, return_dict=False)[0]
        gen.activate_mix(Mix.from_weights({}))
        base = unet(**inputs, return_dict=False)[0]
    assert float((got - want).abs().max() / want.abs().mean()) < 1e-4  # measured: 2.3e-6 (float32 sums)
    assert float((base - want).abs().max() / want.abs().mean()) > 1e-3  # the check can fail


def test_truncated_and_wrong_shape_outputs_are_refused_by_the_lora_check(
    tiny_models: Path, examples: list[TrainingExample], tmp_path: Path
) -> None:
    trainer, _ = trained(tiny_models, examples, steps=2)
    loras = tmp_path / "loras"
    shutil.copytree(tiny_models / "loras", loras)
    tensors = trainer.lora_tensors()
    good = write_lora(tensors, {}, loras, "mydesk")
    truncated = loras / "cut.safetensors"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    assert (lora_file_problem(truncated) or "").startswith("truncated: its tensors need")
    # A and B transposed: the right names, the wrong shapes.
    swapped = {k: (t.t().contiguous() if k.endswith("lora_A.weight") else t) for k, t in tensors.items()}
    write_lora(swapped, {}, loras, "swapped")
    gen = DeskGenerator.from_pretrained(settings_for(tiny_models, loras))
    assert gen.adapter_problem("mydesk") is None
    assert "do not fit a layer of" in (gen.adapter_problem("swapped") or "")
    assert "truncated" in (gen.adapter_problem("cut") or "")
    # write_lora itself refuses a file the check refuses, and leaves nothing behind.
    unpaired = {k: t for k, t in tensors.items() if not k.endswith("lora_B.weight")}
    with pytest.raises(ValueError, match=r"fails the LoRA check: .* has no 'lora_B\.weight' partner"):
        write_lora(unpaired, {}, loras, "unpaired")
    assert not (loras / "unpaired.safetensors").exists()
    assert not list(loras.glob(".*partial"))


# -- the command ----------------------------------------------------------------------------------


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "deskgen.train_lora", *args], cwd=PROJECT_ROOT, capture_output=True,
                          text=True, timeout=120)  # fmt: skip


def test_the_command_exits_2_on_bad_input_and_writes_nothing(tiny_models: Path, tmp_path: Path) -> None:
    loras = tmp_path / "loras"
    shutil.copytree(tiny_models / "loras", loras)
    before = sorted(p.name for p in loras.iterdir())
    empty = tmp_path / "empty"
    empty.mkdir()
    desks = write_folder(tmp_path / "desks")
    common = ["--lora-dir", str(loras), "--runs-dir", str(tmp_path / "runs"), "--resolution", "64"]
    cases = {
        "holds no images": ["--name", "mine", "--data", str(empty)],
        "`rank` must be an integer from 1 to 128 but is 0": [
            "--name",
            "mine",
            "--data",
            str(desks),
            "--rank",
            "0",
        ],
        "`learning_rate` must be between": ["--name", "mine", "--data", str(desks), "--learning-rate", "1"],
        "exists; choose another name": ["--name", "ott", "--data", str(desks)],
        "`liked` must be EXPERIMENT:ARM": ["--name", "mine", "--liked", "exp-only"],
        "`experiment`: no experiment 'exp-nope'": ["--name", "mine", "--liked", "exp-nope:ott_3d",
                                                   "--experiments-db", f"sqlite:///{tmp_path / 'x.db'}",
                                                   "--image-store", str(tmp_path)],
    }
    for message, args in cases.items():
        done = run_cli(*args, *common)
        assert done.returncode == 2, (message, done.stderr[-2000:])
        assert message in done.stderr, done.stderr[-2000:]
        assert "Traceback" not in done.stderr
    assert sorted(p.name for p in loras.iterdir()) == before
    assert not (tmp_path / "runs").exists()


# -- liked images ---------------------------------------------------------------------------------


def test_liked_images_of_an_arm_become_examples_captioned_with_their_prompt(tiny_models: Path, tmp_path: Path) -> None:
    """A real SQLite experiment store and image store: the images of one arm with like/download/select
    feedback (not dislike, not the other arm, not an undelivered one) are the examples, captioned with
    the prompt in their PNG; gone images are counted; every bad request names its item."""
    from deskgen.experiments.records import Experiment, Exposure, Feedback
    from deskgen.experiments.store import ExperimentStore
    from deskgen.imagestore import ImageStore
    from deskgen.lora_training.liked import liked_examples

    experiment = Experiment(split={"ott_3d": 0.7, "dalle_ott": 0.3}, salt="s",
                            mixes={"ott_3d": {"ott": 0.7, "3d": 0.5}, "dalle_ott": {"dalle": 0.7, "ott": 0.5}})  # fmt: skip
    store = ExperimentStore.open(f"sqlite:///{tmp_path / 'experiments.db'}")
    store.ensure_experiment(experiment)
    images = ImageStore(tmp_path / "images", max_bytes=10**8, retention_s=3600)
    gen = DeskGenerator.from_pretrained(settings_for(tiny_models))
    rows = {"liked1": ("ott_3d", "ok", "like"), "liked2": ("ott_3d", "ok", "download"), "meh": ("ott_3d", "ok", "dislike"),
            "other": ("dalle_ott", "ok", "like"), "gone": ("ott_3d", "ok", "select"), "failed": ("ott_3d", "timeout", None)}  # fmt: skip
    for k, (image_id, (arm, outcome, _)) in enumerate(rows.items()):
        store.record_exposures([Exposure(image_id=image_id, experiment_id=experiment.id, user_id=None, arm=arm,
                                         mix_id=arm, mix_source="ab", outcome=outcome, status=200 if outcome == "ok" else 504)])  # fmt: skip
        if outcome == "ok" and image_id != "gone":
            params = dataclasses.replace(PARAMS, prompt=f"a desk setup number {k}", seed=k)
            images.put(image_id, gen.generate(params, Mix.from_weights({})).png())
    for image_id, (_, outcome, event) in rows.items():
        if event is not None and outcome == "ok":
            store.record_feedback(Feedback(image_id=image_id, event=event))  # type: ignore[arg-type]
    cfg = config(tiny_models)
    selection = liked_examples(store, images, experiment.id, "ott_3d", cfg)
    assert [e.source for e in selection.examples] == ["image liked1", "image liked2"]
    assert [e.caption for e in selection.examples] == ["a desk setup number 0", "a desk setup number 1"]
    assert (selection.liked, selection.missing) == (3, 1)  # liked1, liked2 and gone (select)
    assert [e.source for e in liked_examples(store, images, experiment.id, "ott_3d", cfg, ("like",)).examples] == ["image liked1"]
    bad = {
        ("exp-nope", "ott_3d", ("like",)): ("experiment", "`experiment`: no experiment 'exp-nope'"),
        (experiment.id, "mix", ("like",)): ("arm", f"`arm`: experiment {experiment.id!r} has no arm 'mix'"),
        (experiment.id, "dalle_ott", ("download",)): ("arm", "`arm`: no image of arm 'dalle_ott'"),
        (experiment.id, "ott_3d", ("select",)): ("image_store", "`image_store`: the 1 liked images of arm 'ott_3d' are no longer"),
        (experiment.id, "ott_3d", ("love",)): ("events", "`events` must name some of like, download, select"),
    }  # fmt: skip
    for (exp, arm, events), (field, start) in bad.items():
        with pytest.raises(InvalidParameter) as info:
            liked_examples(store, images, exp, arm, cfg, events)
        assert (info.value.field, info.value.message[: len(start)]) == (field, start)
