"""What a switch by residual moves across the bus, per named mix, on the full-size SDXL's adapted layers.

    python -m bench.residual [--dtype bfloat16] [--mixes dalle_only,...] [--no-write]

``fuse_backup: residual`` (:mod:`deskgen.generator.residual`) puts the exact base weights back by
subtracting the recomputed delta and applying a 2-bit-per-weight residual, instead of copying 2.2 GiB of
base weights back from host memory. Its transfer is the residual's size (to the host at fuse time, back at
unfuse time), which depends on how far each LoRA moves each weight. This suite measures it on every layer
the bench's LoRAs adapt (the 736 attention projections of the full-size UNet and both text encoders,
:func:`bench.fullsize.lora_targets`), with base weights drawn as ``nn.Linear`` initialises them (what
``bench.fullsize``'s random-weight SDXL holds) and the bench's three rank-32 kohya LoRAs
(:func:`bench.fullsize.random_kohya_lora`, their seeds), each named mix fused as the generator fuses it
(``fl(W0 + sum_k w_k alpha/r B_k A_k)`` in the weights' dtype). Per mix: the residual's bytes against the
copy it replaces, the share of codes 0 / +-1 / escaped, and that every layer came back exactly. Also the
codec's CPU time per GiB of weights, eager and compiled (context only: a GPU's figures come from
``bench.gpu``). No model files are read or written.
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from typing import Any

from bench.common import (
    Table,
    append_report,
    command_line,
    machine,
    parse_choices,
    render_section,
    write_out_dir,
)

log = logging.getLogger("bench.residual")


def layers(targets: dict[str, dict[str, tuple[int, int]]], dtype: Any, seed: int) -> list[tuple[str, str, Any]]:
    """(component, module, base weight) of every adapted layer (``targets``: component -> module -> (in,
    out) features), drawn as nn.Linear's default init does: U(-1/sqrt(in), 1/sqrt(in)) (kaiming_uniform
    with a = sqrt(5)), seeded, in ``dtype``."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    out = []
    for component, modules in targets.items():
        for name in sorted(modules):
            in_f, out_f = modules[name]
            bound = 1 / math.sqrt(in_f)
            weight = (torch.rand(out_f, in_f, generator=gen) * 2 - 1) * bound
            out.append((component, name, weight.to(dtype)))
    return out


def adapters(targets: dict[str, dict[str, tuple[int, int]]]) -> dict[str, dict[str, tuple[Any, Any, float]]]:
    """adapter -> kohya module key -> (down, up, alpha / rank), the bench's LoRAs (float32) on ``targets``."""
    from bench.fullsize import LORA_SEEDS, random_kohya_lora
    from deskgen import kohya

    out: dict[str, dict[str, tuple[Any, Any, float]]] = {}
    for name, seed in LORA_SEEDS.items():
        state = random_kohya_lora(targets, seed, dtype="float32")
        per_module = {}
        for component, modules in targets.items():
            for module in modules:
                key = kohya.module_key(component, module)
                down, up = state[key + kohya.DOWN], state[key + kohya.UP]
                per_module[f"{component}.{module}"] = (down, up, float(state[key + kohya.ALPHA]) / down.shape[0])
        out[name] = per_module
    return out


def measure_mix(weights: dict[str, float], base: list[tuple[str, str, Any]], loras: dict[str, Any],
                codec: Any) -> dict[str, Any]:  # fmt: skip
    """Fuse one mix into every layer, encode, decode; sizes, code shares, exactness and codec seconds."""
    import torch

    from deskgen.generator import residual

    total = {"elements": 0, "copy_bytes": 0, "residual_bytes": 0, "escaped": 0, "zero": 0, "one": 0, "exact": True,
             "encode_s": 0.0, "decode_s": 0.0}  # fmt: skip
    bits = residual._bits_dtype(base[0][2].dtype)
    for component, module, weight in base:
        delta = torch.zeros(weight.shape)
        for adapter, w in weights.items():
            down, up, scale = loras[adapter][f"{component}.{module}"]
            delta += (up * (w * scale)) @ down
        delta = delta.to(weight.dtype)
        fused = weight + delta
        start = time.perf_counter()
        found = codec.encode(weight, fused, delta)
        total["encode_s"] += time.perf_counter() - start
        start = time.perf_counter()
        back, ok = codec.decode(found, fused, delta)
        total["decode_s"] += time.perf_counter() - start
        total["exact"] &= bool(ok) and torch.equal(back.view(bits), weight.view(bits))
        codes = residual._unpack(found.packed, found.numel)
        total["elements"] += weight.numel()
        total["copy_bytes"] += weight.numel() * weight.element_size()
        total["residual_bytes"] += found.nbytes
        total["escaped"] += found.escaped
        total["zero"] += int((codes == 0).sum())
        total["one"] += int(((codes == 1) | (codes == 2)).sum())
    return total


def main(argv: list[str] | None = None) -> None:
    from deskgen.mixes import NAMED_MIXES

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--mixes", default=None, help=f"comma-separated named mixes (default: all of {list(NAMED_MIXES)})")
    parser.add_argument("--seed", type=int, default=0, help="seed of the base weights")
    parser.add_argument("--no-write", action="store_true", help="print the tables; do not append to BENCHMARKS.md")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import torch

    from bench.fullsize import build_sdxl_components, lora_targets
    from deskgen.generator.residual import Codec

    mixes = parse_choices(args.mixes, list(NAMED_MIXES), option="--mixes")
    started = time.perf_counter()
    targets = lora_targets(build_sdxl_components("meta"))
    base = layers(targets, getattr(torch, args.dtype), args.seed)
    loras = adapters(targets)
    log.info("%d layers, %.2f GiB of base weights", len(base), sum(w.numel() * w.element_size() for *_, w in base) / 2**30)
    eager, compiled = Codec(), Codec(compiled=True)
    compiled.warm_up(getattr(torch, args.dtype), "cpu")
    table = Table(
        f"Residual per switch, per named mix — full-size SDXL's {len(base)} adapted layers, {args.dtype}, the "
        "bench's rank-32 LoRAs",
        ["mix", "weights rewritten GiB", "residual MiB", "residual / copy", "bits a weight", "codes 0", "codes ±1",
         "escaped", "exact"],
    )  # fmt: skip
    timing = Table(
        "Codec on the CPU (context only), seconds per GiB of weights",
        ["mix", "encode eager", "decode eager", "encode compiled", "decode compiled"],
    )
    payload: dict[str, Any] = {}
    for name in mixes:
        weights = NAMED_MIXES[name]
        r = measure_mix(weights, base, loras, compiled)
        gib = r["copy_bytes"] / 2**30
        if name == mixes[0]:
            e = measure_mix(weights, base, loras, eager)
            timing.add(name, f"{e['encode_s'] / gib:.1f}", f"{e['decode_s'] / gib:.1f}",
                       f"{r['encode_s'] / gib:.1f}", f"{r['decode_s'] / gib:.1f}")  # fmt: skip
            payload["eager"] = e
        n = r["elements"]
        table.add(name, f"{gib:.2f}", f"{r['residual_bytes'] / 2**20:.0f}", f"{r['residual_bytes'] / r['copy_bytes']:.3f}",
                  f"{8 * r['residual_bytes'] / n:.2f}", f"{100 * r['zero'] / n:.1f} %", f"{100 * r['one'] / n:.1f} %",
                  f"{100 * r['escaped'] / n:.2f} %", "yes" if r["exact"] else "**NO**")  # fmt: skip
        payload[name] = r
        log.info("%s: residual %.0f MiB for %.2f GiB", name, r["residual_bytes"] / 2**20, gib)
    table.notes += [
        "A switch by residual moves the old mix's residual host -> GPU and the new one's GPU -> host; by copy it "
        "moves the rewritten weights host -> GPU. Layers every mix adapts: the same 736 (each adapter covers them all).",
        "Codes: 0 = the subtraction gave the base back, ±1 = one ulp off, escaped = the exact base bits kept "
        "(weights near zero, where the delta dominates, and NaNs).",
    ]
    timing.notes.append("torch.compile (inductor's C++ backend here; Triton on a GPU) fuses the codec's ~15 "
                        "elementwise passes into a few kernels; the bits are the same (tests/unit/test_residual.py).")
    section = render_section("Residual switching: bytes per switch", [table, timing], command=command_line(),
                             wall_s=time.perf_counter() - started, host=machine())  # fmt: skip
    print(section)
    write_out_dir("residual", section, payload)
    if not args.no_write:
        append_report(section)


if __name__ == "__main__":
    main()
