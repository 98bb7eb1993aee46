"""Build the tiny desk gate: a generated two-class sample set and a tiny VGG-shaped gate trained on it.

Writes ``out/samples/{true,false}/*.png`` and ``out/classifier/desk_gate.keras``; called by
:func:`deskgen.tools.tiny.build_all`. The gate loads through the same :meth:`DeskClassifier.load` as a real
fine-tuned VGG16 file: pointing the config at another ``.keras`` file is the only change.

Fixed seeds throughout; the classes are easy, so validation accuracy is 1.0. Budget: well under 20 s
on a 2-core CPU: ~1.5 s of drawing, ~3 s of TensorFlow import, ~5-8 s of training.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

log = logging.getLogger(__name__)

SAMPLES_DIR = "samples"
GATE_FILE = Path("classifier") / "desk_gate.keras"

N_PER_CLASS = 200
SAMPLE_SIZE = 96
SEED = 0
EPOCHS = 12
BATCH_SIZE = 16
LEARNING_RATE = 1e-3
#: Below this the build fails instead of shipping a gate the tests would trip over.
MIN_VAL_ACCURACY = 0.95


def build(out: Path) -> None:
    """Generate ``out/samples`` and train ``out/classifier/desk_gate.keras`` (tiny backbone, 64 px)."""
    from deskgen.tools.gate_training.training import train_gate
    from deskgen.tools.samples import generate_samples

    start = time.perf_counter()
    samples = Path(out) / SAMPLES_DIR
    generate_samples(samples, N_PER_CLASS, SEED, SAMPLE_SIZE)
    generated = time.perf_counter()
    report = train_gate(
        samples,
        Path(out) / GATE_FILE,
        backbone="tiny",
        weights="none",
        epochs=EPOCHS,
        batch_size=BATCH_SIZE,
        seed=SEED,
        learning_rate=LEARNING_RATE,
    )
    if report.val_accuracy < MIN_VAL_ACCURACY:
        raise RuntimeError(
            f"the tiny desk gate reached validation accuracy {report.val_accuracy:.3f}, "
            f"below the required {MIN_VAL_ACCURACY}: the sample generator or training settings changed.",
        )
    log.info(
        "tiny desk gate: samples %.1f s, training %.1f s, val_accuracy %.3f (%d train / %d val)",
        generated - start, report.seconds, report.val_accuracy, report.n_train, report.n_val,
    )
