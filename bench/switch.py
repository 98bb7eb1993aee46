"""What one mix switch costs when every mix is fused: the batched path vs peft's ``fuse_lora``.

    python -m bench.switch [--models DIR] [--device cuda] [--dtype bfloat16] [-n 30] [--backup residual|cpu|device] [--no-write]

``--models`` is a folder with ``sdxl/`` and ``loras/`` (default: the tiny models, models/tiny; the
full-size random-weight SDXL with its rank-32 LoRAs is ``python -m bench.fullsize --out DIR``). For each
path one :class:`~deskgen.generator.DeskGenerator` (eager, every adapter of the folder loaded first)
switches through a cycle of mixes of 1, 2 and 3 adapters, every switch to another mix; one untimed cycle
first (the first fuse of a layer also copies its exact base values). Per switch (``activate_mix``:
restore the exact base weights, then fuse the new mix):

- **batched** (``fuse_active_mix``, the new default without hot-swap slots): one ``_foreach_copy_``
  restore, one ``bmm`` per weight shape for the summed delta of all the mix's adapters, one
  ``_foreach_add_`` (:mod:`deskgen.generator.switching`);
- **fuse_lora**: the same generator with the fuse done the old way, ``set_adapters`` + diffusers'
  ``pipe.fuse_lora`` (peft's per-layer, per-adapter merge) and on the way out ``unfuse_lora`` + the
  exact restore (what only the ``fuse_hot_mix`` mix got before);
- **branches** (context): ``fuse_active_mix: false``, ``set_adapters`` only — the cheapest switch, but
  every generation then runs the unfused LoRA branches (slower per image on a GPU, BENCHMARKS.md).

Wall time p50 / p95 (nearest rank) of the switches, and the peak memory a switch adds: on CUDA
``torch.cuda.max_memory_allocated`` minus what was allocated before it; on the CPU the peak RSS
(``VmHWM``, reset before each switch through ``/proc/self/clear_refs``) minus the RSS before it. Also the
largest difference between the batched and the fuse_lora weights after the same final mix. No timing is
asserted; the table is printed and appended to BENCHMARKS.md (``--no-write``: printed only).
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import (
    Table,
    append_report,
    command_line,
    machine,
    ms,
    p50,
    percentile,
    render_section,
    write_out_dir,
)
from deskgen.devices import is_cuda
from deskgen.paths import models_dir

log = logging.getLogger("bench.switch")

PATHS = ("batched", "fuse_lora", "branches")
#: Mix weights of the cycle, by adapter position in the LoRA folder (sorted names).
CYCLE = ({0: 0.7}, {0: 0.5, 1: 0.7}, {0: 0.4, 1: 0.6, 2: 0.4}, {1: 1.0}, {1: 0.7, 2: 0.5}, {2: 0.8})


def _proc_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


class PeakMemory:
    """Peak bytes a call adds: CUDA allocator peak, or the RSS high-water mark on the CPU."""

    def __init__(self, device: str) -> None:
        self.cuda = is_cuda(device)
        self.rss = not self.cuda and Path("/proc/self/clear_refs").exists()

    def measure(self, fn: Callable[[], Any]) -> tuple[float, int | None]:
        """(seconds, peak added bytes or None where it cannot be measured)."""
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        elif self.rss:
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
            before = _proc_kib("VmRSS") * 1024
        start = time.perf_counter()
        fn()
        if self.cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        if self.cuda:
            return seconds, torch.cuda.max_memory_allocated() - before
        if self.rss:
            return seconds, max(0, _proc_kib("VmHWM") * 1024 - before)
        return seconds, None


def build(path: str, models: Path, device: str, dtype: str | None, backup: str) -> Any:
    from deskgen.generator import DeskGenerator, GeneratorSettings

    settings = GeneratorSettings(
        model_id=str(models / "sdxl"), lora_dir=str(models / "loras"), device=device, dtype=dtype, compile=False,
        hotswap=False, fuse_active_mix=path != "branches", fuse_backup=backup,
    )  # fmt: skip
    gen = DeskGenerator.from_pretrained(settings)
    if path == "fuse_lora":
        gen.switcher.method = "diffusers"  # the old per-layer fuse, now for every mix
    gen.ensure_adapters(gen.available_adapters())
    return gen


def cycle(adapters: list[str]) -> list[Any]:
    from deskgen.mixes import Mix

    mixes = []
    for spec in CYCLE:
        if all(i < len(adapters) for i in spec):
            mixes.append(Mix.from_weights({adapters[i]: w for i, w in spec.items()}))
    return mixes


def fused_weights(gen: Any) -> dict[str, Any]:
    out = {}
    for component in ("unet", "text_encoder", "text_encoder_2"):
        for key, value in getattr(gen.pipe, component).state_dict().items():
            if "lora_" not in key:
                out[f"{component}.{key.replace('.base_layer', '')}"] = value
    return out


def bench_path(path: str, models: Path, device: str, dtype: str | None, backup: str, n: int) -> dict[str, Any]:
    """Switch ``n`` times on a generator of ``path`` (built here, dropped on return)."""
    gen = build(path, models, device, dtype, backup)
    mixes = cycle(sorted(gen.available_adapters()))
    if len(mixes) < 2:
        raise SystemExit(f"{models / 'loras'} needs at least 2 usable adapters to switch between")
    meter = PeakMemory(device)

    def switch_to(*targets: Any) -> Callable[[], None]:
        def run() -> None:
            for mix in targets:
                gen.activate_mix(mix)

        return run

    first_s, first_peak = meter.measure(switch_to(*mixes))  # the untimed cycle
    seconds: list[float] = []
    peaks: list[int] = []
    temporaries = 0
    for i in range(n):
        s, peak = meter.measure(switch_to(mixes[i % len(mixes)]))
        temporaries = max(temporaries, gen.switcher.batched.transient_bytes)
        seconds.append(s)
        if peak is not None:
            peaks.append(peak)
    last = mixes[(n - 1) % len(mixes)]
    fused = gen.switcher.fused
    result = {
        "path": path, "seconds": seconds, "peaks": peaks, "first_cycle_s": first_s, "first_cycle_peak": first_peak,
        "mixes": [m.id for m in mixes], "last_mix": last.id, "tensors": len(fused.params) if fused else 0,
        "copies_bytes": gen.switcher.pristine.nbytes(), "dtype": gen.dtype,
        "residual_bytes": gen.switcher.residual_bytes(), "restored": dict(gen.switcher.restored),
        "rewritten_bytes": sum(p.numel() * p.element_size() for p in fused.params) if fused else 0,
        "temporaries": temporaries if path == "batched" else None,
        "weights": {k: v.detach().to("cpu", copy=True) for k, v in fused_weights(gen).items()} if path != "branches" else None,
    }  # fmt: skip
    return result


def release() -> None:
    """Free what the last generator held before the next is built."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def mib(value: float | None) -> str:
    return "n/a" if value is None else f"{value / 1024**2:.1f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=None, help="folder with sdxl/ and loras/ (default: models/tiny)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", default=None, help="float32, float16 or bfloat16 (default: the generator's)")
    parser.add_argument("--backup", default="cpu", choices=("residual", "cpu", "device"),
                        help="fuse_backup: how the exact base comes back (residual, or a copy on cpu / device)")
    parser.add_argument("-n", type=int, default=30, help="timed switches per path")
    parser.add_argument("--only", default=",".join(PATHS), help=f"comma-separated paths of {', '.join(PATHS)}")
    parser.add_argument("--no-write", action="store_true", help="print the table; do not append to BENCHMARKS.md")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    models = Path(args.models) if args.models else models_dir()
    paths = [p.strip() for p in args.only.split(",") if p.strip()]
    if not paths or any(p not in PATHS for p in paths):
        parser.error(f"--only must name some of {PATHS}")
    start = time.perf_counter()
    results = []
    for path in paths:
        results.append(bench_path(path, models, device, args.dtype, args.backup, args.n))
        release()

    dtype = results[0]["dtype"]
    table = Table(
        f"One mix switch (`activate_mix`) — {models.name} SDXL, {device}, {dtype}, fuse_backup={args.backup}",
        ["path", "switches", "p50 ms", "p95 ms", "peak added MiB (p50 / max)", "fuse temporaries MiB (counted)",
         "first cycle ms (copies the base)", "base tensors rewritten (last mix)"],
    )  # fmt: skip
    by_path = {r["path"]: r for r in results}
    for r in results:
        peaks = r["peaks"]
        peak = f"{mib(p50(peaks))} / {mib(max(peaks))}" if peaks else "n/a"
        table.add(f"**{r['path']}**", len(r["seconds"]), ms(p50(r["seconds"])), ms(percentile(r["seconds"], 95)), peak,
                  mib(r["temporaries"]), ms(r["first_cycle_s"]), r["tensors"])  # fmt: skip
    if "batched" in by_path and "fuse_lora" in by_path:
        a, b = by_path["batched"], by_path["fuse_lora"]
        table.notes.append(
            f"fuse_lora / batched, p50: **{p50(b['seconds']) / p50(a['seconds']):.1f}x**; "
            f"p95: {percentile(b['seconds'], 95) / percentile(a['seconds'], 95):.1f}x."
        )
        if a["last_mix"] == b["last_mix"]:
            diff = max(float((a["weights"][k].double() - b["weights"][k].double()).abs().max()) for k in a["weights"])
            table.notes.append(f"After the same last mix ({a['last_mix']}) the batched and fuse_lora weights differ "
                               f"by at most {diff:.3g} (float rounding; tests/unit/test_fused_switch.py bounds it).")  # fmt: skip
    first = results[0]
    table.notes += [
        f"Cycle of {len(first['mixes'])} mixes, every switch to another one: {', '.join(first['mixes'])}.",
        f"Exact base copies held: {mib(first['copies_bytes'])} MiB ({args.backup}).",
        *(f"{r['path']}: base tensors put back by residual {r['restored']['residual']}, from the copy "
          f"{r['restored']['copy']}; the last mix's residual {mib(r['residual_bytes'])} MiB for "
          f"{mib(r['rewritten_bytes'])} MiB of weights rewritten." for r in results if r["path"] != "branches"),
        "Peak memory: " + ("torch.cuda.max_memory_allocated minus memory_allocated before the switch."
                           if is_cuda(device) else
                           "peak RSS (VmHWM, reset per switch) minus RSS before it; page-granular, and the "
                           "allocator may reuse freed memory, so small values are noise.")
        + " Fuse temporaries (batched): the largest set of stacked factors + one bmm chunk held at once, "
          "counted by BatchedFuser.transient_bytes (capped by CHUNK_ELEMENTS).",
    ]  # fmt: skip
    threads = torch.get_num_threads()
    section = render_section("Mix switch: batched fuse vs fuse_lora", [table], command=command_line(),
                             wall_s=time.perf_counter() - start, host=machine(),
                             preface=[f"torch threads: {threads}"])  # fmt: skip
    print(section)
    payload = {"table": table.as_dict(), "raw": [{k: v for k, v in r.items() if k != "weights"} for r in results]}
    write_out_dir("switch", section, payload)
    if not args.no_write:
        append_report(section)


if __name__ == "__main__":
    main()
