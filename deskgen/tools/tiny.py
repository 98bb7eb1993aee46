"""Build tiny, randomly initialised models of the production architectures, offline.

    python -m deskgen.tools.tiny --out models/tiny [--force]

Writes, with fixed seeds:
  sdxl/                   a diffusers SDXL pipeline folder (tiny UNet/VAE/text encoders, tokenizers built in code)
  loras/{dalle,ott,3d}.safetensors   tiny LoRAs with non-zero weights (dalle and 3d in kohya_ss layout, ott in diffusers layout)
  blip/                   a transformers BLIP captioning folder (model + processor + tokenizer)
  samples/{true,false}/   a generated two-class image set: desk-like scenes vs. clearly not
  classifier/desk_gate.keras          a VGG-shaped gate trained briefly on those samples

They load through exactly the code that loads real weights (``from_pretrained``, ``load_model``,
``load_lora_weights``): pointing the config at real folders or hub ids is the only change.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import time
from pathlib import Path

from deskgen.paths import models_dir, resolve

log = logging.getLogger(__name__)

COMPLETE_MARKER = ".complete"


def is_built(out: Path) -> bool:
    return (out / COMPLETE_MARKER).exists()


def build_all(out: Path, *, force: bool = False) -> dict[str, float]:
    """Build every tiny model into ``out``; returns seconds per part. A no-op when already built."""
    from deskgen.tools import tiny_blip, tiny_classifier, tiny_sdxl

    if is_built(out) and not force:
        log.info("tiny models already built in %s (use --force to rebuild)", out)
        return {}
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    timings: dict[str, float] = {}
    for name, build in (("sdxl+loras", tiny_sdxl.build), ("blip", tiny_blip.build), ("classifier", tiny_classifier.build)):
        start = time.perf_counter()
        build(out)
        timings[name] = time.perf_counter() - start
        log.info("built tiny %s in %.1f s", name, timings[name])
    (out / COMPLETE_MARKER).write_text("ok\n")
    return timings


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="output folder (default: $DESKGEN_MODELS or models/tiny)")
    parser.add_argument("--force", action="store_true", help="rebuild even if already built")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    out = resolve(args.out) if args.out else models_dir()
    start = time.perf_counter()
    timings = build_all(out, force=args.force)
    if timings:
        parts = ", ".join(f"{k} {v:.1f} s" for k, v in timings.items())
        log.info("tiny models in %s: %s; total %.1f s", out, parts, time.perf_counter() - start)


if __name__ == "__main__":
    main()
