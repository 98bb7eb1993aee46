"""deskgen.pngmeta: PNG bytes carry the generation recipe and the exact pixels."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from deskgen.pngmeta import METADATA_KEY, encode_png, read_png_metadata

pytestmark = pytest.mark.unit


@pytest.fixture
def image() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, size=(16, 24, 3), dtype=np.uint8))


METADATA = {
    "seed": 4294967295,
    "mix_id": "3d:0.5+ott:0.7",
    "mix": {"3d": 0.5, "ott": 0.7},
    "adapters": {"3d": "ab" * 32},
    "prompt": "a desk setup with a lamp — ünïcødé ✓",
    "guidance": 5.0,
    "timings": {"activate_s": 0.0125, "generate_s": 1.5},
}


def test_metadata_round_trip(image: Image.Image) -> None:
    assert read_png_metadata(encode_png(image, METADATA)) == METADATA


def test_pixels_round_trip(image: Image.Image) -> None:
    with Image.open(io.BytesIO(encode_png(image, METADATA))) as decoded:
        assert decoded.format == "PNG"
        assert decoded.size == (24, 16)
        assert np.array_equal(np.asarray(decoded), np.asarray(image))


def test_encoding_is_deterministic(image: Image.Image) -> None:
    # Key order of the dict must not matter: the JSON is written with sorted keys.
    reordered = dict(reversed(list(METADATA.items())))
    assert encode_png(image, METADATA) == encode_png(image.copy(), reordered)
    assert encode_png(image, METADATA) != encode_png(image, {**METADATA, "seed": 1})


def test_png_without_metadata_raises_key_error(image: Image.Image) -> None:
    data = encode_png(image)
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    with pytest.raises(KeyError, match=METADATA_KEY):
        read_png_metadata(data)
