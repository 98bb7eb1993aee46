"""deskgen.images: decoding uploads, size limits, mode conversion to RGB and EXIF orientation."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from deployments.http_errors import status_of
from deskgen.errors import NotAnImage, PayloadTooLarge
from deskgen.images import decode_image, to_rgb

pytestmark = pytest.mark.unit

ORIENTATION = 0x0112


def encode(image: Image.Image, fmt: str = "PNG", **kwargs: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def pixels(image: Image.Image) -> np.ndarray:
    assert image.mode == "RGB"
    return np.asarray(image)


def exif_bytes(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    return exif.tobytes()


# --- errors ------------------------------------------------------------------------------------------


def test_empty_bytes_is_not_an_image_naming_the_field() -> None:
    with pytest.raises(NotAnImage) as info:
        decode_image(b"", field="photo")
    assert info.value.field == "photo"
    assert "`photo` is empty" in info.value.message
    assert status_of(info.value) == 415
    assert info.value.to_dict()["field"] == "photo"


@pytest.mark.parametrize(
    "data",
    [b"not an image at all", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, bytes(range(256)) * 4],
    ids=["text", "png-signature-then-zeros", "byte-ramp"],
)
def test_garbage_bytes_are_not_an_image(data: bytes) -> None:
    with pytest.raises(NotAnImage) as info:
        decode_image(data)
    assert info.value.field == "image"
    assert "`image` is not a decodable image" in info.value.message


def test_truncated_png_is_not_an_image() -> None:
    rng = np.random.default_rng(0)
    data = encode(Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)))
    with pytest.raises(NotAnImage, match="`image` is not a decodable image"):
        decode_image(data[: len(data) // 2])


def test_too_many_bytes_states_the_limit_and_the_size() -> None:
    data = encode(Image.new("RGB", (8, 8), (1, 2, 3)))
    with pytest.raises(PayloadTooLarge) as info:
        decode_image(data, field="photo", max_bytes=10)
    assert info.value.message == f"`photo` must be at most 10 bytes but is {len(data)} bytes."
    assert info.value.field == "photo"
    assert status_of(info.value) == 413


def test_too_many_pixels_states_the_limit_and_the_dimensions() -> None:
    data = encode(Image.new("L", (100, 60)))
    with pytest.raises(PayloadTooLarge) as info:
        decode_image(data, max_pixels=5999)
    assert info.value.message == "`image` must have at most 5999 pixels but is 100x60."
    # exactly at the limit is fine
    assert decode_image(data, max_pixels=6000).size == (100, 60)


def test_limits_at_the_boundary_are_accepted() -> None:
    data = encode(Image.new("RGB", (3, 2), (9, 8, 7)))
    image = decode_image(data, max_bytes=len(data), max_pixels=6)
    assert image.size == (3, 2)
    assert pixels(image)[0, 0].tolist() == [9, 8, 7]


# --- modes -------------------------------------------------------------------------------------------


def test_rgba_composites_on_white() -> None:
    image = Image.new("RGBA", (3, 1))
    image.putdata([(255, 0, 0, 0), (0, 0, 255, 255), (255, 0, 0, 128)])
    rgb = pixels(decode_image(encode(image)))
    assert rgb[0, 0].tolist() == [255, 255, 255]  # fully transparent red -> white, not red
    assert rgb[0, 1].tolist() == [0, 0, 255]
    assert rgb[0, 2].tolist() == pytest.approx([255, 127, 127], abs=1)


def test_la_composites_on_white() -> None:
    image = Image.new("LA", (2, 1))
    image.putdata([(0, 0), (50, 255)])
    rgb = pixels(decode_image(encode(image)))
    assert rgb[0].tolist() == [[255, 255, 255], [50, 50, 50]]


def test_palette_with_transparency_composites_on_white() -> None:
    image = Image.new("P", (2, 1))
    image.putpalette([10, 200, 30, 0, 0, 0] + [0] * (256 * 3 - 6))
    image.putdata([0, 1])
    data = encode(image, transparency=1)
    assert Image.open(io.BytesIO(data)).mode == "P"
    rgb = pixels(decode_image(data))
    assert rgb[0].tolist() == [[10, 200, 30], [255, 255, 255]]  # index 1 is black but transparent


def test_palette_without_transparency_uses_the_palette() -> None:
    image = Image.new("P", (1, 1))
    image.putpalette([40, 50, 60] + [0] * (256 * 3 - 3))
    assert pixels(decode_image(encode(image, "GIF")))[0, 0].tolist() == [40, 50, 60]


def test_cmyk_converts_to_rgb() -> None:
    image = Image.new("CMYK", (3, 1))
    image.putdata([(0, 0, 0, 0), (255, 0, 0, 0), (0, 0, 0, 255)])
    rgb = pixels(decode_image(encode(image, "TIFF")))
    assert rgb[0].tolist() == [[255, 255, 255], [0, 255, 255], [0, 0, 0]]
    jpeg = pixels(decode_image(encode(image, "JPEG", quality=95)))
    assert np.abs(jpeg.astype(int) - rgb.astype(int)).max() <= 8


def test_greyscale_and_one_bit() -> None:
    grey = pixels(decode_image(encode(Image.new("L", (1, 1), 77))))
    assert grey[0, 0].tolist() == [77, 77, 77]
    bits = Image.new("1", (2, 1))
    bits.putpixel((1, 0), 1)
    rgb = pixels(decode_image(encode(bits)))
    assert rgb[0].tolist() == [[0, 0, 0], [255, 255, 255]]


def test_sixteen_bit_maps_the_full_range() -> None:
    image = Image.new("I;16", (3, 1))
    for x, value in enumerate((0, 257 * 100, 65535)):
        image.putpixel((x, 0), value)
    data = encode(image)
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    rgb = pixels(decode_image(data))
    assert rgb[0, :, 0].tolist() == [0, 100, 255]
    assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()


def test_sixteen_bit_is_not_contrast_stretched() -> None:
    # Regression: a uniform white 16-bit PNG used to decode black, and a dim one got stretched.
    white = pixels(decode_image(encode(Image.new("I;16", (4, 4), 65535))))
    assert (white == 255).all()
    dim = Image.new("I;16", (2, 1))
    dim.putpixel((0, 0), 257 * 10)
    dim.putpixel((1, 0), 257 * 20)
    assert pixels(decode_image(encode(dim)))[0, :, 0].tolist() == [10, 20]


@pytest.mark.parametrize("mode", ["I;16B", "I;16L"])
def test_sixteen_bit_byte_orders(mode: str) -> None:
    image = Image.new(mode, (2, 1))
    image.putpixel((0, 0), 65535)
    image.putpixel((1, 0), 257 * 7)
    assert pixels(to_rgb(image))[0, :, 0].tolist() == [255, 7]


def test_int32_and_float_modes() -> None:
    small = Image.new("I", (2, 1))
    small.putpixel((0, 0), 12)
    small.putpixel((1, 0), 200)
    assert pixels(to_rgb(small))[0, :, 0].tolist() == [12, 200]  # already 8-bit range: kept
    wide = Image.new("I", (3, 1))
    for x, value in enumerate((-1000, 0, 99000)):
        wide.putpixel((x, 0), value)
    assert pixels(to_rgb(wide))[0, :, 0].tolist() == [0, 3, 255]  # stretched min..max
    floats = Image.new("F", (2, 1))
    floats.putpixel((0, 0), 0.4)
    floats.putpixel((1, 0), 254.6)
    assert pixels(to_rgb(floats))[0, :, 0].tolist() == [0, 255]


@pytest.mark.parametrize("size", [(1, 1), (4000, 300), (300, 4000)])
def test_extreme_sizes_decode(size: tuple[int, int]) -> None:
    image = decode_image(encode(Image.new("RGB", size, (5, 6, 7))))
    assert image.size == size
    assert pixels(image)[0, 0].tolist() == [5, 6, 7]


def test_rgb_is_returned_unchanged() -> None:
    image = Image.new("RGB", (2, 2), (1, 2, 3))
    assert to_rgb(image).tobytes() == image.tobytes()


# --- EXIF orientation --------------------------------------------------------------------------------


def _asymmetric(width: int = 3, height: int = 2) -> np.ndarray:
    values = np.arange(width * height * 3, dtype=np.uint8).reshape(height, width, 3) * 10
    return values


def test_exif_orientation_6_rotates_clockwise_png() -> None:
    stored = _asymmetric()  # 2 rows x 3 columns, every pixel distinct
    data = encode(Image.fromarray(stored), "PNG", exif=exif_bytes(6))
    decoded = decode_image(data)
    assert decoded.size == (2, 3)  # width and height swapped
    # Orientation 6: the viewer rotates the stored pixels 90 degrees clockwise.
    assert np.array_equal(pixels(decoded), np.rot90(stored, k=-1))


def test_exif_orientation_6_rotates_jpeg() -> None:
    rng = np.random.default_rng(3)
    upright = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((64, 32))
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # what a camera held sideways writes
    decoded = decode_image(encode(stored, "JPEG", quality=95, exif=exif_bytes(6)))
    assert decoded.size == upright.size == (64, 32)
    diff = np.abs(pixels(decoded).astype(int) - pixels(upright).astype(int)).mean()
    assert diff < 6, diff
    unrotated = decode_image(encode(stored, "JPEG", quality=95))
    assert unrotated.size == (32, 64)


@pytest.mark.parametrize("orientation", [1, 3, 8])
def test_other_orientations(orientation: int) -> None:
    stored = _asymmetric()
    decoded = pixels(decode_image(encode(Image.fromarray(stored), "PNG", exif=exif_bytes(orientation))))
    expected = {1: stored, 3: np.rot90(stored, k=2), 8: np.rot90(stored, k=1)}[orientation]
    assert np.array_equal(decoded, expected)


def test_exif_orientation_with_transparency() -> None:
    image = Image.new("RGBA", (2, 1))
    image.putdata([(0, 0, 0, 0), (0, 255, 0, 255)])
    decoded = pixels(decode_image(encode(image, "PNG", exif=exif_bytes(6))))
    # 90 degrees clockwise: the left pixel goes to the top.
    assert decoded[:, 0].tolist() == [[255, 255, 255], [0, 255, 0]]
