"""The desk gate's training data: the images of ``DATA_DIR/{true,false}`` (decoded without the HTTP
upload limits), the stratified held-out split, and the shuffled, augmented ``tf.data`` pipeline.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from deskgen.errors import InvalidParameter, NotAnImage
from deskgen.images import to_rgb

#: Augmentation strengths: shifts and zoom as a fraction of the side, brightness in pixel values (0-255).
AUGMENT_SHIFT = 0.06
AUGMENT_ZOOM = 0.1
AUGMENT_BRIGHTNESS = 20.0


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
