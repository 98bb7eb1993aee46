"""PNG encoding with the generation metadata in a text chunk, so any output can be reproduced."""

from __future__ import annotations

import io
import json
from typing import Any

from PIL import Image, PngImagePlugin

METADATA_KEY = "deskgen"


def encode_png(image: Image.Image, metadata: dict[str, Any] | None = None) -> bytes:
    """PNG bytes of ``image``; ``metadata`` goes, as JSON, into an iTXt chunk named ``deskgen``."""
    info = PngImagePlugin.PngInfo()
    if metadata is not None:
        info.add_itxt(METADATA_KEY, json.dumps(metadata, sort_keys=True))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def read_png_metadata(data: bytes) -> dict[str, Any]:
    """The ``deskgen`` metadata of a PNG written by :func:`encode_png`; KeyError if it has none."""
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        text = image.text  # type: ignore[attr-defined]
    return json.loads(text[METADATA_KEY])  # type: ignore[no-any-return]
