"""Train the desk gate on a two-class image folder; save it as ``.keras`` with a ``.json`` sidecar.

    python -m deskgen.train_classifier DATA_DIR --out PATH.keras
        [--backbone vgg16|tiny] [--weights imagenet|none|PATH.h5] [--epochs N] [--finetune-epochs N]
        [--learning-rate LR] [--finetune-learning-rate LR] [--batch-size B] [--val-split 0.2]
        [--monitor val_loss|val_auc] [--target-precision 0.95] [--no-augment] [--seed S] [--input-size PX]

DATA_DIR/true/* are desk setups, DATA_DIR/false/* are not, any format Pillow decodes, any size: training
files are not uploads, so the HTTP upload limits do not apply (Pillow's decompression-bomb guard does).
This module is the CLI, the one entry point; the training itself is :mod:`deskgen.tools.gate_training`.

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
import logging
import sys
from pathlib import Path

from deskgen.errors import InvalidParameter, ModelFilesMissing, NotAnImage
from deskgen.tools.gate_training.training import (
    DEFAULT_FINETUNE_LEARNING_RATE,
    DEFAULT_TARGET_PRECISION,
    MONITORS,
    train_gate,
)


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
