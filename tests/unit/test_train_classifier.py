"""The desk gate's training CLI (`python -m deskgen.train_classifier`; the training in deskgen/tools/gate_training/).

The quality test trains a tiny gate on a separable generated set and checks it against bounds computed
here, independently of the CLI's own metrics: the held-out images are read back from the sidecar, scored
with the saved model through the service's DeskClassifier, and the ROC-AUC and the precision at the
sidecar's threshold recomputed.

Why ROC-AUC >= 0.9: chance is 0.5. With 8 desk and 8 non-desk validation images a scorer that ignores
the image reaches AUC >= 0.9 with probability ~0.001 (Mann-Whitney U <= 6 of 64 pairs), while the
generated classes are separable (the tiny gate of `make models` reaches validation accuracy 1.0). A
training that learns nothing (labels ignored, weights not updated, the best epoch not restored to a
trained one) fails it; the control below shows that the same check fails for a gate trained on shuffled
labels.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from deskgen.classifier import VGG16_NOTOP_FILE, DeskClassifier
from deskgen.errors import InvalidParameter, ModelFilesMissing, NotAnImage
from deskgen.limits import DEFAULT_UPLOAD_LIMITS
from deskgen.paths import PROJECT_ROOT
from deskgen.tools.gate_training.data import load_training_image
from deskgen.tools.gate_training.metrics import precision_recall, roc_auc, threshold_for_precision
from deskgen.tools.gate_training.training import resolve_weights, train_gate
from deskgen.tools.samples import generate_samples

pytestmark = pytest.mark.unit

MIN_VAL_AUC = 0.9
TARGET_PRECISION = 0.95


def pairwise_auc(labels: list[float], scores: list[float]) -> float:
    """ROC-AUC by definition: P(score of a desk > score of a non-desk), ties half."""
    pos = [s for y, s in zip(labels, scores, strict=True) if y >= 0.5]
    neg = [s for y, s in zip(labels, scores, strict=True) if y < 0.5]
    return sum((p > n) + 0.5 * (p == n) for p in pos for n in neg) / (len(pos) * len(neg))


def train_tiny(data: Path, out: Path, **kwargs: object) -> object:
    settings: dict[str, object] = {
        "backbone": "tiny", "weights": "none", "input_size": 32, "epochs": 8, "batch_size": 16, "seed": 3,
        "target_precision": TARGET_PRECISION,
    }
    return train_gate(data, out, **{**settings, **kwargs})  # type: ignore[arg-type]


def rescore_validation(out: Path, data: Path) -> tuple[dict[str, object], list[float], list[float]]:
    sidecar = json.loads(out.with_suffix(".json").read_text())
    files = sidecar["validation"]["files"]
    gate = DeskClassifier.load(out)
    labels = [1.0 if name.startswith("true/") else 0.0 for name in files]
    scores = gate.score_batch([load_training_image(data / name) for name in files])
    return sidecar, labels, scores


@pytest.fixture(scope="module")
def separable_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = tmp_path_factory.mktemp("gate") / "data"
    generate_samples(data, 40, seed=5, size=48)
    # A training file past the upload limits (10 MiB of PNG noise): training files are not uploads.
    noise = np.random.default_rng(0).integers(0, 256, (1900, 1900, 3), dtype=np.uint8)
    Image.fromarray(noise).save(data / "false" / "huge_noise.png")
    assert (data / "false" / "huge_noise.png").stat().st_size > DEFAULT_UPLOAD_LIMITS.max_upload_bytes
    return data


def test_trained_gate_beats_chance_and_its_threshold_meets_the_target_precision(
    separable_set: Path, tmp_path: Path
) -> None:
    out = tmp_path / "gate.keras"
    report = train_tiny(separable_set, out)
    sidecar, labels, scores = rescore_validation(out, separable_set)

    assert len(labels) == report.n_val == 16 and sum(labels) == 8  # type: ignore[attr-defined]
    auc = pairwise_auc(labels, scores)
    assert auc >= MIN_VAL_AUC, (auc, scores)
    threshold = sidecar["threshold"]
    predicted = [s >= threshold for s in scores]
    true_positives = sum(p and y >= 0.5 for p, y in zip(predicted, labels, strict=True))
    assert sum(predicted) > 0 and true_positives / sum(predicted) >= TARGET_PRECISION
    # The CLI's own numbers agree with the recomputed ones, and the sidecar says what it is.
    assert sidecar["target_met"] is True and sidecar["target_precision"] == TARGET_PRECISION
    assert sidecar["validation"]["roc_auc"] == pytest.approx(auc, abs=1e-6)
    assert report.val_auc == pytest.approx(auc, abs=1e-6)  # type: ignore[attr-defined]
    assert sidecar["validation"]["recall"] == pytest.approx(true_positives / sum(labels))
    assert 1 <= sidecar["best_epoch"]["epoch"] <= 8 and sidecar["best_epoch"]["monitor"] == "val_loss"
    assert sidecar["model_file"] == "gate.keras" and len(sidecar["model_sha256"]) == 64
    assert sidecar["training"]["augment"] is True and sidecar["training"]["weights"] == "none"


def test_the_same_check_fails_for_a_gate_trained_on_shuffled_labels(separable_set: Path, tmp_path: Path) -> None:
    """The control: the bound above is not met by a gate whose labels carry no information."""
    shuffled = tmp_path / "shuffled"
    files = sorted((separable_set / "true").iterdir()) + sorted((separable_set / "false").iterdir())
    files = [f for f in files if f.name != "huge_noise.png"]
    order = np.random.default_rng(1).permutation(len(files))
    for rank, index in enumerate(order):
        target = shuffled / ("true" if rank % 2 == 0 else "false") / files[index].name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(files[index].read_bytes())
    out = tmp_path / "gate.keras"
    train_tiny(shuffled, out, epochs=4)
    _, labels, scores = rescore_validation(out, shuffled)
    assert pairwise_auc(labels, scores) < MIN_VAL_AUC


def test_missing_imagenet_weights_fail_fast_saying_where_keras_looks(tmp_path: Path) -> None:
    data = tmp_path / "data"
    generate_samples(data, 2, seed=0, size=32)
    keras_home = tmp_path / "keras-home"
    code = (
        "import sys\n"
        "from deskgen.train_classifier import main\n"
        "try:\n"
        f"    main([{str(data)!r}, '--out', {str(tmp_path / 'gate.keras')!r}])\n"
        "except SystemExit as exc:\n"
        "    print(exc.code, 'tensorflow' in sys.modules)\n"
    )
    env = {**os.environ, "KERAS_HOME": str(keras_home), "TF_CPP_MIN_LOG_LEVEL": "2"}
    result = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.stdout.split() == ["2", "False"], result.stdout + result.stderr  # exit 2, TensorFlow never imported
    message = result.stderr
    assert str(keras_home / "models" / VGG16_NOTOP_FILE) in message
    assert "$KERAS_HOME/models (default ~/.keras/models)" in message
    assert "--weights PATH" in message and "--weights none" in message and "never downloads" in message
    assert not (tmp_path / "gate.keras").exists()


def test_the_module_path_of_the_issue_runs_the_same_program() -> None:
    result = subprocess.run([sys.executable, "-m", "deskgen.train_classifier", "--help"], cwd=PROJECT_ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    assert "--finetune-epochs" in result.stdout and "--target-precision" in result.stdout
    assert "imagenet|none|PATH" in result.stdout


def test_weights_resolution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    with pytest.raises(ModelFilesMissing) as info:
        resolve_weights("vgg16", None)  # the default is ImageNet
    assert info.value.path == str(tmp_path / "models" / VGG16_NOTOP_FILE)
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / VGG16_NOTOP_FILE).write_bytes(b"h5")
    assert resolve_weights("vgg16", None) == ("imagenet", tmp_path / "models" / VGG16_NOTOP_FILE)
    assert resolve_weights("vgg16", "none") == ("none", None)
    assert resolve_weights("tiny", None) == ("none", None)  # the tiny backbone has no pretrained weights
    assert resolve_weights("vgg16", str(tmp_path / "models" / VGG16_NOTOP_FILE))[0] == "path"
    with pytest.raises(ModelFilesMissing, match=r"elsewhere\.h5"):
        resolve_weights("vgg16", str(tmp_path / "elsewhere.h5"))
    with pytest.raises(InvalidParameter, match="must be 'none' for the tiny backbone"):
        resolve_weights("tiny", "imagenet")


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"target_precision": 0.0}, "target_precision"),
        ({"target_precision": 1.5}, "target_precision"),
        ({"finetune_epochs": -1}, "finetune_epochs"),
        ({"monitor": "accuracy"}, "monitor"),
        ({"epochs": 0}, "epochs"),
    ],
)
def test_bad_arguments_are_refused_before_training(tmp_path: Path, kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidParameter) as info:
        train_gate(tmp_path, tmp_path / "g.keras", backbone="tiny", **kwargs)  # type: ignore[arg-type]
    assert info.value.field == field


def test_a_file_that_is_not_an_image_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "notes.txt"
    bad.write_text("not a photo")
    with pytest.raises(NotAnImage, match=r"notes\.txt"):
        load_training_image(bad)


def test_metrics_on_known_scores() -> None:
    labels = np.array([1, 1, 1, 0, 0, 0, 1, 0], dtype=np.float32)
    scores = np.array([0.9, 0.8, 0.7, 0.65, 0.3, 0.2, 0.1, 0.1])
    assert roc_auc(labels, scores) == pytest.approx(pairwise_auc(labels.tolist(), scores.tolist()))
    # Precision 1.0 holds down to 0.7 (3 desks); the threshold sits halfway to the next score (0.65).
    assert threshold_for_precision(labels, scores, 1.0) == (pytest.approx(0.675), True)
    assert precision_recall(labels, scores, 0.675) == (1.0, 0.75)
    # 0.75 would allow one non-desk in, but accepting 0.65 gains no recall: the cut stays at 0.675.
    assert threshold_for_precision(labels, scores, 0.75) == (pytest.approx(0.675), True)
    # Here it does: accepting the non-desk at 0.8 lets two more desks in at precision 0.75.
    labels2, scores2 = np.array([1, 0, 1, 1, 0.0]), np.array([0.9, 0.8, 0.7, 0.6, 0.5])
    threshold, met = threshold_for_precision(labels2, scores2, 0.75)
    assert met and threshold == pytest.approx(0.55) and precision_recall(labels2, scores2, threshold) == (0.75, 1.0)
    # Unreachable: the most precise cut, flagged.
    threshold, met = threshold_for_precision(np.array([0, 1.0]), np.array([0.9, 0.1]), 0.9)
    assert not met and threshold == pytest.approx(0.1)
    assert np.isnan(roc_auc(np.ones(3), np.array([0.1, 0.2, 0.3])))


def test_stage_two_unfreezes_exactly_vgg16s_last_block() -> None:
    from deskgen.classifier import build_gate_model
    from deskgen.tools.gate_training.training import _unfreeze_last_block

    model = build_gate_model("vgg16", "none", input_size=32)
    assert {w.path.split("/")[0] for w in model.trainable_weights} == {"gate_dense", "desk_score"}
    _unfreeze_last_block(model, "vgg16")
    assert {w.path.split("/")[0] for w in model.trainable_weights} == {
        "block5_conv1", "block5_conv2", "block5_conv3", "gate_dense", "desk_score",
    }


def test_two_stages_keep_the_best_epoch_of_both(separable_set: Path, tmp_path: Path) -> None:
    out = tmp_path / "gate.keras"
    report = train_tiny(separable_set, out, epochs=2, finetune_epochs=2, monitor="val_auc", augment=False)
    sidecar = json.loads(out.with_suffix(".json").read_text())
    best = sidecar["best_epoch"]
    assert best["monitor"] == "val_auc" and 1 <= best["epoch"] <= 4
    assert best["stage"] == ("head" if best["epoch"] <= 2 else "finetune") == report.best_stage  # type: ignore[attr-defined]
    assert sidecar["training"]["finetune_epochs"] == 2 and sidecar["training"]["augment"] is False
    # The saved model is the best epoch's: its validation AUC is the one the tracker recorded.
    _, labels, scores = rescore_validation(out, separable_set)
    assert pairwise_auc(labels, scores) == pytest.approx(best["value"], abs=0.02)


def test_weights_from_a_path_are_the_backbones_starting_point(separable_set: Path, tmp_path: Path) -> None:
    """`--weights PATH`: a VGG16 no-top weights file (here a seeded random one, Keras 3 format) loads into
    the gate's backbone, which stage 1 keeps frozen: the saved gate holds exactly those convolutions."""
    from deskgen.classifier import import_keras

    keras = import_keras()
    keras.utils.set_random_seed(123)
    backbone = keras.applications.VGG16(include_top=False, weights=None, input_shape=(32, 32, 3))
    weights_file = tmp_path / "vgg16_notop.weights.h5"
    backbone.save_weights(weights_file)
    out = tmp_path / "gate.keras"
    train_gate(separable_set, out, backbone="vgg16", weights=str(weights_file), input_size=32, epochs=1,
               batch_size=32, augment=False, target_precision=0.5)
    gate = DeskClassifier.load(out).model.get_layer("vgg16")
    for name in ("block1_conv1", "block5_conv3"):
        for saved, loaded in zip(gate.get_layer(name).get_weights(), backbone.get_layer(name).get_weights(), strict=True):
            np.testing.assert_array_equal(saved, loaded)
