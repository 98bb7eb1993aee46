"""What product location costs per image: the OWLv2 locator in-process (tiny, and the full-size
owlv2-base-patch16-ensemble architecture with random weights), and through the real Serve graph.

    python -m bench.locator [--only local,fullsize,serve] [--fullsize-dir DIR] [--device cuda] [--no-write]
    make bench-locator

1. **local**: ``Locator.locate_batch`` on the tiny detector (96 px input) for one image of 1024 px with
   8 products, and a batch of 4; then the Locator's OWLv2 image processor alone (pad to a square, resize to
   the model's input, normalise) on one image of 64, 512 and 1024 px: how much of a call is preprocessing.
2. **fullsize**: the same on OWLv2-base's architecture (ViT-B/16 at 960 px: 3,600 query boxes; CLIP text
   tower), random weights built here (nothing is downloaded; written once to ``--fullsize-dir``/owlv2,
   outside the repository) and loaded through the same ``Locator.from_pretrained``. On a CPU this is the
   cost a CPU-only deployment would pay; on a GPU (``--device cuda``, fp16) the one production pays. Then
   its image processor alone (resizing to 960 px: the CPU work a production replica does per image).
3. **serve**: the tiny app from serve_config.yaml (bench.cpu's deployment): ``POST /v1/locate`` over HTTP,
   and ``/v1/text2img`` (64 px, 2 steps, 8 products) with ``locate`` on vs off, interleaved: the
   ingress's ``timings.locate_s`` and the difference in total request time is the locator's cost per image.

Small sample counts and p50s (a shared 2-core machine); no timing is asserted anywhere. The tables are
appended to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path

from bench.common import (
    DEFAULT_FULLSIZE_DIR,
    Table,
    append_report,
    command_line,
    desk_photo,
    jpeg_bytes,
    machine,
    ms,
    p50,
    parse_choices,
    render_section,
    time_calls,
    write_out_dir,
)
from deskgen.paths import PROJECT_ROOT, models_dir

log = logging.getLogger("bench.locator")

SECTIONS = ("local", "fullsize", "serve")
PROCESSOR_SIDES = (64, 512, 1024)
PRODUCTS = ("monitor", "keyboard", "mouse", "desk lamp", "plant", "mug", "chair", "headphones")
FULLSIZE_IMAGE = 960
FULLSIZE_PARAMS = 154_966_792  # Owlv2ForObjectDetection with Owlv2Config() and a 960 px input (checked at build)


def build_fullsize_owl(out: Path) -> Path:
    """OWLv2-base's architecture (``Owlv2Config()`` with the ensemble checkpoint's 960 px input), random
    weights, a code-built CLIP tokenizer of the real vocabulary size; written once to ``out/owlv2``."""
    import torch
    from transformers import Owlv2Config, Owlv2ForObjectDetection, Owlv2ImageProcessorPil, Owlv2Processor

    from deskgen.tools.tiny_sdxl import build_tokenizer

    folder = out / "owlv2"
    if (folder / ".complete").is_file():
        return folder
    tokenizer = build_tokenizer()
    tokenizer.model_max_length = 16
    config = Owlv2Config(
        text_config={"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                     "pad_token_id": tokenizer.pad_token_id},
        vision_config={"image_size": FULLSIZE_IMAGE},
    )  # fmt: skip
    torch.manual_seed(2024)
    model = Owlv2ForObjectDetection(config).eval()
    params = sum(p.numel() for p in model.parameters())
    if params != FULLSIZE_PARAMS:
        raise RuntimeError(f"OWLv2-base: {params:,} parameters, expected {FULLSIZE_PARAMS:,}")
    model.save_pretrained(folder)
    size = {"height": FULLSIZE_IMAGE, "width": FULLSIZE_IMAGE}
    Owlv2Processor(image_processor=Owlv2ImageProcessorPil(size=size), tokenizer=tokenizer).save_pretrained(folder)
    (folder / ".complete").write_text("ok\n")
    return folder


def bench_in_process(folder: Path, label: str, *, device: str | None, n: int) -> Table:
    from deskgen.locator import Locator

    start = time.perf_counter()
    locator = Locator.from_pretrained(str(folder), device=device)
    load_s = time.perf_counter() - start
    photo = desk_photo(1024, 1024)
    table = Table(f"Locator in-process: {label} ({locator.device}, load {load_s:.1f} s)",
                  ["images per call", "products each", "N", "p50 per call", "p50 per image"])  # fmt: skip
    for batch in (1, 4):
        times = time_calls(lambda b=batch: locator.locate_batch([photo] * b, [PRODUCTS] * b), n)  # type: ignore[misc]
        table.add(batch, len(PRODUCTS), len(times), ms(p50(times)), ms(p50(times) / batch))
    return table


def bench_image_processor(folder: Path, n: int) -> Table:
    """The image processor of a :class:`Locator` loaded from ``folder`` (the very object ``detect_batch`` calls,
    without the text queries or the network) on one square photo per size."""
    from deskgen.images import to_rgb
    from deskgen.locator import Locator

    processor = Locator.from_pretrained(str(folder), device="cpu")._processor.image_processor
    size = processor.size
    table = Table(f"OWLv2 image processor alone ({type(processor).__name__}, to {size['height']}x{size['width']})",
                  ["image", "N", "p50 ms", "max ms"])  # fmt: skip
    for side in PROCESSOR_SIDES:
        photo = to_rgb(desk_photo(side, side))
        times = time_calls(lambda im=photo: processor(images=[im], return_tensors="pt"), n)  # type: ignore[misc]
        table.add(f"{side}x{side}", len(times), ms(p50(times)), ms(max(times)))
    table.notes.append(
        "what `Locator.detect_batch` runs on each image before the network: pad to a square, anti-aliased resize "
        "to the model's input, rescale and normalise (in numpy/scipy, on the CPU, whatever the model's device)"
    )
    return table


def bench_serve(tiny: Path, n: int) -> Table:
    import httpx

    from bench.cpu import ServeApp, bench_serve_config, free_port

    config = bench_serve_config(free_port(), tiny, tiny / "classifier" / "desk_gate.keras")
    photo = jpeg_bytes(desk_photo(1024, 768))
    table = Table("Product location through the Serve graph (tiny models)",
                  ["request", "N", "p50 total", "p50 ingress locate_s", "p50 total (locate off)", "cost per image"])  # fmt: skip
    with ServeApp(config) as app, httpx.Client(base_url=app.url, timeout=120) as client:
        files = {"image": ("desk.jpg", photo, "image/jpeg")}
        locate = time_calls(lambda: client.post("/v1/locate", files=files, data={"products": ",".join(PRODUCTS)}).raise_for_status(), n)
        table.add("POST /v1/locate (1024x768 JPEG, 8 products)", len(locate), ms(p50(locate)), "-", "-", "-")
        on: list[float] = []
        off: list[float] = []
        locate_s: list[float] = []
        body = {"prompt": "a desk setup", "steps": 2, "width": 64, "height": 64, "products": list(PRODUCTS)}
        for i in range(n + 1):  # interleaved, so both see the same load; the first pair warms up
            for flag, sink in ((True, on), (False, off)):
                start = time.perf_counter()
                r = client.post("/v1/text2img", json={**body, "seed": i, "locate": flag}, headers={"Accept": "application/json"})
                r.raise_for_status()
                if i:
                    sink.append(time.perf_counter() - start)
                    if flag:
                        locate_s.append(r.json()["timings"]["locate_s"])
        table.add("POST /v1/text2img 64 px, 2 steps, 8 products", len(on), ms(p50(on)), ms(p50(locate_s)), ms(p50(off)),
                  ms(p50(on) - p50(off)))  # fmt: skip
    table.notes.append("cost per image = p50 total with locate on - p50 total with locate off (same seeds, interleaved)")
    return table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=None, help=f"comma-separated sections of {', '.join(SECTIONS)}")
    parser.add_argument("--models", default=None, help="tiny models folder (default: models/tiny)")
    parser.add_argument("--fullsize-dir", default=str(DEFAULT_FULLSIZE_DIR), help="where the full-size OWLv2 is built")
    parser.add_argument("--device", default=None, help="torch device for the in-process sections (default: cuda if any)")
    parser.add_argument("-n", type=int, default=5, help="samples per measurement")
    parser.add_argument("--no-write", action="store_true", help="print the tables; do not append to BENCHMARKS.md")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sections = parse_choices(args.only, SECTIONS, option="--only")
    tiny = Path(args.models) if args.models else models_dir()
    fullsize = Path(args.fullsize_dir).expanduser().resolve()
    if fullsize.is_relative_to(PROJECT_ROOT):
        parser.error("--fullsize-dir must be outside the repository (random weights do not belong in git)")
    start = time.perf_counter()
    tables: list[Table] = []
    if "local" in sections:
        tables.append(bench_in_process(tiny / "owlv2", "tiny OWLv2 (96 px input)", device=args.device, n=args.n))
        tables.append(bench_image_processor(tiny / "owlv2", n=args.n * 4))
    if "fullsize" in sections:
        folder = build_fullsize_owl(fullsize)
        tables.append(bench_in_process(folder, f"OWLv2-base architecture, random weights ({FULLSIZE_IMAGE} px input)",
                                       device=args.device, n=max(2, args.n // 2)))  # fmt: skip
        tables.append(bench_image_processor(folder, n=args.n * 4))
    if "serve" in sections:
        tables.append(bench_serve(tiny, args.n * 4))
    threads = os.environ.get("OMP_NUM_THREADS")
    section = render_section("Locator", tables, command=command_line(), wall_s=time.perf_counter() - start,
                             host=machine(), preface=[f"OMP_NUM_THREADS={threads} in this process"])  # fmt: skip
    print(section)
    write_out_dir("locator", section, {"tables": [t.as_dict() for t in tables]})
    if not args.no_write:
        append_report(section)


if __name__ == "__main__":
    main()
