"""LoRA training speed and memory: steps per second and peak memory of deskgen's training step.

    python -m bench.train --tiny                    # the tiny SDXL on the CPU, 64 px, ranks 4 and 16
    python -m bench.train                           # full-size SDXL on a GPU, 1024 px, ranks 16 and 32
    python -m bench.train --ranks 16 --resolution 1024 --n 10 --checkpointing both --deadline-s 200
    bash bench/gpu_device.sh --train                # on this workplace's lent GPU (after the GPU suite)

Each configuration builds a :class:`deskgen.lora_training.trainer.LoraTrainer` (the step every training
job runs; Ray Train adds its workers around it), prepares ``--images`` synthetic desk-like images with
captions, runs ``--warmup`` steps, then times ``--n`` steps (the device synchronised after each): seconds
per step p50 / p95, steps per second, the peak memory (``torch.cuda.max_memory_allocated`` on a GPU, the
process's peak RSS on the CPU), the trainable parameters, and the time the seed's scale would take
(``--seed-steps``, default 1,500 steps, batch 1: the old system's 366 images about four times over) at the
measured p50, plus the load. On the GPU the full-size SDXL architecture is built with random weights
(:mod:`bench.fullsize`, into ``--fullsize``): timings are real, losses mean nothing.

Appends its table to BENCHMARKS.md (``--no-write`` prints only); with ``$OUT`` set, also writes
``$OUT/bench_train.md`` and ``.json`` after every configuration, so a run cut short still reports.
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import logging
import os
import resource
import time
from pathlib import Path
from typing import Any

from bench.common import (
    Table,
    append_report,
    command_line,
    machine,
    p50,
    percentile,
    render_section,
    write_out_dir,
)
from deskgen.paths import models_dir, resolve

log = logging.getLogger("bench.train")

CAPTIONS = ["a desk setup with a monitor, a keyboard and a lamp", "a wooden desk with a laptop and a plant",
            "a white desk with two monitors and a mug", "a gaming desk with rgb lights and a headset"]  # fmt: skip


def synthetic_images(count: int, size: int, seed: int = 0) -> list[Any]:
    """``count`` seeded desk-like PNGs (a desk top, a screen, a lamp) with captions, as training examples."""
    import random

    from PIL import Image, ImageDraw

    from deskgen.lora_training.data import TrainingExample

    rng = random.Random(seed)
    examples = []
    for k in range(count):
        image = Image.new("RGB", (size, size), tuple(rng.randrange(40, 200) for _ in range(3)))
        draw = ImageDraw.Draw(image)
        draw.rectangle((0, size * 2 // 3, size, size), fill=tuple(rng.randrange(90, 220) for _ in range(3)))
        left = rng.randrange(size // 8, size // 2)
        draw.rectangle((left, size // 4, left + size // 3, size // 2), fill=(20, 20, 30))
        draw.ellipse((size * 3 // 4, size // 3, size * 7 // 8, size // 2), fill=(250, 230, 150))
        data = io.BytesIO()
        image.save(data, "PNG")
        examples.append(TrainingExample(f"synthetic-{k}", data.getvalue(), CAPTIONS[k % len(CAPTIONS)]))
    return examples


def peak_memory_gib(device: str) -> float:
    if device == "cuda":
        import torch

        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def measure(
    base: Path, rank: int, args: argparse.Namespace, device: str, checkpointing: bool
) -> dict[str, Any]:
    import torch

    from deskgen.lora_training.config import LoraTrainingConfig
    from deskgen.lora_training.trainer import LoraTrainer, prepare

    config = LoraTrainingConfig(name="bench", base_model=str(base), rank=rank, resolution=args.resolution,
                                steps=args.n, learning_rate=1e-4, train_text_encoders=args.text_encoders,
                                gradient_checkpointing=checkpointing)  # fmt: skip
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    trainer = LoraTrainer(config, device=device)
    batch = [prepare(e, config) for e in synthetic_images(args.images, args.resolution)]
    load_s = time.perf_counter() - started

    def step(k: int) -> float:
        t0 = time.perf_counter()
        trainer.step([batch[k % len(batch)]])
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    first = [step(k) for k in range(args.warmup)]
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = [step(k) for k in range(args.n)]
    result = {
        "rank": rank, "resolution": args.resolution, "gradient_checkpointing": checkpointing,
        "text_encoders": args.text_encoders, "trainable_params": trainer.trainable_count, "load_s": load_s,
        "first_steps_s": first, "step_s": times, "p50_s": p50(times), "p95_s": percentile(times, 95),
        "peak_gib": peak_memory_gib(device), "seed_steps": args.seed_steps,
    }  # fmt: skip
    result["seed_scale_min"] = (load_s + args.seed_steps * result["p50_s"]) / 60
    return result


def release(device: str) -> None:
    gc.collect()
    if device == "cuda":
        import torch

        torch.cuda.empty_cache()


def table(results: list[dict[str, Any]], device: str, model: str) -> Table:
    memory = "peak VRAM GiB (steps)" if device == "cuda" else "peak RSS GiB (process)"
    t = Table(
        f"LoRA training step, {model}, batch 1, AdamW, on {device}",
        ["rank", "px", "grad. checkpointing", "trainable params", "s/step p50", "p95", "steps/s", memory,
         "load s", "seed scale (steps) min"],
    )  # fmt: skip
    for r in results:
        t.add(r["rank"], r["resolution"], "yes" if r["gradient_checkpointing"] else "no",
              f"{r['trainable_params'] / 1e6:.2f} M", f"{r['p50_s']:.3f}", f"{r['p95_s']:.3f}",
              f"{1 / r['p50_s']:.2f}", f"{r['peak_gib']:.2f}", f"{r['load_s']:.1f}",
              f"{r['seed_scale_min']:.1f} ({r['seed_steps']})")  # fmt: skip
    t.notes.append("seed scale = load + seed steps x s/step p50 (one worker; Ray Train's per-step report adds "
                   "under a millisecond).")  # fmt: skip
    return t


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument(
        "--tiny", action="store_true", help="the tiny SDXL on the CPU (a check of the code path)"
    )
    parser.add_argument("--ranks", default=None, help="comma-separated ranks (default 16,32; tiny 4,16)")
    parser.add_argument("--resolution", type=int, default=None, help="default 1024 (tiny 64)")
    parser.add_argument("--n", type=int, default=None, help="timed steps (default 10; tiny 20)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--seed-steps", type=int, default=1500)
    parser.add_argument("--checkpointing", choices=("no", "yes", "both"), default="no")
    parser.add_argument("--text-encoders", action="store_true", help="also train the text encoders' LoRAs")
    parser.add_argument("--fullsize", default=os.environ.get("DESKGEN_FULLSIZE", "/tmp/deskgen-fullsize"))
    parser.add_argument(
        "--deadline-s", type=float, default=None, help="skip configurations that would not finish"
    )
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import torch

    started = time.perf_counter()
    if args.tiny:
        device, base, model = "cpu", models_dir() / "sdxl", "tiny SDXL (models/tiny)"
        ranks = [int(r) for r in (args.ranks or "4,16").split(",")]
        args.resolution = args.resolution or 64
        args.n = args.n or 20
    else:
        if not torch.cuda.is_available():
            raise SystemExit(
                "bench.train needs a CUDA GPU; `python -m bench.train --tiny` checks the code path on the CPU"
            )
        from bench import fullsize

        out = fullsize.check_out_dir(resolve(args.fullsize))
        fullsize.build(out, ["sdxl"], device="cuda")
        device, base, model = (
            "cuda",
            fullsize.part_dir(out, "sdxl"),
            "full-size SDXL (2.57 B UNet, random weights), bfloat16",
        )
        ranks = [int(r) for r in (args.ranks or "16,32").split(",")]
        args.resolution = args.resolution or 1024
        args.n = args.n or 10
    flags = {"no": [False], "yes": [True], "both": [False, True]}[args.checkpointing]
    results: list[dict[str, Any]] = []
    skipped: list[str] = []
    host = machine()

    def report() -> str:
        t = table(results, device, model)
        t.notes += [f"not measured: {s}" for s in skipped]
        section = render_section("LoRA training (issue 26)", [t], command=command_line(),
                                 wall_s=time.perf_counter() - started, host=host)  # fmt: skip
        write_out_dir("bench_train", section, {"results": results, "skipped": skipped})
        return section

    for checkpointing in flags:
        for rank in ranks:
            label = f"rank {rank}, checkpointing {checkpointing}"
            elapsed = time.perf_counter() - started
            estimate = max((r["load_s"] + (args.n + args.warmup) * r["p50_s"] for r in results), default=0.0)
            if args.deadline_s is not None and elapsed + estimate * 1.3 > args.deadline_s:
                skipped.append(f"{label} (deadline)")
                log.warning(
                    "skipping %s: %.0f s used, ~%.0f s needed, deadline %.0f s",
                    label,
                    elapsed,
                    estimate,
                    args.deadline_s,
                )
                continue
            try:
                result = measure(base, rank, args, device, checkpointing)
            except Exception as exc:  # a failed configuration is reported; the others still run
                log.exception("%s failed", label)
                skipped.append(f"{label}: failed ({type(exc).__name__}: {str(exc)[:200]})")
                continue
            finally:
                release(device)
            results.append(result)
            log.info("%s: %s", label, json.dumps({k: v for k, v in result.items() if k != "step_s"}))
            report()
    section = report()
    print(section)
    if not args.no_write:
        append_report(section)


if __name__ == "__main__":
    main()
