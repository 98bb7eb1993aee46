"""Build tiny, randomly initialised models of the production architectures, offline.

    python -m deskgen.tools.tiny --out models/tiny [--force]

Writes, with fixed seeds:
  sdxl/                   a diffusers SDXL pipeline folder (tiny UNet/VAE/text encoders, tokenizers built in code)
  loras/{dalle,ott,3d}.safetensors   tiny LoRAs with non-zero weights (dalle and 3d in kohya_ss layout, ott in diffusers layout)
  blip/                   a transformers BLIP captioning folder (model + processor + tokenizer)
  samples/{true,false}/   a generated two-class image set: desk-like scenes vs. clearly not
  classifier/desk_gate.keras          a VGG-shaped gate trained briefly on those samples
  owlv2/                  a transformers OWLv2 detector folder (model + processor + tokenizer)

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


#: The parts, in build order. The marker file lists the parts built, so a folder built before a part was
#: added gets just that part (``make models`` reruns when these modules change).
PARTS = ("sdxl+loras", "blip", "classifier", "owlv2")


def built_parts(out: Path) -> set[str]:
    marker = out / COMPLETE_MARKER
    if not marker.exists():
        return set()
    listed = set(marker.read_text().split())
    # A marker from before parts were listed ("ok") stands for the first three.
    return set(PARTS[:3]) if listed == {"ok"} else listed


def is_built(out: Path) -> bool:
    return built_parts(out) >= set(PARTS)


def build_all(out: Path, *, force: bool = False) -> dict[str, float]:
    """Build the tiny models into ``out`` that it lacks (all of them with ``force``); seconds per part built."""
    from deskgen.tools import tiny_blip, tiny_classifier, tiny_owl, tiny_sdxl

    builders = {"sdxl+loras": tiny_sdxl.build, "blip": tiny_blip.build, "classifier": tiny_classifier.build,
                "owlv2": tiny_owl.build}  # fmt: skip
    done = set() if force else built_parts(out)
    if done >= set(PARTS):
        log.info("tiny models already built in %s (use --force to rebuild)", out)
        return {}
    if not done and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    for name in PARTS:
        if name in done:
            continue
        start = time.perf_counter()
        builders[name](out)
        timings[name] = time.perf_counter() - start
        log.info("built tiny %s in %.1f s", name, timings[name])
        done.add(name)
        (out / COMPLETE_MARKER).write_text("".join(f"{part}\n" for part in PARTS if part in done))
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
