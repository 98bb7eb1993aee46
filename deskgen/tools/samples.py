"""A generated two-class image set for the desk gate: desk-like scenes vs. clearly not desks.

    python -m deskgen.tools.samples OUT_DIR [--n-per-class N] [--seed S] [--size PX]

writes ``OUT_DIR/true/desk_0000.png ...`` and ``OUT_DIR/false/other_0000.png ...``. The tiny classifier
is trained on them, and tests draw held-out scenes from other seeds through :func:`desk_scene` and
:func:`non_desk_scene`.

Contracts:
- Deterministic: the same ``seed`` (or the same state of the ``rng`` passed in) gives the same pixels
  and, through PNG, the same bytes. Only numpy's ``Generator`` and PIL's ``ImageDraw`` are used.
- A desk scene always has a desk surface as a horizontal band in the lower part of the frame, a dark
  monitor with a lighter screen standing on it and a keyboard in front of it, plus a mouse and
  sometimes a mug, a lamp or a plant. Colours, positions, sizes and lighting vary.
- A non-desk scene is one of: a landscape (sky gradient, horizon, sun, sometimes hills), a noise
  texture, a face-like drawing, stripes, a flat or gradient colour field, scattered circles. None of
  them contains a monitor+keyboard arrangement. Landscapes share the "band in the lower part" on
  purpose, so that a classifier cannot get by on that cue alone.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from deskgen.errors import InvalidParameter

log = logging.getLogger(__name__)

RGB = tuple[int, int, int]

#: Sub-folders of a sample set; ``true`` holds the positives (desk setups).
CLASS_DIRS: tuple[str, str] = ("true", "false")


def _colour(rng: np.random.Generator, lo: int = 0, hi: int = 255) -> RGB:
    r, g, b = rng.integers(lo, hi + 1, size=3)
    return int(r), int(g), int(b)


def _jitter(rng: np.random.Generator, base: RGB, amount: int) -> RGB:
    r, g, b = (int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in base)
    return r, g, b


def _vertical_gradient(size: int, top: RGB, bottom: RGB) -> Image.Image:
    t = np.linspace(0.0, 1.0, size, dtype=np.float64)[:, None, None]
    column = (1.0 - t) * np.asarray(top, dtype=np.float64) + t * np.asarray(bottom, dtype=np.float64)
    arr = np.broadcast_to(column, (size, size, 3))
    return Image.fromarray(arr.round().astype(np.uint8), mode="RGB")


def _finish(rng: np.random.Generator, image: Image.Image, noise: float = 4.0) -> Image.Image:
    """Lighting jitter (global gain and a left-right falloff) plus a little sensor noise."""
    arr = np.asarray(image, dtype=np.float64)
    size = arr.shape[1]
    gain = rng.uniform(0.8, 1.15)
    slope = rng.uniform(-0.15, 0.15)
    falloff = 1.0 + slope * np.linspace(-1.0, 1.0, size)[None, :, None]
    arr = arr * gain * falloff + rng.normal(0.0, noise, size=arr.shape)
    return Image.fromarray(np.clip(arr, 0, 255).round().astype(np.uint8), mode="RGB")


# --- desks -------------------------------------------------------------------------------------------


def desk_scene(rng: np.random.Generator, size: int = 96) -> Image.Image:
    """One desk-like scene of ``size`` x ``size`` pixels (RGB), drawn from ``rng``."""
    _check_size(size)
    s = size
    wall = _colour(rng, 150, 240)
    image = _vertical_gradient(s, _jitter(rng, wall, 15), _jitter(rng, wall, 25))
    draw = ImageDraw.Draw(image)

    # 1. The desk surface: a horizontal band from ~60-72 % of the height to the bottom, wooden or white.
    desk_top = int(s * rng.uniform(0.60, 0.72))
    if rng.random() < 0.6:
        wood = (int(rng.integers(120, 190)), int(rng.integers(75, 120)), int(rng.integers(30, 70)))
        draw.rectangle((0, desk_top, s, s), fill=wood)
        for _ in range(int(rng.integers(3, 8))):  # wood grain
            y = int(rng.integers(desk_top + 2, s))
            draw.line((0, y, s, y + int(rng.integers(-2, 3))), fill=_jitter(rng, wood, 25), width=1)
    else:
        white = _jitter(rng, (225, 225, 220), 20)
        draw.rectangle((0, desk_top, s, s), fill=white)
    draw.line((0, desk_top, s, desk_top), fill=(60, 50, 40), width=max(1, s // 64))  # front edge shadow

    # 2. The monitor: a dark bezel with a lighter screen, on a stand that meets the desk.
    mon_w = int(s * rng.uniform(0.38, 0.58))
    mon_h = int(mon_w * rng.uniform(0.55, 0.68))
    mon_cx = int(s * rng.uniform(0.35, 0.65))
    mon_bottom = desk_top - int(s * rng.uniform(0.06, 0.12))
    mon_top = max(2, mon_bottom - mon_h)
    x0, x1 = mon_cx - mon_w // 2, mon_cx + mon_w // 2
    bezel = _colour(rng, 10, 45)
    draw.rectangle((x0, mon_top, x1, mon_bottom), fill=bezel)
    pad = max(1, s // 40)
    screen = (int(rng.integers(90, 200)), int(rng.integers(130, 220)), int(rng.integers(170, 255)))
    draw.rectangle((x0 + pad, mon_top + pad, x1 - pad, mon_bottom - pad), fill=screen)
    for _ in range(int(rng.integers(0, 4))):  # windows / text lines on the screen
        wx = int(rng.integers(x0 + pad, max(x0 + pad + 1, x1 - 3 * pad)))
        wy = int(rng.integers(mon_top + pad, max(mon_top + pad + 1, mon_bottom - 3 * pad)))
        draw.rectangle((wx, wy, min(x1 - pad, wx + s // 8), min(mon_bottom - pad, wy + s // 16)),
                       fill=_jitter(rng, (235, 235, 240), 15))
    stand_w = max(2, s // 24)
    draw.rectangle((mon_cx - stand_w // 2, mon_bottom, mon_cx + stand_w // 2, desk_top + 2), fill=bezel)
    draw.rectangle((mon_cx - 3 * stand_w, desk_top, mon_cx + 3 * stand_w, desk_top + max(2, s // 40)), fill=bezel)

    # 3. The keyboard in front of the monitor, with a grid of keys.
    kb_w = int(s * rng.uniform(0.34, 0.5))
    kb_h = max(4, int(s * rng.uniform(0.07, 0.11)))
    kb_cx = mon_cx + int(s * rng.uniform(-0.06, 0.06))
    kb_top = desk_top + int((s - desk_top) * rng.uniform(0.25, 0.5))
    kb = _colour(rng, 20, 70) if rng.random() < 0.6 else _jitter(rng, (200, 200, 205), 20)
    kx0, kx1 = kb_cx - kb_w // 2, kb_cx + kb_w // 2
    draw.rectangle((kx0, kb_top, kx1, kb_top + kb_h), fill=kb)
    key = _jitter(rng, (128, 128, 128), 60)
    step = max(2, s // 32)
    for ky in range(kb_top + 1, kb_top + kb_h - 1, step):
        for kx in range(kx0 + 1, kx1 - 1, step):
            draw.point((kx, ky), fill=key)

    # 4. The mouse to the right of the keyboard.
    mx = kx1 + int(s * rng.uniform(0.04, 0.1))
    mw, mh = max(3, s // 20), max(4, s // 14)
    draw.ellipse((mx, kb_top, mx + mw, kb_top + mh), fill=_colour(rng, 20, 230))

    # 5. Optional props: mug, lamp, plant.
    if rng.random() < 0.5:  # mug on the left
        ux = int(s * rng.uniform(0.03, 0.15))
        uw, uh = max(4, s // 14), max(5, s // 11)
        uy = desk_top + int((s - desk_top) * rng.uniform(0.1, 0.35))
        mug = _colour(rng, 40, 240)
        draw.rectangle((ux, uy, ux + uw, uy + uh), fill=mug)
        draw.arc((ux + uw - 2, uy + uh // 4, ux + uw + uw // 2, uy + 3 * uh // 4), -90, 90, fill=mug, width=2)
    if rng.random() < 0.4:  # lamp on the right
        lx = int(s * rng.uniform(0.82, 0.93))
        lamp = _colour(rng, 20, 200)
        top = int(desk_top - s * rng.uniform(0.3, 0.45))
        draw.line((lx, desk_top, lx, top), fill=lamp, width=max(1, s // 48))
        draw.polygon([(lx - s // 12, top + s // 12), (lx + s // 24, top), (lx + s // 20, top + s // 10)], fill=lamp)
    if rng.random() < 0.4:  # plant in a pot
        px = int(s * rng.uniform(0.02, 0.12)) if rng.random() < 0.5 else int(s * rng.uniform(0.82, 0.92))
        pw = max(4, s // 14)
        draw.rectangle((px, desk_top - pw, px + pw, desk_top + 1), fill=_jitter(rng, (170, 90, 50), 30))
        for _ in range(4):
            cx = px + pw // 2 + int(rng.integers(-pw, pw + 1))
            cy = desk_top - pw - int(rng.integers(1, pw + 2))
            r = max(2, s // 28)
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=_jitter(rng, (50, 140, 60), 30))

    return _finish(rng, image)


# --- non-desks ---------------------------------------------------------------------------------------


def _landscape(rng: np.random.Generator, s: int) -> Image.Image:
    sky_top = _jitter(rng, (60, 120, 210), 40)
    sky_low = _jitter(rng, (190, 215, 240), 25)
    image = _vertical_gradient(s, sky_top, sky_low)
    draw = ImageDraw.Draw(image)
    horizon = int(s * rng.uniform(0.5, 0.75))
    if rng.random() < 0.6:  # hills / mountains
        points = [(0, horizon)]
        for x in range(0, s + s // 6, s // 6):
            points.append((x, horizon - int(rng.integers(0, s // 4))))
        points.append((s, horizon))
        draw.polygon(points, fill=_jitter(rng, (90, 110, 130), 30))
    ground = (_jitter(rng, (70, 140, 60), 30) if rng.random() < 0.6 else _jitter(rng, (210, 190, 140), 25))
    draw.rectangle((0, horizon, s, s), fill=ground)
    r = int(s * rng.uniform(0.05, 0.1))
    sx, sy = int(rng.integers(r, s - r)), int(rng.integers(r, max(r + 1, horizon - r)))
    draw.ellipse((sx - r, sy - r, sx + r, sy + r), fill=_jitter(rng, (255, 230, 120), 20))
    return image


def _noise(rng: np.random.Generator, s: int) -> Image.Image:
    cell = int(rng.choice([1, 2, 4, 8]))
    small = rng.integers(0, 256, size=(max(1, s // cell), max(1, s // cell), 3), dtype=np.uint8)
    if rng.random() < 0.4:  # greyscale noise
        small = np.repeat(small[:, :, :1], 3, axis=2)
    return Image.fromarray(small, mode="RGB").resize((s, s), Image.Resampling.NEAREST)


def _face(rng: np.random.Generator, s: int) -> Image.Image:
    image = Image.new("RGB", (s, s), _colour(rng, 0, 255))
    draw = ImageDraw.Draw(image)
    r = int(s * rng.uniform(0.28, 0.42))
    cx = s // 2 + int(rng.integers(-s // 10, s // 10 + 1))
    cy = s // 2 + int(rng.integers(-s // 10, s // 10 + 1))
    skin = _jitter(rng, (210, 160, 120), 45)
    if rng.random() < 0.5:  # hair, behind the face
        h = max(2, r // 6)
        draw.chord((cx - r - h, cy - r - h, cx + r + h, cy + r + h), 180, 360, fill=_colour(rng, 10, 120))
    draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=skin)
    er = max(1, r // 7)
    for ex in (cx - r // 3, cx + r // 3):
        draw.ellipse((ex - er, cy - r // 4 - er, ex + er, cy - r // 4 + er), fill=(30, 30, 30))
    draw.arc((cx - r // 2, cy, cx + r // 2, cy + r // 2), 20, 160, fill=(120, 40, 40), width=max(1, s // 48))
    return image


def _stripes(rng: np.random.Generator, s: int) -> Image.Image:
    period = float(rng.uniform(4, s / 3))
    angle = float(rng.uniform(0, np.pi))
    yy, xx = np.mgrid[0:s, 0:s]
    phase = (xx * np.cos(angle) + yy * np.sin(angle)) / period
    mask = (np.floor(phase) % 2).astype(bool)
    a, b = np.asarray(_colour(rng), dtype=np.uint8), np.asarray(_colour(rng), dtype=np.uint8)
    arr = np.where(mask[:, :, None], a, b).astype(np.uint8)
    return Image.fromarray(arr, mode="RGB")


def _colour_field(rng: np.random.Generator, s: int) -> Image.Image:
    if rng.random() < 0.5:
        return Image.new("RGB", (s, s), _colour(rng))
    image = _vertical_gradient(s, _colour(rng), _colour(rng))
    return image.rotate(float(rng.choice([0, 90, 180, 270])))


def _circles(rng: np.random.Generator, s: int) -> Image.Image:
    image = Image.new("RGB", (s, s), _colour(rng))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(3, 12))):
        r = int(rng.integers(max(2, s // 20), max(3, s // 4)))
        cx, cy = int(rng.integers(0, s)), int(rng.integers(0, s))
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=_colour(rng))
    return image


#: The kinds of non-desk scenes, drawn with equal probability.
NON_DESK_KINDS: dict[str, Callable[[np.random.Generator, int], Image.Image]] = {
    "landscape": _landscape,
    "noise": _noise,
    "face": _face,
    "stripes": _stripes,
    "colour_field": _colour_field,
    "circles": _circles,
}


def non_desk_scene(rng: np.random.Generator, size: int = 96, kind: str | None = None) -> Image.Image:
    """One clearly-not-a-desk scene (RGB); ``kind`` picks one of :data:`NON_DESK_KINDS`, else random."""
    _check_size(size)
    if kind is None:
        kind = str(rng.choice(sorted(NON_DESK_KINDS)))
    elif kind not in NON_DESK_KINDS:
        raise InvalidParameter(
            f"`kind` must be one of {sorted(NON_DESK_KINDS)} but is {kind!r}.", field="kind"
        )
    return _finish(rng, NON_DESK_KINDS[kind](rng, size), noise=3.0)


# --- the set on disk ---------------------------------------------------------------------------------


def _check_size(size: int) -> None:
    if size < 32:
        raise InvalidParameter(f"`size` must be at least 32 pixels but is {size}.", field="size")


def generate_samples(out_dir: Path, n_per_class: int, seed: int, size: int = 96) -> None:
    """Write ``n_per_class`` desk scenes to ``out_dir/true`` and as many non-desks to ``out_dir/false``.

    Existing files of the same names are overwritten; other files in those folders are left alone.
    Each class draws from its own generator (seeded from ``seed``), so adding images to one class
    does not change the other.
    """
    if n_per_class < 1:
        raise InvalidParameter(f"`n_per_class` must be at least 1 but is {n_per_class}.", field="n_per_class")
    _check_size(size)
    desk_rng, other_rng = (np.random.default_rng([seed, k]) for k in (1, 2))
    for class_dir, prefix, rng, scene in (
        ("true", "desk", desk_rng, desk_scene),
        ("false", "other", other_rng, non_desk_scene),
    ):
        folder = Path(out_dir) / class_dir
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            scene(rng, size).save(folder / f"{prefix}_{i:04d}.png", format="PNG")
    log.info("wrote %d + %d sample images of %d px to %s", n_per_class, n_per_class, size, out_dir)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--n-per-class", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=96)
    args = parser.parse_args(argv)
    generate_samples(args.out_dir, args.n_per_class, args.seed, args.size)
    print(f"wrote {args.n_per_class} + {args.n_per_class} images to {args.out_dir}")


if __name__ == "__main__":
    main()
