"""One training run of the desk gate: arguments and starting weights checked before TensorFlow, stage 1
(head) and stage 2 (block5 fine-tuning) with the best epoch of both kept, then the validation metrics,
the threshold, and the ``.keras`` file with its ``.json`` sidecar (:func:`train_gate`).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from deskgen.classifier import (
    DEFAULT_INPUT_SIZE,
    VGG16_NOTOP_FILE,
    Backbone,
    build_gate_model,
    import_keras,
    keras_cache_file,
    preprocess_images,
)
from deskgen.errors import InvalidParameter, ModelFilesMissing
from deskgen.tools.gate_training.data import _image_files, _split, _training_dataset, load_training_image
from deskgen.tools.gate_training.metrics import precision_recall, roc_auc, threshold_for_precision

log = logging.getLogger(__name__)

Monitor = Literal["val_loss", "val_auc"]
MONITORS: dict[str, str] = {"val_loss": "min", "val_auc": "max"}

DEFAULT_TARGET_PRECISION = 0.95
DEFAULT_FINETUNE_LEARNING_RATE = 1e-5


@dataclass(frozen=True)
class TrainReport:
    """What a training run achieved on the held-out split, and where it wrote."""

    #: Accuracy at threshold 0.5 (the Classifier's default ``threshold``).
    val_accuracy: float
    n_train: int
    n_val: int
    seconds: float
    val_auc: float = math.nan
    #: The threshold picked for ``target_precision``, and precision / recall at it.
    threshold: float = 0.5
    precision: float = math.nan
    recall: float = math.nan
    target_precision: float = DEFAULT_TARGET_PRECISION
    target_met: bool = False
    #: 1-based, counted over both stages; the stage it belongs to.
    best_epoch: int = 0
    best_stage: str = "head"
    sidecar: str = ""


# ------------------------------------------------------------------------------- files and weights


def sidecar_path(out: Path) -> Path:
    """``gate.keras`` -> ``gate.json``."""
    return Path(out).with_suffix(".json")


def resolve_weights(backbone: Backbone, weights: str | None) -> tuple[str, Path | None]:
    """The weights to start from: ``("imagenet", file)``, ``("path", file)`` or ``("none", None)``.

    ``None`` means the backbone's default: ImageNet for VGG16, random for the tiny backbone (it has no
    pretrained weights). Raises :class:`ModelFilesMissing` (with the Keras cache path, or the path given)
    when the file is absent, and :class:`InvalidParameter` for weights the backbone cannot take.
    """
    if weights is None:
        weights = "imagenet" if backbone == "vgg16" else "none"
    if weights == "none":
        return "none", None
    if backbone != "vgg16":
        raise InvalidParameter(
            f"`weights` must be 'none' for the tiny backbone (it has no pretrained weights) but is {weights!r}.",
            field="weights",
        )
    if weights == "imagenet":
        cached = keras_cache_file(VGG16_NOTOP_FILE)
        if not cached.is_file():
            raise ModelFilesMissing(
                "VGG16 ImageNet weights (no top)",
                str(cached),
                hint=(
                    f"Keras looks for {VGG16_NOTOP_FILE} in $KERAS_HOME/models (default ~/.keras/models) and this "
                    "tool never downloads. Copy the file there (it is published at https://storage.googleapis.com/"
                    f"tensorflow/keras-applications/vgg16/{VGG16_NOTOP_FILE}), or pass `--weights PATH` to a copy, "
                    "or `--weights none` to train on random convolution features (a much weaker gate)"
                ),
            )
        return "imagenet", cached
    path = Path(weights).expanduser()
    if not path.is_file():
        raise ModelFilesMissing(
            "VGG16 weights file (no top, .h5)", str(path),
            hint=f"pass the path of {VGG16_NOTOP_FILE}, or `--weights imagenet` / `--weights none`",
        )
    return "path", path


# ------------------------------------------------------------------------------------------ training


def train_gate(
    data_dir: Path,
    out: Path,
    *,
    backbone: Backbone = "vgg16",
    weights: str | None = None,
    epochs: int = 10,
    finetune_epochs: int = 0,
    batch_size: int = 32,
    val_split: float = 0.2,
    seed: int = 0,
    input_size: int | None = None,
    learning_rate: float = 1e-3,
    finetune_learning_rate: float = DEFAULT_FINETUNE_LEARNING_RATE,
    monitor: Monitor = "val_loss",
    target_precision: float = DEFAULT_TARGET_PRECISION,
    augment: bool = True,
) -> TrainReport:
    """Train the gate on ``data_dir/{true,false}``; write ``out`` (``.keras``) and its ``.json`` sidecar.

    See :mod:`deskgen.train_classifier` for the steps. ``weights``: ``None`` (the backbone's default:
    ``imagenet`` for VGG16, ``none`` for tiny), ``"imagenet"``, ``"none"`` or the path of a VGG16 no-top
    ``.h5`` file.
    Side effect: seeds the process-global Python, numpy and TensorFlow generators with ``seed``.
    Raises :class:`InvalidParameter` for bad arguments, :class:`ModelFilesMissing` for absent weights and
    ``FileNotFoundError`` for a missing or empty class folder — all before TensorFlow is imported — and
    :class:`NotAnImage` naming a file that does not decode.
    """
    start = time.perf_counter()
    # 1. Arguments, weights and files, before TensorFlow.
    if not 0.0 < val_split < 1.0:
        raise InvalidParameter(f"`val_split` must be in (0, 1) but is {val_split}.", field="val_split")
    if epochs < 1:
        raise InvalidParameter(f"`epochs` must be at least 1 but is {epochs}.", field="epochs")
    if finetune_epochs < 0:
        raise InvalidParameter(f"`finetune_epochs` must be at least 0 but is {finetune_epochs}.", field="finetune_epochs")
    if batch_size < 1:
        raise InvalidParameter(f"`batch_size` must be at least 1 but is {batch_size}.", field="batch_size")
    if not 0.0 < target_precision <= 1.0:
        raise InvalidParameter(
            f"`target_precision` must be in (0, 1] but is {target_precision}.", field="target_precision"
        )
    if monitor not in MONITORS:
        raise InvalidParameter(f"`monitor` must be one of {sorted(MONITORS)} but is {monitor!r}.", field="monitor")
    if Path(out).suffix != ".keras":
        raise InvalidParameter(f"`out` must end in .keras but is {str(out)!r}.", field="out")
    if backbone not in DEFAULT_INPUT_SIZE:
        raise InvalidParameter(
            f"`backbone` must be one of {sorted(DEFAULT_INPUT_SIZE)} but is {backbone!r}.", field="backbone"
        )
    weights_kind, weights_file = resolve_weights(backbone, weights)
    files = {class_dir: _image_files(Path(data_dir) / class_dir) for class_dir in ("true", "false")}

    # 2. Build with seeded initialisers; start from the weights file when one is given.
    keras = import_keras()
    keras.utils.set_random_seed(seed)
    model = build_gate_model(backbone, "imagenet" if weights_kind == "imagenet" else "none", input_size)
    if weights_kind == "path":
        model.get_layer("vgg16").load_weights(str(weights_file))
    size = int(model.input_shape[1])

    # 3. Read both classes and split each one (stratified), all from one seeded generator.
    rng = np.random.default_rng(seed)
    train_x, train_y, val_x, val_y = [], [], [], []
    val_files: list[str] = []
    for label, class_dir in ((1.0, "true"), (0.0, "false")):
        images = [load_training_image(f) for f in files[class_dir]]
        train_idx, val_idx = _split(len(images), val_split, rng, class_dir)
        val_files.extend(f"{class_dir}/{files[class_dir][i].name}" for i in val_idx)
        train_x.append(preprocess_images([images[i] for i in train_idx], size))
        val_x.append(preprocess_images([images[i] for i in val_idx], size))
        train_y.append(np.full(len(train_idx), label, dtype=np.float32))
        val_y.append(np.full(len(val_idx), label, dtype=np.float32))
    x_train, y_train = np.concatenate(train_x), np.concatenate(train_y)
    x_val, y_val = np.concatenate(val_x), np.concatenate(val_y)
    order = rng.permutation(len(x_train))
    x_train, y_train = x_train[order], y_train[order]
    n_pos = float(y_train.sum())
    class_weight = {1: len(y_train) / (2 * n_pos), 0: len(y_train) / (2 * (len(y_train) - n_pos))}

    # 4. Stage 1 (head), then stage 2 (block5 at a low learning rate); the best epoch of both is kept.
    train_data = _training_dataset(keras, x_train, y_train, batch_size, seed, augment)
    best = _best_epoch_tracker(keras, monitor)
    stages = [("head", epochs, learning_rate)]
    if finetune_epochs:
        stages.append(("finetune", finetune_epochs, finetune_learning_rate))
    for stage, stage_epochs, rate in stages:
        if stage == "finetune":
            model.set_weights(best.weights)  # fine-tune from the best head, not from the last epoch
            _unfreeze_last_block(model, backbone)
        model.compile(
            optimizer=keras.optimizers.Adam(learning_rate=rate),
            loss="binary_crossentropy",
            metrics=[keras.metrics.AUC(name="auc")],
        )
        best.stage = stage
        history = model.fit(
            train_data, validation_data=(x_val, y_val), epochs=stage_epochs, class_weight=class_weight,
            callbacks=[best], shuffle=False, verbose=0,  # the dataset reshuffles every epoch itself
        )
        log.info("stage %s: %d epochs, %s", stage, stage_epochs,
                 ", ".join(f"{k} {v[-1]:.4f}" for k, v in history.history.items()))
    if best.weights is None:
        raise RuntimeError(f"no epoch reported `{monitor}`: {best.seen}")
    model.set_weights(best.weights)

    # 5. Metrics on the validation split, the threshold for the target precision, the files.
    val_scores = np.asarray(model.predict_on_batch(x_val)).reshape(-1)
    threshold, met = threshold_for_precision(y_val, val_scores, target_precision)
    precision, recall = precision_recall(y_val, val_scores, threshold)
    at_half = precision_recall(y_val, val_scores, 0.5)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    model.save(out)
    report = TrainReport(
        val_accuracy=float(np.mean((val_scores >= 0.5) == (y_val >= 0.5))),
        n_train=len(x_train),
        n_val=len(x_val),
        seconds=time.perf_counter() - start,
        val_auc=roc_auc(y_val, val_scores),
        threshold=threshold,
        precision=precision,
        recall=recall,
        target_precision=target_precision,
        target_met=met,
        best_epoch=best.epoch,
        best_stage=best.best_stage,
        sidecar=str(sidecar_path(out)),
    )
    sidecar = {
        "threshold": threshold,
        "target_precision": target_precision,
        "target_met": met,
        "validation": {
            "n": len(y_val),
            "n_desk": int(y_val.sum()),
            "roc_auc": report.val_auc,
            "precision": precision,
            "recall": recall,
            "at_threshold_0.5": {"accuracy": report.val_accuracy, "precision": at_half[0], "recall": at_half[1]},
            # Relative to data_dir: the held-out images, so the numbers above can be checked or recomputed.
            "files": val_files,
        },
        "best_epoch": {"epoch": best.epoch, "stage": best.best_stage, "monitor": monitor, "value": best.value},
        "training": {
            "data_dir": str(data_dir), "n_train": len(x_train), "backbone": backbone, "weights": weights_kind,
            "weights_file": str(weights_file) if weights_file else None, "input_size": size, "epochs": epochs,
            "finetune_epochs": finetune_epochs, "learning_rate": learning_rate,
            "finetune_learning_rate": finetune_learning_rate, "batch_size": batch_size, "augment": augment,
            "val_split": val_split, "seed": seed,
        },
        "model_file": out.name,
        "model_sha256": hashlib.sha256(out.read_bytes()).hexdigest(),
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    # NaN (one class missing from a tiny split) is written as null: the file stays strict JSON.
    sidecar_path(out).write_text(json.dumps(_nan_to_none(sidecar), indent=2) + "\n")
    log.info("saved desk gate to %s and %s: %s", out, sidecar_path(out), report)
    return report


def _nan_to_none(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    return value


def _best_epoch_tracker(keras: Any, monitor: Monitor) -> Any:
    """A Keras callback that keeps the weights of the best epoch by ``monitor``, across ``fit`` calls
    (stages); set ``stage`` before each. Epochs are counted 1-based over all stages."""
    minimise = MONITORS[monitor] == "min"

    class BestEpoch(keras.callbacks.Callback):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            super().__init__()
            self.value = math.inf if minimise else -math.inf
            self.weights: list[Any] | None = None
            self.epoch, self.best_stage, self.stage, self.count = 0, "head", "head", 0
            self.seen: list[str] = []

        def on_epoch_end(self, epoch: int, logs: dict[str, float] | None = None) -> None:
            logs = logs or {}
            self.count += 1
            self.seen = sorted(logs)
            value = logs.get(monitor)
            if value is None or math.isnan(value):
                return
            if (value < self.value) if minimise else (value > self.value):
                self.value, self.weights = float(value), self.model.get_weights()
                self.epoch, self.best_stage = self.count, self.stage

    return BestEpoch()


def _unfreeze_last_block(model: Any, backbone: Backbone) -> None:
    """Stage 2: VGG16's block5 becomes trainable (the tiny backbone already trains whole)."""
    if backbone != "vgg16":
        return
    for layer in model.get_layer("vgg16").layers:
        if layer.name.startswith("block5"):
            layer.trainable = True
