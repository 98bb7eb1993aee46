"""Train the desk gate on a two-class image folder; save it as ``.keras`` with a ``.json`` sidecar.

    python -m deskgen.train_classifier DATA_DIR --out PATH.keras
        [--backbone vgg16|tiny] [--weights imagenet|none|PATH.h5] [--epochs N] [--finetune-epochs N]
        [--learning-rate LR] [--finetune-learning-rate LR] [--batch-size B] [--val-split 0.2]
        [--monitor val_loss|val_auc] [--target-precision 0.95] [--no-augment] [--seed S] [--input-size PX]

(``python -m deskgen.tools.train_classifier`` is the same program.) DATA_DIR/true/* are desk setups,
DATA_DIR/false/* are not, any format Pillow decodes, any size: training files are not uploads, so the
HTTP upload limits do not apply (Pillow's decompression-bomb guard does).

What a run does:
  1. Checks every argument and, for ``--weights imagenet`` (the default with the VGG16 backbone), that the
     Keras file :data:`~deskgen.classifier.VGG16_NOTOP_FILE` is in ``$KERAS_HOME/models`` (default
     ``~/.keras/models``) — before TensorFlow is imported. Nothing is downloaded: a missing file stops the
     run with that path and the two ways on (copy the file there, or ``--weights PATH`` / ``none``),
     instead of silently training a head on random convolution features.
  2. Holds out a stratified validation split (``val_split`` of each class, at least one image each).
  3. Stage 1: trains the head with the backbone frozen (the tiny backbone, random, trains whole), with
     augmentation (horizontal flips, small shifts and zooms, brightness) on the training split only and
     class weights that balance the two classes.
  4. Stage 2 (``--finetune-epochs`` > 0): unfreezes VGG16's last block (block5) and trains on at a low
     learning rate.
  5. Keeps the best epoch of both stages by ``--monitor`` on the validation split (not the last one).
  6. Reports validation ROC-AUC, precision and recall, and picks the threshold with the most validation
     recall among those whose validation precision reaches ``--target-precision``.
  7. Writes ``PATH.keras`` and ``PATH.json`` (threshold, metrics, settings, the model file's sha256).
     The service reads its threshold from the Classifier's ``user_config`` ``threshold`` in
     serve_config.yaml (the one source of truth); the CLI prints the line to put there.

Prints one result line: ``val_accuracy=... val_auc=... precision=... recall=... threshold=...
n_train=... n_val=... seconds=... out=...``. Exit status 0; 1 when the target precision was not reached
on the validation split (both files are still written, ``target_met: false``); 2 for bad arguments or
missing files (the message says which and how to fix it).

Determinism: ``keras.utils.set_random_seed(seed)`` seeds Python, numpy and TensorFlow; the split and
the shuffles derive from ``seed``. On CPU the same seed gives the same model as far as TensorFlow's
kernels are deterministic (multi-threaded reductions may differ in the last bits).
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import logging
import math
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image, UnidentifiedImageError

from deskgen.classifier import (
    DEFAULT_INPUT_SIZE,
    VGG16_NOTOP_FILE,
    Backbone,
    build_gate_model,
    import_keras,
    keras_cache_file,
    preprocess_images,
)
from deskgen.errors import InvalidParameter, ModelFilesMissing, NotAnImage
from deskgen.images import to_rgb

log = logging.getLogger(__name__)

Monitor = Literal["val_loss", "val_auc"]
MONITORS: dict[str, str] = {"val_loss": "min", "val_auc": "max"}

DEFAULT_TARGET_PRECISION = 0.95
DEFAULT_FINETUNE_LEARNING_RATE = 1e-5
#: Augmentation strengths: shifts and zoom as a fraction of the side, brightness in pixel values (0-255).
AUGMENT_SHIFT = 0.06
AUGMENT_ZOOM = 0.1
AUGMENT_BRIGHTNESS = 20.0


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


# -------------------------------------------------------------------------------------------- files


def sidecar_path(out: Path) -> Path:
    """``gate.keras`` -> ``gate.json``."""
    return Path(out).with_suffix(".json")


def _image_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise FileNotFoundError(
            f"training images not found: {str(folder)!r} must be a folder of images "
            "(generate a set with `python -m deskgen.tools.samples DATA_DIR`)."
        )
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    if not files:
        raise FileNotFoundError(f"training images not found: {str(folder)!r} is empty.")
    return files


def load_training_image(path: Path) -> Image.Image:
    """Decode a training file to RGB (EXIF orientation applied, see :func:`deskgen.images.to_rgb`).

    Not :func:`deskgen.images.decode_image`: that one enforces the HTTP upload limits (bytes, pixels),
    which a 24-megapixel camera original exceeds. Pillow's decompression-bomb guard still applies.
    Raises :class:`NotAnImage` naming the file when Pillow cannot decode it.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # big originals are fine here
            with Image.open(path) as image:
                image.load()
                return to_rgb(image)
    except Image.DecompressionBombError as exc:
        raise NotAnImage(f"training image {str(path)!r} is too large to decode safely: {exc}", field="data_dir") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise NotAnImage(
            f"training image {str(path)!r} is not a decodable image (JPEG, PNG, WebP, ...): {exc}. "
            "Remove it from the folder.",
            field="data_dir",
        ) from exc


def _split(n: int, val_split: float, rng: np.random.Generator, label: str) -> tuple[np.ndarray, np.ndarray]:
    """Shuffle indices 0..n-1 and hold out ``round(n * val_split)`` (at least 1) of them."""
    order = rng.permutation(n)
    n_val = max(1, round(n * val_split))
    if n_val >= n:
        raise InvalidParameter(
            f"`val_split` {val_split} leaves no training images of class {label!r} ({n} images).",
            field="val_split",
        )
    return order[n_val:], order[:n_val]


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


# ------------------------------------------------------------------------------------------ metrics


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U with tied scores counted half); NaN without both classes."""
    labels = np.asarray(labels) >= 0.5
    scores = np.asarray(scores, dtype=np.float64)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    sorted_scores = scores[order]
    i = 0
    while i < len(scores):
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def precision_recall(labels: np.ndarray, scores: np.ndarray, threshold: float) -> tuple[float, float]:
    """Precision and recall of ``score >= threshold`` (the service's rule); precision is NaN when
    nothing is predicted positive."""
    positive = np.asarray(labels) >= 0.5
    predicted = np.asarray(scores) >= threshold
    tp = int((positive & predicted).sum())
    precision = tp / int(predicted.sum()) if predicted.any() else math.nan
    recall = tp / int(positive.sum()) if positive.any() else math.nan
    return precision, recall


def threshold_for_precision(labels: np.ndarray, scores: np.ndarray, target: float) -> tuple[float, bool]:
    """The threshold with the most recall among those whose precision on (``labels``, ``scores``)
    reaches ``target`` (the highest such threshold among equal recall: no extra false accepts for
    nothing), and whether any reaches it. Placed halfway between the last score it accepts and the next
    lower one, so the decisions on these scores hold with a margin. When none reaches ``target``: the
    most precise one (the most recall among equals), and ``False``."""
    positive = np.asarray(labels) >= 0.5
    scores = np.asarray(scores, dtype=np.float64)
    order = np.argsort(-scores, kind="mergesort")
    s, y = scores[order], positive[order]
    tp, fp = np.cumsum(y), np.cumsum(~y)
    # Candidate cuts: after the last of each group of tied scores (accept every score >= s[k]).
    ends = np.flatnonzero(np.append(s[1:] != s[:-1], True))
    precision = tp[ends] / (tp[ends] + fp[ends])
    meets = np.flatnonzero(precision >= target)
    met = meets.size > 0
    if met:
        best_tp = tp[ends[meets]].max()
        pick = ends[meets[np.flatnonzero(tp[ends[meets]] == best_tp)[0]]]
    else:
        most_precise = np.flatnonzero(precision == precision.max())
        pick = ends[most_precise[-1]]
    threshold = (s[pick] + s[pick + 1]) / 2 if pick + 1 < len(s) else s[pick]
    return float(threshold), met


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

    See the module docstring for the steps. ``weights``: ``None`` (the backbone's default: ``imagenet``
    for VGG16, ``none`` for tiny), ``"imagenet"``, ``"none"`` or the path of a VGG16 no-top ``.h5`` file.
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


def _training_dataset(keras: Any, x: np.ndarray, y: np.ndarray, batch_size: int, seed: int, augment: bool) -> Any:
    """A shuffled, batched ``tf.data`` pipeline; augmentation on the training split only. The inputs are
    VGG-normalised (mean-subtracted BGR): flips, shifts and zooms (reflected borders) are unaffected by
    that; brightness is one offset added to every channel, which is what a brighter photo gives."""
    import tensorflow as tf

    data = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
    data = data.batch(batch_size)
    if augment:
        layers = keras.Sequential(
            [
                keras.layers.RandomFlip("horizontal", seed=seed),
                keras.layers.RandomTranslation(AUGMENT_SHIFT, AUGMENT_SHIFT, fill_mode="reflect", seed=seed + 1),
                keras.layers.RandomZoom(AUGMENT_ZOOM, fill_mode="reflect", seed=seed + 2),
            ],
            name="augment",
        )

        def augment_batch(images: Any, labels: Any) -> tuple[Any, Any]:
            images = layers(images, training=True)
            shift = tf.random.uniform((tf.shape(images)[0], 1, 1, 1), -AUGMENT_BRIGHTNESS, AUGMENT_BRIGHTNESS, seed=seed + 3)
            return images + shift, labels

        data = data.map(augment_batch, num_parallel_calls=1)
    return data.prefetch(1)


def _unfreeze_last_block(model: Any, backbone: Backbone) -> None:
    """Stage 2: VGG16's block5 becomes trainable (the tiny backbone already trains whole)."""
    if backbone != "vgg16":
        return
    for layer in model.get_layer("vgg16").layers:
        if layer.name.startswith("block5"):
            layer.trainable = True


# ---------------------------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m deskgen.train_classifier", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("data_dir", type=Path, help="folder with true/ and false/ image sub-folders")
    parser.add_argument("--out", type=Path, required=True, help="output .keras file (the .json sidecar goes next to it)")
    parser.add_argument("--backbone", choices=["vgg16", "tiny"], default="vgg16")
    parser.add_argument("--weights", default=None, metavar="imagenet|none|PATH",
                        help="starting weights of the backbone (default: imagenet for vgg16, none for tiny)")
    parser.add_argument("--epochs", type=int, default=10, help="stage 1 (head) epochs")
    parser.add_argument("--finetune-epochs", type=int, default=0,
                        help="stage 2 epochs with VGG16's block5 unfrozen (default 0: off; 3-5 with ImageNet weights)")
    parser.add_argument("--learning-rate", type=float, default=1e-3, help="stage 1 learning rate")
    parser.add_argument("--finetune-learning-rate", type=float, default=DEFAULT_FINETUNE_LEARNING_RATE)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--val-split", type=float, default=0.2)
    parser.add_argument("--monitor", choices=sorted(MONITORS), default="val_loss", help="what picks the best epoch")
    parser.add_argument("--target-precision", type=float, default=DEFAULT_TARGET_PRECISION,
                        help="the threshold: the most validation recall at this validation precision")
    parser.add_argument("--no-augment", action="store_true", help="train on the images as they are")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--input-size", type=int, default=None, help="default: 224 (vgg16) or 64 (tiny)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        report = train_gate(
            args.data_dir,
            args.out,
            backbone=args.backbone,
            weights=args.weights,
            epochs=args.epochs,
            finetune_epochs=args.finetune_epochs,
            batch_size=args.batch_size,
            val_split=args.val_split,
            seed=args.seed,
            input_size=args.input_size,
            learning_rate=args.learning_rate,
            finetune_learning_rate=args.finetune_learning_rate,
            monitor=args.monitor,
            target_precision=args.target_precision,
            augment=not args.no_augment,
        )
    except (InvalidParameter, NotAnImage) as exc:
        parser.exit(2, f"error: {exc.message}\n")
    except (ModelFilesMissing, FileNotFoundError) as exc:
        parser.exit(2, f"error: {exc}\n")
    print(
        f"val_accuracy={report.val_accuracy:.4f} val_auc={report.val_auc:.4f} precision={report.precision:.4f} "
        f"recall={report.recall:.4f} threshold={report.threshold:.4f} n_train={report.n_train} "
        f"n_val={report.n_val} seconds={report.seconds:.1f} out={args.out}"
    )
    print(
        f"# serve_config.yaml, Classifier user_config: threshold: {report.threshold:.4f}   "
        f"(validation precision {report.precision:.3f}, recall {report.recall:.3f}; {report.sidecar})",
        file=sys.stderr,
    )
    if not report.target_met:
        print(
            f"warning: no threshold reaches precision {report.target_precision} on the {report.n_val} validation "
            f"images; the sidecar records the most precise one ({report.precision:.3f}) with target_met false. "
            "Add training images or lower --target-precision.",
            file=sys.stderr,
        )
        sys.exit(1)


if __name__ == "__main__":
    main()
