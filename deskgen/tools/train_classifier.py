"""Fine-tune the desk gate on a two-class image folder and save it as a ``.keras`` file.

    python -m deskgen.tools.train_classifier DATA_DIR --out PATH.keras [--backbone vgg16|tiny]
        [--weights imagenet|none] [--epochs N] [--batch-size B] [--train-last-block]
        [--val-split 0.2] [--seed S] [--input-size PX] [--learning-rate LR]

DATA_DIR/true/* are desk setups, DATA_DIR/false/* are not (any format Pillow decodes; every file
goes through :func:`deskgen.images.decode_image`, so it sees exactly the pixels the service sees).
Prints one result line: ``val_accuracy=... n_train=... n_val=... seconds=... out=...``.

Determinism: ``keras.utils.set_random_seed(seed)`` seeds Python, numpy and TensorFlow; the split and
the shuffles derive from ``seed``. On CPU the same seed gives the same model as far as TensorFlow's
kernels are deterministic (multi-threaded reductions may differ in the last bits).
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from deskgen.classifier import (
    Backbone,
    Weights,
    build_gate_model,
    import_keras,
    preprocess_images,
)
from deskgen.errors import InvalidParameter
from deskgen.images import decode_image

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainReport:
    """What a training run achieved: accuracy on the held-out split, split sizes, wall time."""

    val_accuracy: float
    n_train: int
    n_val: int
    seconds: float


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


def train_gate(
    data_dir: Path,
    out: Path,
    *,
    backbone: Backbone = "vgg16",
    weights: Weights = "none",
    epochs: int = 10,
    batch_size: int = 32,
    train_last_block: bool = False,
    val_split: float = 0.2,
    seed: int = 0,
    input_size: int | None = None,
    learning_rate: float = 1e-3,
) -> TrainReport:
    """Train the gate on ``data_dir/{true,false}`` and save it to ``out`` (a ``.keras`` file).

    The validation split is stratified: ``val_split`` of each class is held out (at least one image
    per class). Validation accuracy is measured on the saved model's decisions at threshold 0.5.
    Side effect: seeds the process-global Python, numpy and TensorFlow generators with ``seed``.
    Raises InvalidParameter for bad arguments and FileNotFoundError for a missing or empty class
    folder, both before TensorFlow is touched.
    """
    start = time.perf_counter()
    if not 0.0 < val_split < 1.0:
        raise InvalidParameter(f"`val_split` must be in (0, 1) but is {val_split}.", field="val_split")
    if epochs < 1:
        raise InvalidParameter(f"`epochs` must be at least 1 but is {epochs}.", field="epochs")
    if batch_size < 1:
        raise InvalidParameter(f"`batch_size` must be at least 1 but is {batch_size}.", field="batch_size")
    if Path(out).suffix != ".keras":
        raise InvalidParameter(f"`out` must end in .keras but is {str(out)!r}.", field="out")

    files = {class_dir: _image_files(Path(data_dir) / class_dir) for class_dir in ("true", "false")}

    # 1. Build (validates backbone, weights and size) with seeded initialisers.
    keras = import_keras()
    keras.utils.set_random_seed(seed)
    model = build_gate_model(backbone, weights, input_size, train_last_block)
    size = int(model.input_shape[1])
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=learning_rate),
        loss="binary_crossentropy",
        metrics=["accuracy"],
    )

    # 2. Read both classes and split each one (stratified), all from one seeded generator.
    rng = np.random.default_rng(seed)
    train_x, train_y, val_x, val_y = [], [], [], []
    for label, class_dir in ((1.0, "true"), (0.0, "false")):
        images = [decode_image(f.read_bytes(), field=str(f)) for f in files[class_dir]]
        train_idx, val_idx = _split(len(images), val_split, rng, class_dir)
        train_x.append(preprocess_images([images[i] for i in train_idx], size))
        val_x.append(preprocess_images([images[i] for i in val_idx], size))
        train_y.append(np.full(len(train_idx), label, dtype=np.float32))
        val_y.append(np.full(len(val_idx), label, dtype=np.float32))
    x_train, y_train = np.concatenate(train_x), np.concatenate(train_y)
    x_val, y_val = np.concatenate(val_x), np.concatenate(val_y)
    order = rng.permutation(len(x_train))
    x_train, y_train = x_train[order], y_train[order]

    # 3. Fit; Keras reshuffles every epoch from the seeded TF generator.
    history = model.fit(x_train, y_train, batch_size=batch_size, epochs=epochs, shuffle=True, verbose=0)
    log.info("trained %s gate for %d epochs: final loss %.4f", backbone, epochs, history.history["loss"][-1])

    # 4. Save, and measure accuracy with the threshold the service uses by default.
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    model.save(out)
    val_scores = np.asarray(model.predict_on_batch(x_val)).reshape(-1)
    val_accuracy = float(np.mean((val_scores >= 0.5) == (y_val >= 0.5)))
    report = TrainReport(val_accuracy, len(x_train), len(x_val), time.perf_counter() - start)
    log.info("saved desk gate to %s: %s", out, report)
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data_dir", type=Path, help="folder with true/ and false/ image sub-folders")
    parser.add_argument("--out", type=Path, required=True, help="output .keras file")
    parser.add_argument("--backbone", choices=["vgg16", "tiny"], default="vgg16")
    parser.add_argument("--weights", choices=["imagenet", "none"], default="none")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--train-last-block", action="store_true", help="also fine-tune VGG16's block5")
    parser.add_argument("--val-split", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--input-size", type=int, default=None, help="default: 224 (vgg16) or 64 (tiny)")
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    report = train_gate(
        args.data_dir,
        args.out,
        backbone=args.backbone,
        weights=args.weights,
        epochs=args.epochs,
        batch_size=args.batch_size,
        train_last_block=args.train_last_block,
        val_split=args.val_split,
        seed=args.seed,
        input_size=args.input_size,
        learning_rate=args.learning_rate,
    )
    print(
        f"val_accuracy={report.val_accuracy:.4f} n_train={report.n_train} n_val={report.n_val} "
        f"seconds={report.seconds:.1f} out={args.out}"
    )


if __name__ == "__main__":
    main()
