"""The desk gate: "is this photo a desk setup?" — a Keras VGG16 (or a tiny VGG-shaped) binary classifier.

Ray-free. The Serve deployment wraps :class:`DeskClassifier`; the training CLI
(:mod:`deskgen.tools.gate_training`) builds models with :func:`build_gate_model`.

TensorFlow and Keras are imported inside functions only: the ingress process imports this package
(for the errors and types) and must never pay for, or hold, TensorFlow.

Preprocessing contract (the same for training and serving, see :func:`preprocess_images`):
  1. :func:`deskgen.images.to_rgb` (EXIF orientation, any mode -> RGB, transparency on white);
  2. resize the WHOLE image to ``input_size`` x ``input_size`` with bilinear filtering (antialiased
     when shrinking). We squash rather than center-crop: a wide desk photo keeps its monitor,
     keyboard and the desk edges, which a center crop of a panorama would cut away, and the gate
     was trained on the same squashed pixels;
  3. ``keras.applications.vgg16.preprocess_input``: RGB -> BGR and subtraction of the ImageNet means
     (103.939, 116.779, 123.68), no scaling — exactly what the ImageNet VGG16 weights expect.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from PIL import Image

from deskgen.errors import InvalidParameter, ModelFilesMissing
from deskgen.images import to_rgb

if TYPE_CHECKING:
    import keras

log = logging.getLogger(__name__)

Backbone = Literal["vgg16", "tiny"]
Weights = Literal["imagenet", "none"]

#: The file ``keras.applications.VGG16(weights="imagenet", include_top=False)`` caches.
VGG16_NOTOP_FILE = "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"

#: Default input sizes: VGG16's native 224, and 64 for the tiny backbone so it trains in seconds.
DEFAULT_INPUT_SIZE: dict[str, int] = {"vgg16": 224, "tiny": 64}

#: Filters per block of the tiny backbone and convolutions per block (VGG16 has 64/128/256/512/512
#: and 2/2/3/3/3).
TINY_FILTERS: tuple[int, ...] = (16, 32, 32, 64, 64)
TINY_CONVS: tuple[int, ...] = (1, 1, 1, 1, 1)

HEAD_UNITS = 256
HEAD_DROPOUT = 0.3


def import_keras() -> Any:
    """Import Keras on the TensorFlow backend (the thread settings and the saved graphs assume it)."""
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    import keras

    if keras.backend.backend() != "tensorflow":
        raise RuntimeError(
            f"the desk gate needs Keras on the TensorFlow backend but KERAS_BACKEND is "
            f"{keras.backend.backend()!r}: unset KERAS_BACKEND or set it to 'tensorflow'."
        )
    return keras


def configure_tf_threads(intra_op: int | None = None, inter_op: int | None = None) -> None:
    """Set TensorFlow's intra-/inter-op thread pools (``None`` leaves a pool as it is; 0 = TF decides).

    Serve replicas run on one or two CPUs: TF's default pools size themselves to the whole machine
    and oversubscribe it. TF fixes the pools when its runtime starts (the first op), so call this
    before loading a model. Asking for the values already in force is a no-op; asking to change them
    after the runtime started raises RuntimeError rather than silently keeping the old pools.
    """
    import tensorflow as tf

    for name, value, get, set_ in (
        ("intra_op", intra_op, tf.config.threading.get_intra_op_parallelism_threads,
         tf.config.threading.set_intra_op_parallelism_threads),
        ("inter_op", inter_op, tf.config.threading.get_inter_op_parallelism_threads,
         tf.config.threading.set_inter_op_parallelism_threads),
    ):
        if value is None:
            continue
        if value < 0:
            raise InvalidParameter(f"`{name}` threads must be >= 0 but is {value}.", field=name)
        if get() == value:
            continue
        try:
            set_(value)
        except RuntimeError as exc:
            raise RuntimeError(
                f"cannot set TensorFlow {name} threads to {value}: TensorFlow already started in this "
                f"process with {get()} (0 = automatic). Configure threads before the first model load."
            ) from exc
        log.info("TensorFlow %s threads set to %d", name, value)


def keras_cache_file(filename: str) -> Path:
    """Where Keras caches a downloaded file: ``$KERAS_HOME/models`` or ``~/.keras/models``."""
    home = os.environ.get("KERAS_HOME") or str(Path.home() / ".keras")
    return Path(home).expanduser() / "models" / filename


def _tiny_vgg(keras: Any, input_size: int) -> Any:
    """A VGG-shaped backbone: 5 blocks of 3x3 ReLU convs + 2x2 max-pool, named like VGG16's layers."""
    inputs = keras.Input(shape=(input_size, input_size, 3), name="input_layer")
    x = inputs
    for block, (filters, convs) in enumerate(zip(TINY_FILTERS, TINY_CONVS, strict=True), start=1):
        for conv in range(1, convs + 1):
            x = keras.layers.Conv2D(filters, 3, padding="same", activation="relu",
                                    name=f"block{block}_conv{conv}")(x)
        x = keras.layers.MaxPooling2D(2, strides=2, name=f"block{block}_pool")(x)
    return keras.Model(inputs, x, name="tiny_vgg")


def build_gate_model(
    backbone: Backbone = "vgg16",
    weights: Weights = "none",
    input_size: int | None = None,
    train_last_block: bool = False,
) -> keras.Model:
    """Build the gate: a VGG backbone (nested model) + GlobalAveragePooling -> Dense(256, relu) ->
    Dropout -> Dense(1, sigmoid). The output is P(desk setup). Not compiled.

    - ``backbone="vgg16"``: ``keras.applications.VGG16(include_top=False)``, frozen except block5 when
      ``train_last_block``. ``weights="imagenet"`` loads the Keras cache file
      (:func:`keras_cache_file` of :data:`VGG16_NOTOP_FILE`) and never downloads: a missing file
      raises :class:`ModelFilesMissing` naming the path. ``input_size`` defaults to 224.
    - ``backbone="tiny"``: :func:`_tiny_vgg` with random weights, fully trainable (freezing random
      features would be pointless); ``weights`` must be ``"none"``. ``input_size`` defaults to 64.
    """
    if backbone not in DEFAULT_INPUT_SIZE:
        raise InvalidParameter(
            f"`backbone` must be one of {sorted(DEFAULT_INPUT_SIZE)} but is {backbone!r}.", field="backbone"
        )
    if weights not in ("imagenet", "none"):
        raise InvalidParameter(f"`weights` must be 'imagenet' or 'none' but is {weights!r}.", field="weights")
    size = DEFAULT_INPUT_SIZE[backbone] if input_size is None else input_size
    if size < 32:  # five 2x2 pools need at least 32 px
        raise InvalidParameter(f"`input_size` must be at least 32 but is {size}.", field="input_size")
    keras = import_keras()

    if backbone == "vgg16":
        weights_arg: str | None = None
        if weights == "imagenet":
            cached = keras_cache_file(VGG16_NOTOP_FILE)
            if not cached.is_file():
                raise ModelFilesMissing(
                    "VGG16 ImageNet weights (no top)", str(cached),
                    hint=f"copy {VGG16_NOTOP_FILE} into that folder (this project never downloads), "
                    "or use weights='none'",
                )
            weights_arg = str(cached)  # a path: Keras loads it and cannot try a download
        base = keras.applications.VGG16(include_top=False, weights=weights_arg, input_shape=(size, size, 3))
        # Per-layer flags (not base.trainable = False): a frozen parent model hides the weights of
        # children re-enabled below.
        for layer in base.layers:
            layer.trainable = train_last_block and layer.name.startswith("block5")
    else:
        if weights != "none":
            raise InvalidParameter(
                f"`weights` must be 'none' for the tiny backbone but is {weights!r}.", field="weights"
            )
        base = _tiny_vgg(keras, size)

    inputs = keras.Input(shape=(size, size, 3), name="image")
    x = base(inputs)
    x = keras.layers.GlobalAveragePooling2D(name="gate_pool")(x)
    x = keras.layers.Dense(HEAD_UNITS, activation="relu", name="gate_dense")(x)
    x = keras.layers.Dropout(HEAD_DROPOUT, name="gate_dropout")(x)
    outputs = keras.layers.Dense(1, activation="sigmoid", name="desk_score")(x)
    return keras.Model(inputs, outputs, name=f"desk_gate_{backbone}")


def preprocess_images(images: Sequence[Image.Image], input_size: int) -> np.ndarray:
    """RGB-convert, squash-resize and VGG-normalise ``images`` into a float32 (n, s, s, 3) batch.

    See the module docstring for the exact steps; training and serving both call this.
    """
    preprocess_input = import_keras().applications.vgg16.preprocess_input
    batch = np.empty((len(images), input_size, input_size, 3), dtype=np.float32)
    for i, image in enumerate(images):
        rgb = to_rgb(image)
        if rgb.size != (input_size, input_size):
            rgb = rgb.resize((input_size, input_size), Image.Resampling.BILINEAR)
        batch[i] = np.asarray(rgb, dtype=np.float32)
    return np.asarray(preprocess_input(batch), dtype=np.float32)


def _check_threshold(threshold: float) -> float:
    try:
        value = float(threshold)
    except (TypeError, ValueError):
        value = math.nan
    if not 0.0 <= value <= 1.0:  # also rejects NaN
        raise InvalidParameter(f"`threshold` must be in [0, 1] but is {threshold!r}.", field="threshold")
    return value


class DeskClassifier:
    """Scores photos with a Keras gate model and decides "desk setup or not".

    Responsibilities: hold the model and the decision threshold; turn PIL images of any mode and
    size into the model's input (:func:`preprocess_images`); score a whole batch in one
    ``predict_on_batch`` call (for batches of 1-8, faster than ``model.predict``, which builds a
    dataset and iterator per call). It knows nothing about Ray, HTTP or batching policy.
    """

    def __init__(self, model: keras.Model, *, threshold: float = 0.5) -> None:
        shape = tuple(model.input_shape)
        if len(shape) != 4 or shape[1] is None or shape[1] != shape[2] or shape[3] != 3:
            raise ValueError(
                f"the gate model must take a (batch, s, s, 3) input but takes {shape}."
            )
        self.model = model
        self.input_size: int = int(shape[1])
        self._threshold = _check_threshold(threshold)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        *,
        threshold: float = 0.5,
        intra_op_threads: int | None = None,
        inter_op_threads: int | None = None,
    ) -> DeskClassifier:
        """Load a ``.keras`` gate file (inference only: not compiled).

        Raises :class:`ModelFilesMissing` naming ``path`` when it does not exist. The thread
        settings go to :func:`configure_tf_threads` before anything touches TensorFlow.
        """
        file = Path(path)
        if not file.is_file():
            raise ModelFilesMissing("desk gate model (.keras)", str(file))
        _check_threshold(threshold)  # fail before the (slow) load
        keras = import_keras()
        configure_tf_threads(intra_op_threads, inter_op_threads)
        model = keras.models.load_model(file, compile=False)
        log.info("loaded desk gate %s (input %s)", file, model.input_shape)
        return cls(model, threshold=threshold)

    @property
    def threshold(self) -> float:
        """Scores at or above it are desk setups. Settable (e.g. from Serve's ``reconfigure``)."""
        return self._threshold

    @threshold.setter
    def threshold(self, value: float) -> None:
        self._threshold = _check_threshold(value)

    def preprocess(self, images: Sequence[Image.Image]) -> np.ndarray:
        """float32 (n, input_size, input_size, 3), VGG16-normalised (BGR, ImageNet means subtracted)."""
        return preprocess_images(images, self.input_size)

    def score_batch(self, images: Sequence[Image.Image]) -> list[float]:
        """P(desk setup) per image, in order, from one model call. An empty list gives ``[]``."""
        if len(images) == 0:
            return []
        scores = np.asarray(self.model.predict_on_batch(self.preprocess(images)))
        return [float(s) for s in scores.reshape(len(images))]

    def score(self, image: Image.Image) -> float:
        """P(desk setup) for one image."""
        return self.score_batch([image])[0]

    def is_desk(self, score: float) -> bool:
        """The decision: ``score >= threshold``."""
        return score >= self._threshold
