"""Decoding uploads into RGB PIL images: EXIF orientation, odd modes, size limits.

Every stage receives images that went through :func:`to_rgb`, so the classifier, the captioner and
the tests all see the same pixels.
"""

from __future__ import annotations

import io
import warnings

from PIL import Image, ImageOps, UnidentifiedImageError

from deskgen.errors import NotAnImage, PayloadTooLarge
from deskgen.limits import DEFAULT_UPLOAD_LIMITS

DEFAULT_MAX_BYTES = DEFAULT_UPLOAD_LIMITS.max_upload_bytes
DEFAULT_MAX_PIXELS = DEFAULT_UPLOAD_LIMITS.max_pixels


def to_rgb(image: Image.Image) -> Image.Image:
    """Apply EXIF orientation and convert any mode (RGBA, LA, P, CMYK, L, I;16, I, F, 1) to RGB.

    Transparent pixels are composited on white: a desk photo with an alpha channel should look
    the way a viewer shows it, not have its hidden colour channels leak through.
    """
    image = ImageOps.exif_transpose(image) or image
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # Wide greyscale. PIL's convert("L") clips at 255, so map values ourselves:
        # - 16-bit: the format's full range 0..65535 -> 0..255, as a viewer shows it. (Stretching
        #   min..max instead turned a uniformly white 16-bit PNG black and brightened dim photos.)
        # - 32-bit int / float have no fixed range: values already in 0..255 are kept, anything
        #   else is stretched from its min..max (a constant image is clipped to 0..255).
        import numpy as np

        arr = np.asarray(image, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        if mode.startswith("I;16"):
            scaled = arr * (255.0 / 65535.0)
        elif (lo >= 0.0 and hi <= 255.0) or hi <= lo:
            scaled = np.clip(arr, 0.0, 255.0)
        else:
            scaled = (arr - lo) * (255.0 / (hi - lo))
        return Image.fromarray(scaled.round().astype("uint8"), mode="L").convert("RGB")
    return image.convert("RGB")


def decode_image(
    data: bytes,
    *,
    field: str = "image",
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Image.Image:
    """Decode an upload into an RGB image or raise a precise 413/415 error naming ``field``."""
    if len(data) == 0:
        raise NotAnImage(f"`{field}` is empty: send a JPEG, PNG or WebP photo.", field=field)
    if len(data) > max_bytes:
        raise PayloadTooLarge(
            f"`{field}` must be at most {max_bytes} bytes but is {len(data)} bytes.", field=field
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise PayloadTooLarge(
                    f"`{field}` must have at most {max_pixels} pixels but is {width}x{height}.",
                    field=field,
                )
            image.load()
    except PayloadTooLarge:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise PayloadTooLarge(f"`{field}` is too large to decode: {exc}", field=field) from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise NotAnImage(
            f"`{field}` is not a decodable image (JPEG, PNG, WebP, ...): {exc}", field=field
        ) from exc
    return to_rgb(image)
