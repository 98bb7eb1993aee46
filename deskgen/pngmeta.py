"""PNG encoding with the generation metadata in a text chunk, so any output can be reproduced."""

from __future__ import annotations

import io
import json
import struct
import zlib
from typing import Any

from PIL import Image, PngImagePlugin

METADATA_KEY = "deskgen"
#: The located products (deskgen_client.protocol.ProductLocation, as JSON), added to a generated PNG by the ingress.
PRODUCTS_KEY = "deskgen-products"
_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"


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
    return read_png_text(data, METADATA_KEY)


def with_text(png: bytes, key: str, value: dict[str, Any]) -> bytes:
    """``png`` with one more iTXt chunk ``key`` (``value`` as JSON) before its end, without decoding or
    re-encoding the image (milliseconds for any size). The pixels and the other chunks are unchanged."""
    if not png.endswith(_IEND):
        raise ValueError("not a PNG that ends with its IEND chunk")
    data = key.encode("latin-1") + b"\x00\x00\x00\x00\x00" + json.dumps(value, sort_keys=True).encode()
    chunk = struct.pack(">I", len(data)) + b"iTXt" + data + struct.pack(">I", zlib.crc32(b"iTXt" + data))
    return png[: -len(_IEND)] + chunk + _IEND


def read_png_text(data: bytes, key: str) -> dict[str, Any]:
    """The JSON text chunk ``key`` of a PNG (e.g. :data:`PRODUCTS_KEY`); KeyError if it has none."""
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        text = image.text  # type: ignore[attr-defined]
    return json.loads(text[key])  # type: ignore[no-any-return]
