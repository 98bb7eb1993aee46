"""Issue 26 through the real app: images users liked become a style LoRA (Ray Train, on the app's own
Ray cluster), which the running app lists and generates with, without a restart.

The loop: text2img for several users (the A/B split picks their arms), a ``like`` for two images of one
arm, the ingress has kept the delivered PNGs in its image store, ``--liked EXPERIMENT:ARM``'s selection
finds them, the Ray Train job trains on them and writes ``<lora_dir>/liked.safetensors``; ``/v1/mixes``
lists it within the catalogue TTL and a generation with it differs from one without. A resumed run with
more steps continues from the last checkpoint."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from deskgen.experiments.store import ExperimentStore
from deskgen.imagestore import ImageStore
from deskgen.lora_training.config import LoraTrainingConfig
from deskgen.lora_training.job import run_training
from deskgen.lora_training.liked import liked_examples
from deskgen.lora_training.output import read_training_metadata
from deskgen.pngmeta import read_png_metadata

pytestmark = pytest.mark.serve

WAIT_S = 60


def wait_until(predicate: Any, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not predicate():
        assert time.monotonic() < deadline, f"{what} not within {WAIT_S} s"
        time.sleep(0.2)


@pytest.fixture()
def trained_names(lora_dir: Path, client: httpx.Client) -> Iterator[list[str]]:
    names: list[str] = []
    yield names
    for name in names:
        (lora_dir / f"{name}.safetensors").unlink(missing_ok=True)
    wait_until(lambda: not set(names) & set(client.get("/v1/mixes").json()["adapters"]), "trained adapters dropped")


def test_liked_images_train_a_lora_that_the_running_app_serves(
    client: httpx.Client, serve_app: dict[str, Any], experiments_db: str, image_store: Path, lora_dir: Path,
    tiny_models: Path, tmp_path: Path, trained_names: list[str],
) -> None:  # fmt: skip
    experiment = client.get("/v1/experiments").json()["current"]
    by_arm: dict[str, list[tuple[str, str]]] = {}
    for k in range(12):
        user = f"trainer-{uuid.uuid4().hex[:8]}"
        r = client.post("/v1/text2img", json={"prompt": f"a tidy desk setup {k}", "steps": 1, "seed": k, "user_id": user})
        assert r.status_code == 200, r.text
        by_arm.setdefault(r.headers["x-deskgen-ab-arm"], []).append((r.headers["x-request-id"], user))
    arm, delivered = max(by_arm.items(), key=lambda item: len(item[1]))
    assert len(delivered) >= 2, by_arm
    liked = [image_id for image_id, _ in delivered[:2]]
    store = ImageStore(image_store, max_bytes=10**9, retention_s=3600)
    for image_id, user in delivered[:2]:
        r = client.post("/v1/feedback", json={"image_id": image_id, "event": "like", "user_id": user})
        assert r.status_code == 201, r.text
        wait_until(lambda image_id=image_id: store.get(image_id) is not None, f"image {image_id} kept")
    exposures = ExperimentStore.open(experiments_db)
    config = LoraTrainingConfig(name="liked", base_model=str(tiny_models / "sdxl"), rank=4, resolution=64, steps=6,
                                learning_rate=1e-2, checkpoint_every=3)  # fmt: skip
    selection = liked_examples(exposures, store, experiment, arm, config)
    # The app is shared by the tier: other tests' liked images of this arm are selected too.
    mine = [e for e in selection.examples if e.source in {f"image {i}" for i in liked}]
    assert sorted(e.source for e in mine) == sorted(f"image {i}" for i in liked)
    assert {e.caption for e in mine} <= {f"a tidy desk setup {k}" for k in range(12)}
    assert len(selection.examples) == selection.liked - selection.missing
    trained_names.append("liked")
    runs = tmp_path / "runs"
    run = run_training(config, selection.examples, lora_dir=lora_dir, runs_dir=runs)
    assert (run.steps, run.path) == (6, lora_dir / "liked.safetensors")
    assert read_training_metadata(run.path)["data_sha256"] == run.data_sha256
    wait_until(lambda: "liked" in client.get("/v1/mixes").json()["adapters"], "liked listed")
    plain = client.post("/v1/text2img", json={"prompt": "a desk", "steps": 1, "seed": 3, "mix": "ott_only"})
    styled = client.post("/v1/text2img", json={"prompt": "a desk", "steps": 1, "seed": 3, "mix": "liked:1.0+ott:1.0"})
    assert plain.status_code == styled.status_code == 200, styled.text
    assert read_png_metadata(styled.content)["mix_id"] == "liked:1.0+ott:1.0"
    assert plain.content != styled.content
    # Resume with more steps: from the 6-step run's last checkpoint, 4 more; the adapter is replaced.
    longer = LoraTrainingConfig(**{**config.to_dict(), "steps": 10})
    resumed = run_training(longer, selection.examples, lora_dir=lora_dir, runs_dir=runs, resume=True, overwrite=True)
    assert resumed.steps == 10
    assert read_training_metadata(resumed.path)["steps"] == "10"



def test_two_workers_train_what_one_process_averaging_their_gradients_trains(tiny_models: Path, tmp_path: Path) -> None:
    """``--workers 2`` on the app's Ray cluster: each Ray Train worker takes one of two images, and the LoRA
    gradients are all-reduced (averaged) before every update. The adapter it writes is what two trainers in
    this process compute when their gradients are averaged by hand before each update (the same seeded init
    and draws); and it is neither trainer's adapter alone, which it would be without the all-reduce."""
    import threading

    from safetensors.torch import load_file

    from deskgen.lora_training.data import folder_examples
    from deskgen.lora_training.trainer import LoraTrainer, prepare
    from tests.unit.test_lora_training import write_folder

    config = LoraTrainingConfig(name="pair", base_model=str(tiny_models / "sdxl"), rank=4, resolution=64, steps=4,
                                learning_rate=1e-2)  # fmt: skip
    examples = folder_examples(write_folder(tmp_path / "desks", count=2), config)
    (tmp_path / "loras").mkdir()
    run = run_training(config, examples, lora_dir=tmp_path / "loras", runs_dir=tmp_path / "runs", num_workers=2,
                       cpus_per_worker=0.5)  # fmt: skip
    assert run.steps == 4 and run.examples == 2
    trained = load_file(str(run.path))

    # Two trainers, one image each, the gradients averaged between backward and update (DDP by hand).
    pair = [LoraTrainer(config), LoraTrainer(config)]

    def average() -> None:
        for name, param in pair[0].trainable.items():
            other = pair[1].trainable[name]
            if param.grad is not None:
                mean = (param.grad + other.grad) / 2
                param.grad.copy_(mean)
                other.grad.copy_(mean)

    barrier = threading.Barrier(2, action=average)
    errors: list[BaseException] = []

    def sync() -> None:
        barrier.wait()

    def train(trainer: LoraTrainer, example: Any) -> None:
        try:
            for _ in range(config.steps):
                trainer.step([prepare(example, config)], sync=sync)
        except BaseException as exc:
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=train, args=(t, e)) for t, e in zip(pair, examples, strict=True)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not errors and not any(t.is_alive() for t in threads), errors
    averaged = pair[0].lora_tensors()
    # Alone: each image's trainer without the other's gradients.
    alone = []
    for example in examples:
        trainer = LoraTrainer(config)
        for _ in range(config.steps):
            trainer.step([prepare(example, config)])
        alone.append(trainer.lora_tensors())

    def distance(a: dict[str, Any], b: dict[str, Any]) -> float:
        assert a.keys() == b.keys()
        return max(float((a[k].float() - b[k].float()).abs().max() / b[k].float().abs().mean().clamp_min(1e-12))
                   for k in a if a[k].dim() > 0)  # fmt: skip

    assert distance(trained, averaged) < 1e-4  # float rounding of the all-reduce's order
    print(f"\n[two workers] vs averaged by hand {distance(trained, averaged):.2e}; vs each image alone "
          + ", ".join(f"{distance(trained, single):.2e}" for single in alone))
    assert all(distance(trained, single) > 1e-2 for single in alone)
    assert distance(pair[1].lora_tensors(), averaged) == 0  # the hand-made pair stayed in step
