"""The GPU benchmark suite: full-size SDXL + a LoRA mix at 1024x1024, diffusers baseline vs the generator.

    python -m bench.gpu [--fullsize DIR] [--profiles production,fused,...] [--n 6] [--set FIELD=VALUE ...]
                        [--only sdxl,blip,vgg] [--order STAGE,...] [--deadline-s S] [--no-write]
    make bench-gpu
    bench/gpu_device.sh              # on this workplace's lent GPU machine (wheels from bench/gpu_wheels.sh)
    python -m bench.gpu --tiny      # the same code path on models/tiny, CPU, 64 px, 2 steps (a check, not a benchmark)

One command, nothing to install beyond the project's dependencies. In one run it

1. builds the full-size random-weight models on the GPU (:mod:`bench.fullsize`, skipped when already
   in ``--fullsize``): SDXL in fp16, the rank-32 ``dalle``/``ott``/``3d`` kohya LoRAs, BLIP-base, VGG16;
2. **baseline** — plain diffusers: ``StableDiffusionXLPipeline.from_pretrained(dtype=float16)``,
   ``load_lora_weights`` for the mix's adapters, ``set_adapters`` (unfused), diffusers' default attention;
3. **the generator** — :class:`deskgen.generator.DeskGenerator` in the configurations of
   :data:`PROFILES`: ``production`` is exactly what serve_config.yaml deploys; every other profile names
   the flags it sets (compile, fused hot mix, FP8, DeepCache, ...); ``--set`` overrides any
   GeneratorSettings field in all of them. Each is reported flag by flag (``DeskGenerator.describe()``)
   with what the loaded pipeline actually runs (dtype, attention processors, channels_last, compiled
   blocks, FP8 layers);
4. for each, at 1024x1024, 30 steps, CFG 5, mix :data:`HOT_MIX`: seconds per image (warm, p50 and p95
   of N), the PSNR of its image against the baseline's and whether the same seed gives the same bytes,
   peak VRAM (``torch.cuda.max_memory_allocated``, of the warm generations and of load + first
   generation), the first generation, and three switches between two cached mixes (``activate_mix``),
   each followed by a generation: switch time, base loads, and whether it recompiled (dynamo's graph
   counter); with ``--arms P,...``, each of the 7 named mixes served in turn on one generator of profile
   P (switch, first and timed generations, peak per arm) and the switch alone; on ``production``'s
   generator also the switch alone under every placement of the exact base and the factors
   (:data:`PLACEMENTS`);
5. BLIP-base (the Captioner, fp16) and the VGG16 gate (TensorFlow in a child process with memory
   growth on; on a GPU image without TensorFlow, the same layers on Keras' torch backend) on the GPU;
6. prints the goals beside the results and APPENDS the tables to BENCHMARKS.md; with ``$OUT`` set,
   also writes ``$OUT/bench_gpu.json`` and ``$OUT/bench_gpu.md`` after every stage, so a run cut short
   still reports. ``--deadline-s`` skips (and reports) stages that would not finish in time.

Measured on an H200 (2026-11-28): build 29 s, baseline and each eager profile ~40 s, a compiled profile
~50 s with a cold inductor cache (~20 s warm): the default set runs in about 6 minutes.

One file on purpose (~1,000 lines): it is the one prepared command a lent GPU runs, with a short and
expensive budget; every section, table and fallback it needs is here, read top to bottom before a run.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import json
import logging
import math
import os
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import (
    DEFAULT_FULLSIZE_DIR,
    Table,
    append_report,
    command_line,
    desk_photo,
    machine,
    p50,
    parse_choices,
    percentile,
    render_section,
    s,
    write_out_dir,
)
from deskgen.devices import is_cuda
from deskgen.errors import InvalidParameter, ModelFilesMissing
from deskgen.paths import PROJECT_ROOT, models_dir, resolve

log = logging.getLogger("bench.gpu")

PARTS = ("sdxl", "blip", "vgg")
PROMPT = "a cozy desk setup with two monitors, a mechanical keyboard, a lamp and a plant, warm evening light"
NEGATIVE = "blurry, low quality, deformed, text, watermark"
SEED = 42
#: The measured mix (fused where a profile fuses) and the one switched to. serve_config.yaml fuses the
#: experiment's control arm, ott_3d (70 % of its users), as the runs of 2026-11-28 did.
HOT_MIX, OTHER_MIX = "ott_3d", "dalle_ott"

#: What the suite is judged against (printed beside the results; issue 15's goals).
GOAL_S_PER_IMAGE = 1.0  # on an H200 (the s/image goal is judged on H100/H200 runs only)
GOAL_GPUS = ("H200", "H100")
GOAL_SPEEDUP = 2.5
GOAL_PEAK_VRAM_GB = 8.0  # decimal GB of torch.cuda.max_memory_allocated
GOAL_SWITCH_S = 0.05

REFERENCE_ROWS = [
    ("Old system: SDXL (Fluently-XL-v2) + LoRA mix, 1024², T4", "~26 s/image", "8.7-11 GB"),
    ("Old system: same, L4", "~12 s/image", "8.7-11 GB"),
    ("Old system: same, A100", "~4 s/image", "8.7-11 GB"),
    ("diffusers published: SDXL 1024², 30 steps, A100, bf16 + SDPA", "3.31 s/image", ""),
    ("diffusers published: same + torch.compile", "2.54 s/image", ""),
    ("TensorRT SDXL 1024², 30 steps, H100 (published)", "1.47 s/image", ""),
    ("Old system: BLIP-base", "", "1.2 GB"),
    ("Old system: VGG16 gate, A100 / CPU", "~42 ms / ~175 ms", ""),
]


@dataclass(frozen=True)
class Scenario:
    """The generation every SDXL measurement runs, and where it runs."""

    device: str
    size: int
    steps: int
    n: int
    guidance: float = 5.0
    baseline_dtype: str = "float16"
    tiny: bool = False

    @property
    def cuda(self) -> bool:
        return is_cuda(self.device)


# --------------------------------------------------------------------------------------------------
# Device helpers
# --------------------------------------------------------------------------------------------------


def sync(device: str) -> None:
    import torch

    if is_cuda(device):
        torch.cuda.synchronize()


def reset_peak(device: str) -> None:
    import torch

    if is_cuda(device):
        gc.collect()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device: str) -> float | None:
    import torch

    if not is_cuda(device):
        return None
    return torch.cuda.max_memory_allocated() / 1024**3


def allocated_gib(device: str) -> float | None:
    import torch

    return torch.cuda.memory_allocated() / 1024**3 if is_cuda(device) else None


def free_device(device: str) -> None:
    import torch

    gc.collect()
    if is_cuda(device):
        torch.cuda.empty_cache()


def gib(value: float | None) -> str:
    return "n/a (CPU)" if value is None else f"{value:.2f}"


def dynamo_counters() -> dict[str, int]:
    """torch._dynamo's compile counters: a new graph (``unique_graphs``) means a (re)compilation."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:
        return {"unique_graphs": 0, "frames_ok": 0}
    return {"unique_graphs": int(counters["stats"]["unique_graphs"]), "frames_ok": int(counters["frames"]["ok"])}


@contextmanager
def nan_watch() -> Iterator[list[str]]:
    """Collects the NumPy cast warnings a NaN image raises when it is converted to 8-bit pixels."""
    found: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield found
    found += [str(w.message) for w in caught if "invalid value" in str(w.message)]


def image_ok(image: Any) -> bool:
    """A usable (if random-weight, noisy) image: not one flat colour, which is what NaNs turn into."""
    import numpy as np

    return float(np.asarray(image, dtype=np.float32).std()) > 0.0


# --------------------------------------------------------------------------------------------------
# SDXL: baseline and production
# --------------------------------------------------------------------------------------------------


class TimedRun:
    """p50 and p95 of a result's ``times_s`` (seconds per image)."""

    times_s: list[float]

    @property
    def p50_s(self) -> float:
        return p50(self.times_s)

    @property
    def p95_s(self) -> float:
        return percentile(self.times_s, 95)


@dataclass
class SdxlResult(TimedRun):
    label: str
    load_s: float
    first_s: float
    times_s: list[float]
    peak_gen_gib: float | None
    peak_all_gib: float | None
    images_ok: bool
    nan_warnings: int
    details: dict[str, Any] = field(default_factory=dict)
    #: Every timed image of the seed bit-identical to the first one.
    deterministic: bool = True
    #: PSNR (dB, 8-bit pixels) of this configuration's image against the baseline's, same seed and mix.
    psnr_vs_baseline: float | None = None


def psnr(a: Any, b: Any) -> float:
    """Peak signal-to-noise ratio of two 8-bit images in dB (inf when identical)."""
    import numpy as np

    mse = float(np.mean((np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * math.log10(255.0**2 / mse)


def mix_weights(name: str) -> dict[str, float]:
    from deskgen.mixes import NAMED_MIXES

    return dict(NAMED_MIXES[name])


@dataclass
class _Timed:
    first_s: float
    times_s: list[float]
    peak_all_gib: float | None
    peak_gen_gib: float | None
    ok: bool
    nans: int
    image: Any  # the first image, as a uint8 array
    deterministic: bool


def time_generations(generate: Callable[[], Any], sc: Scenario) -> _Timed:
    """One first generation (warm-up, or compilation), then ``sc.n`` timed ones. Peak VRAM: since the
    caller's last reset (load + first generation), and of the timed generations alone."""
    import numpy as np

    ok, nans, same = True, 0, True
    with nan_watch() as found:
        start = time.perf_counter()
        image = generate()
        sync(sc.device)
        first_s = time.perf_counter() - start
    ok &= image_ok(image)
    first = np.asarray(image, dtype=np.uint8)
    nans += len(found)
    peak_all = peak_gib(sc.device)
    reset_peak(sc.device)
    times = []
    for _ in range(sc.n):
        with nan_watch() as found:
            start = time.perf_counter()
            image = generate()
            sync(sc.device)
            times.append(time.perf_counter() - start)
        ok &= image_ok(image)
        same &= bool(np.array_equal(np.asarray(image, dtype=np.uint8), first))
        nans += len(found)
    return _Timed(first_s, times, peak_all, peak_gib(sc.device), ok, nans, first, same)


def run_baseline(sdxl_dir: Path, lora_dir: Path, sc: Scenario) -> tuple[SdxlResult, Any]:
    """Plain diffusers: fp16 pipeline, the mix's adapters loaded and set unfused, default attention."""
    import torch
    from diffusers import StableDiffusionXLPipeline

    from deskgen.loras import quiet_adapter_load

    reset_peak(sc.device)
    start = time.perf_counter()
    pipe = StableDiffusionXLPipeline.from_pretrained(str(sdxl_dir), dtype=getattr(torch, sc.baseline_dtype))
    pipe.to(sc.device)
    pipe.set_progress_bar_config(disable=True)
    weights = mix_weights(HOT_MIX)
    for name in weights:
        with quiet_adapter_load():
            pipe.load_lora_weights(str(lora_dir), weight_name=f"{name}.safetensors", adapter_name=name)
    pipe.set_adapters(list(weights), adapter_weights=list(weights.values()))
    sync(sc.device)
    load_s = time.perf_counter() - start

    def generate() -> Any:
        return pipe(
            prompt=PROMPT,
            negative_prompt=NEGATIVE,
            num_inference_steps=sc.steps,
            guidance_scale=sc.guidance,
            width=sc.size,
            height=sc.size,
            generator=torch.Generator(device=sc.device).manual_seed(SEED),
            output_type="pil",
        ).images[0]

    t = time_generations(generate, sc)
    return SdxlResult(
        label=f"baseline: diffusers {sc.baseline_dtype}, {len(weights)} LoRAs unfused",
        load_s=load_s,
        first_s=t.first_s,
        times_s=t.times_s,
        peak_gen_gib=t.peak_gen_gib,
        peak_all_gib=t.peak_all_gib,
        images_ok=t.ok,
        nan_warnings=t.nans,
        details={"pipeline": describe_pipeline(pipe), "adapters": weights},
        deterministic=t.deterministic,
        psnr_vs_baseline=float("inf"),
    ), t.image  # the pipeline goes with this frame; the caller frees the device memory


#: Generator configurations measured besides the baseline: GeneratorSettings overrides applied on top
#: of the production settings (defaults < serve_config.yaml generator_options < --set). ``production`` is
#: exactly what serve_config.yaml deploys; the others name every flag that differs from it, so they
#: mean the same whatever the config says. (Before 2026-11-28 ``production`` was ``eager_unfused``.)
PROFILES: dict[str, dict[str, Any]] = {
    "production": {},
    "eager_unfused": {"compile": False, "fuse_hot_mix": None, "fuse_active_mix": False},
    "fused": {"compile": False, "fuse_hot_mix": HOT_MIX, "fuse_active_mix": False},
    # Every mix fused as it becomes active (deskgen/generator/switching.py): each arm at fused speed.
    "fused_every_mix": {"compile": False, "fuse_active_mix": True, "fuse_hot_mix": None},
    "compiled_every_mix": {"compile": True, "fuse_active_mix": True, "fuse_hot_mix": None},
    "compiled_every_mix_devcopy": {"compile": True, "fuse_active_mix": True, "fuse_hot_mix": None,
                                   "fuse_backup": "device"},
    # The exact base put back from a full copy in pinned host memory (production until 2026-12-05; now
    # by residual: deskgen/generator/residual.py).
    "compiled_every_mix_hostcopy": {"compile": True, "fuse_active_mix": True, "fuse_hot_mix": None,
                                    "fuse_backup": "cpu"},
    # Production as of 2026-12-04 run 4: the exact base from a pinned host copy, the adapters' factors on the
    # GPU, diffusers' VAE forward (the memory and switch changes of 2026-12-05 all off).
    "compiled_every_mix_20261204": {"compile": True, "fuse_active_mix": True, "fuse_hot_mix": None,
                                    "fuse_backup": "cpu", "lora_factors": "device", "vae_inplace": False},
    "deepcache": {"compile": False, "fuse_hot_mix": HOT_MIX, "deepcache_interval": 3},
    # Hot-swap slots on a compiled UNet; with a hot mix fused by config (the production default until 2026-12).
    "compiled_slots": {"compile": True, "fuse_hot_mix": None, "fuse_active_mix": False},
    "compiled_fused": {"compile": True, "fuse_hot_mix": HOT_MIX, "fuse_active_mix": False},
    "compiled_fused_devcopy": {"compile": True, "fuse_hot_mix": HOT_MIX, "fuse_active_mix": False,
                               "fuse_backup": "device"},
    "compiled_fused_deepcache": {"compile": True, "fuse_hot_mix": HOT_MIX, "fuse_active_mix": False,
                                 "deepcache_interval": 3},
    "compiled_unet_fused": {"compile": True, "compile_scope": "unet", "fuse_hot_mix": HOT_MIX, "fuse_active_mix": False},
    "compiled_fp8": {"compile": True, "fp8": True, "fuse_hot_mix": None},
    "compiled_fp8_deepcache": {"compile": True, "fp8": True, "fuse_hot_mix": None, "deepcache_interval": 3},
}
DEFAULT_PROFILES = ("production", "eager_unfused", "fused", "compiled_slots", "compiled_fused_deepcache",
                    "compiled_fp8")
#: Rough seconds a stage needs on an H100/H200 (load, compile, warm-up, N=6): with ``--deadline-s``, a
#: stage that would not finish in time is skipped (and reported) rather than cut off mid-way. A compiled
#: profile whose blocks another one compiled before (same dtype and layers) reuses dynamo's and
#: inductor's caches: compiled_fp8_deepcache after compiled_fp8 compiles nothing new.
STAGE_ESTIMATE_S = {"baseline": 50, "uncompiled": 45, "compiled": 90, "compiled_fp8_deepcache": 45, "blip": 30,
                    "arms_compiled": 200, "arms_uncompiled": 100,
                    "vgg": 40}


def production_settings(sdxl_dir: Path, lora_dir: Path, device: str, overrides: dict[str, Any]) -> Any:
    """GeneratorSettings as production builds them (:func:`deskgen.generator.settings_from_options`):
    serve_config.yaml's ``generator_options`` < ``overrides``; ``model_id``/``lora_dir``/``device`` point at
    the bench's models. A name that is not a GeneratorSettings field raises InvalidParameter."""
    from deskgen.generator import settings_from_options

    options = serve_config_generator_options()
    return settings_from_options({**options, **overrides, "model_id": str(sdxl_dir), "lora_dir": str(lora_dir),
                                  "device": device})


def serve_config_generator_options() -> dict[str, Any]:
    from deskgen.serve_config import app_args, load_serve_config

    return dict(app_args(load_serve_config()).get("generator_options") or {})


def attention_processors(pipe: Any) -> list[str]:
    unet = getattr(pipe.unet, "_orig_mod", pipe.unet)
    try:
        return sorted({type(p).__name__ for p in unet.attn_processors.values()})
    except AttributeError:
        return ["unknown"]


def is_compiled(module: Any) -> bool:
    """``torch.compile(module)`` wraps it (``_orig_mod``); ``module.compile()`` sets ``_compiled_call_impl``."""
    if module is None:
        return False
    return hasattr(module, "_orig_mod") or getattr(module, "_compiled_call_impl", None) is not None


def describe_pipeline(pipe: Any) -> dict[str, Any]:
    """What the loaded pipeline actually runs, read from its modules (whatever the settings call it)."""
    import torch

    unet = pipe.unet
    inner = getattr(unet, "_orig_mod", unet)
    conv = inner.conv_in.weight
    from deskgen.fp8 import Fp8Linear

    blocks = sum(is_compiled(m) for m in inner.modules() if m is not inner)
    return {
        "unet dtype": str(conv.dtype).removeprefix("torch."),
        "unet compiled": "whole UNet" if is_compiled(unet) else (f"{blocks} blocks" if blocks else "no"),
        "fp8 linears": sum(isinstance(m, Fp8Linear) for m in inner.modules()),
        "unet channels_last": bool(conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()),
        "attention processors": attention_processors(pipe),
        "vae dtype": str(pipe.vae.dtype).removeprefix("torch."),
        "vae config force_upcast": bool(getattr(pipe.vae.config, "force_upcast", False)),
        "text encoder dtype": str(pipe.text_encoder.dtype).removeprefix("torch."),
    }


def run_generator(
    profile: str, sdxl_dir: Path, lora_dir: Path, sc: Scenario, overrides: dict[str, Any], reference: Any = None
) -> SdxlResult:
    """DeskGenerator with production settings + the profile's flags: load (in compile mode this compiles
    at ``compile_warmup_size``), cache two mixes, warm up, time, then switch between the mixes."""
    from deskgen.generator import DeskGenerator, GenerationParams
    from deskgen.mixes import Mix

    settings = production_settings(sdxl_dir, lora_dir, sc.device, {**PROFILES[profile], **overrides})
    hot, other = Mix.from_weights(mix_weights(HOT_MIX)), Mix.from_weights(mix_weights(OTHER_MIX))
    params = GenerationParams(prompt=PROMPT, negative_prompt=NEGATIVE, seed=SEED, steps=sc.steps,
                              guidance=sc.guidance, width=sc.size, height=sc.size)

    graphs_before = dynamo_counters()["unique_graphs"]
    reset_peak(sc.device)
    start = time.perf_counter()
    gen = DeskGenerator.from_pretrained(settings)
    # Both mixes cached as the Serve deployment caches them (its multiplexed loader calls ensure_adapters).
    gen.ensure_adapters(hot.adapters)
    gen.ensure_adapters(other.adapters)
    sync(sc.device)
    load_s = time.perf_counter() - start
    graphs_at_load = dynamo_counters()["unique_graphs"] - graphs_before

    t = time_generations(lambda: gen.generate(params, hot).image, sc)
    graphs_warm = dynamo_counters()["unique_graphs"] - graphs_before

    # Switches between the two cached mixes, each followed by a generation (a recompile shows there).
    loads_before = DeskGenerator.base_loads
    switches: list[dict[str, Any]] = []
    ok, nans = t.ok, t.nans
    for target in (other, hot, other):
        graphs = dynamo_counters()["unique_graphs"]
        sync(sc.device)
        start = time.perf_counter()
        reported = gen.activate_mix(target)
        sync(sc.device)
        switch_s = time.perf_counter() - start
        with nan_watch() as found:
            start = time.perf_counter()
            ok &= image_ok(gen.generate(params, target).image)
            sync(sc.device)
            next_s = time.perf_counter() - start
        nans += len(found)
        switches.append({"to": target.id, "switch_s": switch_s, "activate_mix_reported_s": reported,
                         "next_generation_s": next_s, "new_graphs": dynamo_counters()["unique_graphs"] - graphs})

    return SdxlResult(
        label=f"{profile}: DeskGenerator " + (", ".join(f"{k}={v!r}" for k, v in PROFILES[profile].items()) or
                                              "(serve_config.yaml settings)"),
        load_s=load_s,
        first_s=t.first_s,
        times_s=t.times_s,
        peak_gen_gib=t.peak_gen_gib,
        peak_all_gib=t.peak_all_gib,
        images_ok=ok,
        nan_warnings=nans,
        deterministic=t.deterministic,
        psnr_vs_baseline=None if reference is None else psnr(t.image, reference),
        details={
            "profile": profile,
            "fp8": dataclasses.asdict(gen.fp8_report) if gen.fp8_report is not None else None,
            "deepcache_steps": ({"full": gen.deepcache.full_steps, "shallow": gen.deepcache.shallow_steps}
                                if gen.deepcache is not None else None),
            "settings": {k: v for k, v in dataclasses.asdict(settings).items() if k not in ("model_id", "lora_dir")},
            "effective": gen.describe(),
            "pipeline": describe_pipeline(gen.pipe),
            "warmup_s": gen.warmup_s,
            "graphs_compiled_at_load": graphs_at_load,
            "graphs_compiled_by_first_generation": graphs_warm - graphs_at_load,
            "compiled": graphs_warm > 0,
            "switches": switches,
            "base_reloads_during_switches": DeskGenerator.base_loads - loads_before,
            "recompiled_on_switch": any(sw["new_graphs"] > 0 for sw in switches),
        },
    )  # the generator goes with this frame; the caller frees the device memory


# --------------------------------------------------------------------------------------------------
# Every A/B arm on one generator (issue 24): the 7 named mixes in turn
# --------------------------------------------------------------------------------------------------

#: Goals for the arms (issue 24, part 4): each arm's p50, their spread, a switch, peak memory.
GOAL_ARM_S = 1.8
GOAL_ARM_SPREAD = 0.05
GOAL_ARM_PEAK_GB = 9.0


@dataclass
class ArmResult(TimedRun):
    """One named mix on a generator that serves every mix: switch to it, then N generations."""

    mix: str
    mix_id: str
    switch_s: float  # activate_mix from the previous arm, device synced
    first_s: float  # the first generation after the switch
    times_s: list[float]
    peak_gib: float | None  # switch + every generation of this arm
    fused: bool
    new_graphs: int
    deterministic: bool
    images_ok: bool


def run_arms(profile: str, sdxl_dir: Path, lora_dir: Path, sc: Scenario, overrides: dict[str, Any]) -> dict[str, Any]:
    """Load the generator of ``profile`` (compiling at load), cache the three adapters, then serve the 7
    named mixes one after the other as a replica does when the router sends it each arm: a switch, one
    first generation, ``sc.n`` timed ones; then the switches again, each back and forth, without
    generating (the switch alone)."""
    from deskgen.generator import DeskGenerator, GenerationParams
    from deskgen.mixes import NAMED_MIXES, Mix

    settings = production_settings(sdxl_dir, lora_dir, sc.device, {**PROFILES[profile], **overrides})
    params = GenerationParams(prompt=PROMPT, negative_prompt=NEGATIVE, seed=SEED, steps=sc.steps,
                              guidance=sc.guidance, width=sc.size, height=sc.size)
    reset_peak(sc.device)
    start = time.perf_counter()
    gen = DeskGenerator.from_pretrained(settings)
    sync(sc.device)
    adapters = sorted({name for weights in NAMED_MIXES.values() for name in weights})
    adapters_start = time.perf_counter()
    gen.ensure_adapters(adapters)
    sync(sc.device)
    load_s = time.perf_counter() - start
    adapter_load_s = (time.perf_counter() - adapters_start) / len(adapters)
    load_peak = peak_gib(sc.device)
    arms: list[ArmResult] = []
    for name in NAMED_MIXES:
        mix = Mix.from_weights(NAMED_MIXES[name])
        reset_peak(sc.device)
        graphs = dynamo_counters()["unique_graphs"]
        sync(sc.device)
        begin = time.perf_counter()
        gen.activate_mix(mix)
        sync(sc.device)
        switch_s = time.perf_counter() - begin
        def draw(mix: Mix = mix) -> Any:
            return gen.generate(params, mix).image

        timed = time_generations(draw, sc)
        arms.append(ArmResult(
            mix=name, mix_id=mix.id, switch_s=switch_s, first_s=timed.first_s, times_s=timed.times_s,
            peak_gib=max((v for v in (timed.peak_all_gib, timed.peak_gen_gib) if v is not None), default=None),
            fused=gen.fused_mix_id == mix.id, new_graphs=dynamo_counters()["unique_graphs"] - graphs,
            deterministic=timed.deterministic, images_ok=timed.ok and not timed.nans,
        ))  # fmt: skip
        del timed
    # The switch alone, both ways between consecutive arms (no generation in between).
    reset_peak(sc.device)
    switches, phases = switch_alone(gen, sc)
    switch_peak = peak_gib(sc.device)
    transient = gen.switcher.batched.transient_bytes
    pristine = gen.switcher.pristine
    restored = dict(gen.switcher.restored)
    residual_mib = gen.switcher.residual_bytes() / 2**20
    placements = switch_placements(gen, sc) if profile == PLACEMENTS_PROFILE and gen.adapters.kind == "fused" else []
    return {
        "profile": profile,
        "effective": gen.describe(),
        "strategy": gen.adapters.kind,
        "load_s": load_s,
        "adapter_load_s": adapter_load_s,
        "load_peak_gib": load_peak,
        "warmup_s": gen.warmup_s,
        "arms": [dataclasses.asdict(a) | {"p50_s": a.p50_s, "p95_s": a.p95_s} for a in arms],
        "switch_only_s": switches,
        "switch_only_peak_gib": switch_peak,
        "fuse_transient_mib": transient / 2**20,
        "pristine": {"where": pristine.where, "tensors": len(pristine), "gib": pristine.nbytes() / 1024**3},
        "switch_only_phases_s": phases,
        "restored": restored,
        "residual_mib": residual_mib,
        "placements": placements,
        "host_pool_mib": gen.switcher.batched.pool.nbytes / 2**20,
        "factors_mib": [b / 2**20 for b in gen.switcher.batched.factor_bytes()],
        "allocated_gib": allocated_gib(sc.device),
        "images_differ": len({a.mix_id for a in arms}) == len(arms),
        "base_reloads": DeskGenerator.base_loads,
    }


def switch_alone(gen: Any, sc: Scenario) -> tuple[list[float], list[dict[str, float]]]:
    """Switch both ways between consecutive named mixes, three switches a pair (b, a, b), nothing generated
    in between: (seconds per switch, the switcher's unfuse/fuse host seconds per switch)."""
    from deskgen.mixes import NAMED_MIXES, Mix

    names = list(NAMED_MIXES)
    switches: list[float] = []
    phases: list[dict[str, float]] = []
    for a, b in zip(names, names[1:] + names[:1], strict=True):
        for target in (b, a, b):
            mix = Mix.from_weights(NAMED_MIXES[target])
            sync(sc.device)
            begin = time.perf_counter()
            gen.activate_mix(mix)
            sync(sc.device)
            switches.append(time.perf_counter() - begin)
            phases.append(dict(gen.switcher.last_s))
    return switches, phases


#: The arms profile whose loaded generator also measures the switch under every placement below.
PLACEMENTS_PROFILE = "production"
#: (fuse_backup, lora_factors) placements the switch is measured under on one loaded generator: what
#: each trades is GPU memory (a copy on the GPU: +2.2 GiB; factors on the GPU: +0.33 GiB for the three
#: rank-32 adapters) against bytes over the bus per switch (residuals, factors, a copy).
PLACEMENTS = (("residual", "host"), ("residual", "device"), ("cpu", "host"), ("cpu", "device"), ("device", "device"))


def placed_factors(found: Any, where: str, device: str) -> Any:
    """A copy of an adapter's factors (:class:`~deskgen.generator.switching.AdapterFactors`) placed as
    ``lora_factors: where`` places them (``host``: stacked in host memory; ``device``: on ``device``), the
    layers and base weights the same objects. The original is left as it is."""
    from deskgen.generator.switching import AdapterFactors, FactorGroup

    groups = {}
    for key, group in found.groups.items():
        same = {"params": group.params, "alphas": group.alphas, "divisors": group.divisors}
        if group.a_host is not None and where == "host":  # already stacked in host memory: shared, read only
            groups[key] = FactorGroup(group.shape, group.rank, a_host=group.a_host, b_host=group.b_host, **same)
            continue
        if group.a_host is not None:
            a, b = list(group.a_host.to(device).unbind(0)), list(group.b_host.to(device).unbind(0))
        else:
            a, b = list(group.a), list(group.b)
        copy = FactorGroup(group.shape, group.rank, a=a, b=b, **same)
        if where == "host":
            copy.offload()
        groups[key] = copy
    return AdapterFactors(groups, found.single)


def switch_placements(gen: Any, sc: Scenario) -> list[dict[str, Any]]:
    """The switch alone (:func:`switch_alone`) on ``gen``'s loaded pipeline under each of
    :data:`PLACEMENTS`: a switcher of that placement replaces the generator's for the measurement (the
    weights at their base values before and after; the generator's own switcher put back). Per placement:
    switch p50/max, unfuse/fuse host p50, peak memory above what was allocated before, bytes restored
    by residual and from the copy."""
    import torch

    from deskgen.generator.switching import MixSwitcher
    from deskgen.mixes import Mix

    own = gen.switcher
    gen.activate_mix(Mix(()))  # the exact base weights: what a new switcher starts from
    params = own.batched.params([(peft, 1.0) for peft in own.batched.factors])
    reference = [p.detach().clone() for p in params]  # every weight a mix rewrites, at its base value
    out: list[dict[str, Any]] = []
    try:
        for backup, where in PLACEMENTS:
            switcher = MixSwitcher(gen.pipe, gen.adapters, backup=backup, method="batched", factors_on=where)
            switcher.batched.codec = own.batched.codec  # compiled on a GPU, as production's
            for peft, found in own.batched.factors.items():
                switcher.batched.add(peft, placed_factors(found, where, sc.device))
            gen.switcher = switcher
            gen.activate_mix(Mix.from_weights({"dalle": 0.6, "ott": 0.4, "3d": 0.4}))  # pins and copies made once
            gen.activate_mix(Mix(()))
            sync(sc.device)
            before = allocated_gib(sc.device)
            reset_peak(sc.device)
            switches, phases = switch_alone(gen, sc)
            peak = peak_gib(sc.device)
            factors = switcher.batched.factor_bytes()
            out.append({
                "fuse_backup": backup, "lora_factors": where, "switch_s": switches,
                "unfuse_p50_s": p50([x["unfuse"] for x in phases]), "fuse_p50_s": p50([x["fuse"] for x in phases]),
                "peak_above_gib": None if peak is None or before is None else peak - before,
                "restored": dict(switcher.restored), "residual_mib": switcher.residual_bytes() / 2**20,
                "factors_mib": [b / 2**20 for b in factors], "copy_gib": switcher.pristine.nbytes() / 1024**3,
                "copy_where": switcher.pristine.where,
            })  # fmt: skip
            gen.activate_mix(Mix(()))
            out[-1]["base_exact"] = all(torch.equal(p, r) for p, r in zip(params, reference, strict=True))
            del switcher
            gen.switcher = own
            gc.collect()
            if sc.cuda:
                torch.cuda.empty_cache()
    finally:
        if gen.switcher is not own:  # a placement failed half-way: its mix unfused before its switcher goes
            try:
                gen.switcher.unfuse()
            finally:
                gen.switcher = own
                gen.activate_mix(Mix(()))  # the generator's record of its mix: the base, as its switcher holds
    del reference
    return out


def placements_table(r: dict[str, Any]) -> Table:
    t = Table(
        f"The switch alone under each placement, on `{r['profile']}`'s loaded generator (after its arms)",
        ["fuse_backup", "lora_factors", "switch p50 ms", "max ms", "unfuse p50 ms", "fuse p50 ms",
         "GPU memory over the switches GiB", "by residual / from the copy", "residual MiB", "factors MiB GPU / host",
         "exact copy GiB", "base exact after"],
    )  # fmt: skip
    for v in r["placements"]:
        sw = sorted(v["switch_s"])
        t.add(f"`{v['fuse_backup']}`", f"`{v['lora_factors']}`", f"{p50(sw) * 1000:.0f}", f"{sw[-1] * 1000:.0f}",
              f"{v['unfuse_p50_s'] * 1000:.0f}", f"{v['fuse_p50_s'] * 1000:.0f}", gib(v["peak_above_gib"]),
              f"{v['restored']['residual']} / {v['restored']['copy']}", f"{v['residual_mib']:.0f}",
              f"{v['factors_mib'][0]:.0f} / {v['factors_mib'][1]:.0f}",
              f"{v['copy_gib']:.2f} on `{v['copy_where']}`", "yes" if v["base_exact"] else "**NO**")  # fmt: skip
    t.notes += [
        f"{len(r['placements'][0]['switch_s'])} switches each, as in the switch alone above; before each run one "
        "`mix` fuse and back (pinned buffers and copies made then, not timed). GPU memory over the switches: "
        "the peak while switching minus what was allocated before (the base weights, factors held on the GPU, a "
        "copy on the GPU). Base exact after: every weight a mix rewrites equals its value before the placement's "
        "switches, bit for bit.",
        "The first row is production's placement on a GPU; the generator's own switcher is put back afterwards.",
    ]
    return t


def arms_tables(results: list[dict[str, Any]], sc: Scenario, gpu_name: str) -> list[Table]:
    model = "tiny SDXL" if sc.tiny else "SDXL full size (2.57 B UNet, random weights)"
    tables = []
    for r in results:
        arms = r["arms"]
        t = Table(
            f"Every named mix on one generator (`{r['profile']}`, strategy `{r['strategy']}`) — {model}, "
            f"{sc.size}x{sc.size}, {sc.steps} steps, CFG {sc.guidance}, N={sc.n} per arm",
            ["arm", "mix", "switch ms", "first generation s", "s/image p50", "p95", "peak VRAM GiB", "fused",
             "new graphs", "same seed, same bytes", "images ok"],
        )
        for a in arms:
            t.add(a["mix"], f"`{a['mix_id']}`", f"{a['switch_s'] * 1000:.0f}", s(a["first_s"]), s(a["p50_s"]),
                  s(a["p95_s"]), gib(a["peak_gib"]), "yes" if a["fused"] else "**no**", a["new_graphs"],
                  "yes" if a["deterministic"] else "**NO**", "yes" if a["images_ok"] else "**NO**")
        p50s = [a["p50_s"] for a in arms]
        spread = (max(p50s) - min(p50s)) / min(p50s)
        sw = sorted(r["switch_only_s"])
        t.notes += [
            f"Load (from_pretrained + the three adapters + the compile warm-up, if compiling): {r['load_s']:.1f} s "
            f"(warm-up {r['warmup_s'] or 0:.1f} s; the adapters {r['adapter_load_s']:.2f} s per file, bench.router_sim's "
            f"`--adapter-load-s`), peak {gib(r['load_peak_gib'])} GiB.",
            f"Arms' p50 from {min(p50s):.3f} to {max(p50s):.3f} s: spread {spread * 100:.1f} %.",
            f"Switch alone ({len(sw)} switches between consecutive arms, both ways, nothing generated in between): "
            f"p50 {p50(sw) * 1000:.0f} ms, max {sw[-1] * 1000:.0f} ms; peak VRAM over them "
            f"{gib(r['switch_only_peak_gib'])} GiB.",
            f"Exact base copies: {r['pristine']['tensors']} tensors, {r['pristine']['gib']:.2f} GiB on "
            f"`{r['pristine']['where']}`; the fuse's largest transient {r['fuse_transient_mib']:.0f} MiB; "
            f"allocated after the run {gib(r['allocated_gib'])} GiB.",
            f"Base tensors put back since load: {r['restored'].get('residual', 0)} by residual, "
            f"{r['restored'].get('copy', 0)} from the copy; the last mix's residual {r['residual_mib']:.0f} MiB "
            f"(pinned host buffers {r['host_pool_mib']:.0f} MiB); the adapters' factors {r['factors_mib'][0]:.0f} MiB "
            f"on the GPU, {r['factors_mib'][1]:.0f} MiB in host memory. Switch alone, host time p50: unfuse "
            f"{p50([x['unfuse'] for x in r['switch_only_phases_s']]) * 1000:.0f} ms, fuse "
            f"{p50([x['fuse'] for x in r['switch_only_phases_s']]) * 1000:.0f} ms.",
            f"Effective flags: {r['effective']}.",
        ]
        tables.append(t)
        goals = Table(f"Goals for the arms (`{r['profile']}`)", ["goal", "measured", "verdict"])
        on_goal_gpu = any(name in gpu_name for name in GOAL_GPUS)
        worst = max(p50s)
        goals.add(f"every arm ≤ {GOAL_ARM_S} s/image p50 (H200)", f"worst {worst:.2f} s",
                  verdict(worst <= GOAL_ARM_S if on_goal_gpu else None))
        goals.add(f"arms within {GOAL_ARM_SPREAD * 100:.0f} % of each other", f"{spread * 100:.1f} %",
                  verdict(spread <= GOAL_ARM_SPREAD))
        goals.add(f"switch ≤ {GOAL_SWITCH_S * 1000:.0f} ms", f"max {sw[-1] * 1000:.0f} ms (p50 {p50(sw) * 1000:.0f})",
                  verdict(sw[-1] <= GOAL_SWITCH_S))
        peaks = [a["peak_gib"] for a in arms if a["peak_gib"] is not None]
        goal_gib = GOAL_ARM_PEAK_GB * 1e9 / 1024**3
        goals.add(f"peak VRAM ≤ {GOAL_ARM_PEAK_GB:g} GB = {goal_gib:.2f} GiB", f"max {max(peaks):.2f} GiB" if peaks else "n/a",
                  verdict(max(peaks) <= goal_gib if peaks else None))
        goals.add("every arm fused, no recompile", f"{sum(a['fused'] for a in arms)}/{len(arms)} fused, "
                  f"{sum(a['new_graphs'] for a in arms)} new graphs",
                  verdict(all(a["fused"] for a in arms) and not any(a["new_graphs"] for a in arms)))
        tables.append(goals)
        if r.get("placements"):
            tables.append(placements_table(r))
    return tables


# --------------------------------------------------------------------------------------------------
# BLIP-base and the VGG16 gate
# --------------------------------------------------------------------------------------------------


def run_blip(blip_dir: Path, device: str, n: int) -> dict[str, Any]:
    from deskgen.captioner import Captioner

    photo = desk_photo()
    # The Captioner's own default (fp16 on a GPU, fp32 on the CPU), named so the table can say it.
    dtype = "float16" if is_cuda(device) else "float32"
    reset_peak(device)
    start = time.perf_counter()
    captioner = Captioner.from_pretrained(str(blip_dir), device=device, dtype=dtype)
    load_s = time.perf_counter() - start
    weights_gib = allocated_gib(device)
    prefixes = len(captioner.prefixes)

    def timed(k: int) -> list[float]:
        captioner.caption(photo)  # warm
        out = []
        for _ in range(k):
            start = time.perf_counter()
            captioner.caption(photo)
            sync(device)
            out.append(time.perf_counter() - start)
        return out

    full = timed(n)
    captioner.set_prefixes([])
    single = timed(n)
    result = {
        "dtype": dtype,
        "load_s": load_s,
        "prefixes": prefixes,
        "set_s": full,
        "single_s": single,
        "weights_gib": weights_gib,
        "peak_gib": peak_gib(device),
        "max_new_tokens": captioner.max_new_tokens,
    }
    return result


def run_gate_subprocess(keras_file: Path, n: int, *, cpu_only: bool) -> dict[str, Any]:
    """The gate in a child process: TensorFlow must not share the process (and the GPU allocator) with torch."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "gate.json"
        command = [sys.executable, "-m", "bench.gpu", "--gate-worker", str(keras_file), "--gate-json", str(out),
                   "--n", str(n)]
        env = dict(os.environ)
        if cpu_only:
            env["CUDA_VISIBLE_DEVICES"] = ""
        if not tensorflow_available():
            # A GPU image without TensorFlow (this workplace's): the same VGG16 gate on Keras' torch backend.
            command.append("--gate-torch")
            env["KERAS_BACKEND"] = "torch"
        done = subprocess.run(command, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=300)
        if done.returncode != 0 or not out.exists():
            raise RuntimeError(f"the gate worker failed ({done.returncode}):\n{done.stderr[-3000:]}")
        return json.loads(out.read_text())  # type: ignore[no-any-return]


def tensorflow_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorflow") is not None


def gate_worker_torch(out_json: Path, n: int) -> None:
    """The VGG16 gate (same layers as :func:`deskgen.classifier.build_gate_model`, random weights) on Keras'
    torch backend, for a GPU machine without TensorFlow. Production runs it on TensorFlow."""
    import keras
    import numpy as np
    import torch

    from deskgen.classifier import HEAD_DROPOUT, HEAD_UNITS

    if keras.backend.backend() != "torch":
        raise RuntimeError("--gate-torch needs KERAS_BACKEND=torch")
    start = time.perf_counter()
    base = keras.applications.VGG16(include_top=False, weights=None, input_shape=(224, 224, 3))
    inputs = keras.Input(shape=(224, 224, 3), name="image")
    x = keras.layers.GlobalAveragePooling2D()(base(inputs))
    x = keras.layers.Dropout(HEAD_DROPOUT)(keras.layers.Dense(HEAD_UNITS, activation="relu")(x))
    model = keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid")(x))
    load_s = time.perf_counter() - start
    photo = np.asarray(desk_photo().convert("RGB").resize((224, 224)), dtype=np.float32)[None]
    x1 = np.asarray(keras.applications.vgg16.preprocess_input(photo), dtype=np.float32)
    cuda = torch.cuda.is_available()

    def timed(batch: Any, k: int) -> list[float]:
        for _ in range(3):
            np.asarray(model.predict_on_batch(batch))
        out = []
        for _ in range(k):
            start = time.perf_counter()
            np.asarray(model.predict_on_batch(batch))  # the result on the host: the GPU work is done
            out.append(time.perf_counter() - start)
        return out

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    result = {
        "device": ("GPU: " + torch.cuda.get_device_name(0) if cuda else "CPU") + " (Keras 3 torch backend, fp32; "
                  "this GPU image has no TensorFlow)",
        "load_s": load_s,
        "predict_on_batch_s": timed(x1, n),
        "batch8_s": timed(np.repeat(x1, 8, axis=0), n),
        "batch32_s": timed(np.repeat(x1, 32, axis=0), n),
    }
    if cuda:
        result["peak_gib"] = torch.cuda.max_memory_allocated() / 1024**3
    out_json.write_text(json.dumps(result))


def gate_worker(keras_file: Path, out_json: Path, n: int) -> None:
    """Run by :func:`run_gate_subprocess`: VGG16 gate timings on TensorFlow's first GPU (or the CPU)."""
    import numpy as np

    from deskgen.classifier import DeskClassifier, import_keras

    import_keras()
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    for gpu in gpus:
        tf.config.experimental.set_memory_growth(gpu, True)  # do not take the whole GPU
    photo = desk_photo()
    start = time.perf_counter()
    gate = DeskClassifier.load(keras_file)
    load_s = time.perf_counter() - start
    x = gate.preprocess([photo])
    x8 = np.repeat(x, 8, axis=0)

    def timed(fn: Callable[[], Any], k: int) -> list[float]:
        for _ in range(3):
            fn()
        out = []
        for _ in range(k):
            start = time.perf_counter()
            np.asarray(fn())  # the result on the host: the GPU work is done
            out.append(time.perf_counter() - start)
        return out

    result = {
        "device": "GPU: " + ", ".join(g.name for g in gpus) if gpus else "CPU (TensorFlow sees no GPU)",
        "load_s": load_s,
        "predict_s": timed(lambda: gate.model.predict(x, verbose=0), n),
        "predict_on_batch_s": timed(lambda: gate.model.predict_on_batch(x), n),
        "score_s": timed(lambda: gate.score_batch([photo]), n),
        "batch8_s": timed(lambda: gate.model.predict_on_batch(x8), n),
    }
    if gpus:
        try:
            result["peak_gib"] = tf.config.experimental.get_memory_info("GPU:0")["peak"] / 1024**3
        except (ValueError, RuntimeError):
            pass
    out_json.write_text(json.dumps(result))


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("met" if ok else "**NOT met**")


def sdxl_tables(sc: Scenario, base: SdxlResult | None, runs: list[SdxlResult], gpu_name: str) -> list[Table]:
    model = "tiny SDXL" if sc.tiny else "SDXL full size (2.57 B UNet, random weights)"
    what = f"{model} + mix `{HOT_MIX}`, {sc.size}x{sc.size}, {sc.steps} steps, CFG {sc.guidance}"
    main = Table(
        f"{what} — s/image warm, N={sc.n}",
        ["configuration", "s/image p50", "p95", "min", "vs baseline", "PSNR vs baseline dB", "same seed, same bytes",
         "first generation s", "load s", "peak VRAM GiB (generation)", "peak VRAM GiB (load + first)", "images ok"],
    )
    for r in [*([base] if base else []), *runs]:
        speedup = f"{base.p50_s / r.p50_s:.2f}x" if base else ""
        quality = "" if r.psnr_vs_baseline is None else ("(reference)" if math.isinf(r.psnr_vs_baseline)
                                                          else f"{r.psnr_vs_baseline:.1f}")
        main.add(r.label, s(r.p50_s), s(r.p95_s), s(min(r.times_s)), speedup, quality,
                 "yes" if r.deterministic else "**NO**", s(r.first_s, 1), s(r.load_s, 1),
                 gib(r.peak_gen_gib), gib(r.peak_all_gib),
                 "yes" if r.images_ok and not r.nan_warnings else f"NO ({r.nan_warnings} NaN casts)")
    main.notes += [
        "load s: from_pretrained + both mixes' adapters (+ fusing the hot mix; + the compile warm-up at "
        "`compile_warmup_size` when compiling). first generation: the first call at this size after load.",
        "PSNR: the first image of each configuration against the baseline's (same seed, prompt and mix; random "
        "weights, so the images are noise and small numeric differences grow over the 30 steps: compare the "
        "rows with each other, not with PSNRs of trained models). same seed, same bytes: every timed image "
        "equals the first one bit for bit. p95 of N is the nearest-rank value.",
        f"serve_config.yaml `generator_options` in this run: {serve_config_generator_options() or '{}'}.",
    ]
    tables = [main]

    if runs:
        fields = list(runs[0].details["effective"])
        flags = Table("Effective speed flags (`DeskGenerator.describe()`) and what each pipeline runs",
                      ["flag", *[r.details["profile"] for r in runs]])
        for key in fields:
            flags.add(f"`{key}`", *[f"`{r.details['effective'].get(key)!r}`" for r in runs])
        for key in runs[0].details["pipeline"]:
            cells = [r.details["pipeline"][key] for r in runs]
            flags.add(key, *[", ".join(c) if isinstance(c, list) else str(c) for c in cells])
        flags.add("dynamo graphs compiled at load / by the first generation",
                  *[f"{r.details['graphs_compiled_at_load']} / {r.details['graphs_compiled_by_first_generation']}"
                    for r in runs])
        tables.append(flags)

        sw = Table(f"Mix switches ({HOT_MIX} ↔ {OTHER_MIX}, both cached), each followed by a generation",
                   ["configuration", "switch to", "switch s", "next generation s", "new dynamo graphs"])
        for r in runs:
            for row in r.details["switches"]:
                sw.add(r.details["profile"], f"`{row['to']}`", f"{row['switch_s']:.4f}", s(row["next_generation_s"]),
                       row["new_graphs"])
        sw.notes.append("Base pipeline loads during the switches: "
                        + ", ".join(f"{r.details['profile']} {r.details['base_reloads_during_switches']}" for r in runs)
                        + ". A fused hot mix is unfused (exact base weights restored) when another mix is "
                        "activated and fused again when it comes back: that is part of its switch time.")
        tables.append(sw)

        goals = Table("Goals", ["goal", *[r.details["profile"] for r in runs]])
        on_goal_gpu = any(name in gpu_name for name in GOAL_GPUS)
        goals.add(f"≤ {GOAL_S_PER_IMAGE} s/image (p50) on an H200",
                  *[f"{r.p50_s:.2f} s: {verdict(r.p50_s <= GOAL_S_PER_IMAGE if on_goal_gpu else None)}" for r in runs])
        if base is not None:
            goals.add(f"≥ {GOAL_SPEEDUP:g}x faster than the baseline",
                      *[f"{base.p50_s / r.p50_s:.2f}x: {verdict(base.p50_s / r.p50_s >= GOAL_SPEEDUP)}" for r in runs])
        goal_gib = GOAL_PEAK_VRAM_GB * 1e9 / 1024**3
        goals.add(f"peak VRAM ≤ {GOAL_PEAK_VRAM_GB:g} GB = {goal_gib:.2f} GiB (generation)",
                  *[f"{gib(r.peak_gen_gib)} GiB: {verdict(None if r.peak_gen_gib is None else r.peak_gen_gib <= goal_gib)}"
                    for r in runs])
        goals.add("deterministic per seed", *[verdict(r.deterministic) for r in runs])
        cells = []
        for r in runs:
            worst = max(row["switch_s"] for row in r.details["switches"])
            reloads = r.details["base_reloads_during_switches"]
            cells.append(f"max {worst * 1000:.0f} ms, {reloads} reloads: {verdict(worst <= GOAL_SWITCH_S and reloads == 0)}")
        goals.add(f"mix switch ≤ {GOAL_SWITCH_S * 1000:.0f} ms, no base reload", *cells)
        goals.add("no recompilation on a switch",
                  *[("" if r.details["compiled"] else "not compiled; ")
                    + f"{sum(row['new_graphs'] for row in r.details['switches'])} new graphs: "
                    + verdict(not r.details["recompiled_on_switch"]) for r in runs])
        if not on_goal_gpu:
            goals.notes.append(f"The s/image goal is for an H200; this run is on {gpu_name or 'the CPU'}.")
        tables.append(goals)
    return tables


def blip_table(r: dict[str, Any], device: str, model: str) -> Table:
    t = Table(f"{model} on {device}, {r['dtype']}, greedy, max_new_tokens={r['max_new_tokens']}",
              ["measurement", "N", "p50 s", "max s"])
    t.add(f"caption set: unconditional + {r['prefixes']} prefixes", len(r["set_s"]), s(p50(r["set_s"]), 3), s(max(r["set_s"]), 3))
    t.add("one caption (unconditional)", len(r["single_s"]), s(p50(r["single_s"]), 3), s(max(r["single_s"]), 3))
    t.add("load", 1, s(r["load_s"], 1), "")
    t.notes.append(f"VRAM: weights {gib(r['weights_gib'])} GiB, peak {gib(r['peak_gib'])} GiB (allocated by torch; "
                   "nvidia-smi adds the CUDA context, ~0.5 GB). Random weights decode to max_new_tokens.")
    return t


def gate_table(r: dict[str, Any], model: str) -> Table:
    where = r["device"] if "Keras" in r["device"] else f"TensorFlow on {r['device']}"
    t = Table(f"{model} — {where}", ["measurement", "N", "p50 ms", "p99 ms"])
    for key, label in (("predict_s", "`model.predict`, 1 image"), ("predict_on_batch_s", "`predict_on_batch`, 1 image"),
                       ("score_s", "`DeskClassifier.score_batch` (preprocess + predict_on_batch), 1 photo"),
                       ("batch8_s", "`predict_on_batch`, batch of 8"), ("batch32_s", "`predict_on_batch`, batch of 32")):
        if key in r:
            t.add(label, len(r[key]), f"{p50(r[key]) * 1000:.1f}", f"{percentile(r[key], 99) * 1000:.1f}")
    if "peak_gib" in r:
        t.notes.append(f"Peak GPU memory {r['peak_gib']:.2f} GiB (allocated by the backend).")
    return t


def reference_table() -> Table:
    t = Table("Reference figures (the system we replace, and published diffusers numbers)", ["what", "time", "VRAM"])
    for row in REFERENCE_ROWS:
        t.add(*row)
    return t


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``["compile=true", "dtype=float16"]`` -> ``{"compile": True, "dtype": "float16"}`` (JSON values, else strings)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise InvalidParameter(f"`--set` takes FIELD=VALUE but got {pair!r}.", field="set")
        try:
            out[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            out[key.strip()] = raw
    return out


def locate_models(args: argparse.Namespace, parts: tuple[str, ...]) -> tuple[Scenario, dict[str, Path]]:
    """The scenario and model paths: tiny models on the CPU for ``--tiny``, else full size on the GPU
    (building what is missing, directly on the GPU)."""
    import torch

    if args.tiny:
        tiny = resolve(args.models) if args.models else models_dir()
        if not (tiny / ".complete").is_file():
            raise ModelFilesMissing("tiny models", str(tiny), hint="run `make models`")
        paths = {"sdxl": tiny / "sdxl", "loras": tiny / "loras", "blip": tiny / "blip",
                 "vgg": tiny / "classifier" / "desk_gate.keras"}
        return Scenario(device="cpu", size=64, steps=2, n=args.n or 2, baseline_dtype="float32", tiny=True), paths
    if not torch.cuda.is_available():
        raise RuntimeError("bench.gpu needs a CUDA GPU; run `python -m bench.gpu --tiny` to check the code path on the CPU.")
    from bench import fullsize

    out = fullsize.check_out_dir(args.fullsize)
    wanted = {"sdxl": ("sdxl", "loras"), "blip": ("blip",), "vgg": ("vgg",)}
    build_parts = [p for part in parts for p in wanted[part]]
    torch_parts = [p for p in build_parts if p != "vgg"]
    if torch_parts:
        fullsize.build(out, torch_parts, device="cuda")
    if "vgg" in build_parts and not fullsize.is_built(out, "vgg") and tensorflow_available():
        # Built in a child process without CUDA: TensorFlow here would reserve the whole GPU.
        subprocess.run([sys.executable, "-m", "bench.fullsize", "--out", str(out), "--only", "vgg"], check=True,
                       cwd=PROJECT_ROOT, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    paths = {"sdxl": fullsize.part_dir(out, "sdxl"), "loras": fullsize.part_dir(out, "loras"),
             "blip": fullsize.part_dir(out, "blip"), "vgg": fullsize.vgg_path(out)}
    return Scenario(device="cuda", size=args.size, steps=args.steps, n=args.n or 3), paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fullsize", type=Path, default=DEFAULT_FULLSIZE_DIR,
                        help=f"full-size models folder, built on the GPU if missing (default {DEFAULT_FULLSIZE_DIR})")
    parser.add_argument("--only", default=None, help=f"comma-separated parts of {','.join(PARTS)} (default: all)")
    parser.add_argument("--n", type=int, default=None, help="timed generations after the warm-up (default 3; --tiny 2)")
    parser.add_argument("--size", type=int, default=1024, help="image side in pixels (default 1024)")
    parser.add_argument("--steps", type=int, default=30, help="denoising steps (default 30)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a GeneratorSettings field of the production run (repeatable)")
    parser.add_argument("--profiles", default=",".join(DEFAULT_PROFILES),
                        help=f"generator configurations to measure, of {','.join(PROFILES)} (default: %(default)s)")
    parser.add_argument("--skip-baseline", action="store_true", help="measure only the generator configurations")
    parser.add_argument("--arms", default="",
                        help="profiles that serve all 7 named mixes in turn (every A/B arm; run first, after the "
                             "baseline), e.g. production (default: none)")
    parser.add_argument("--order", default=None,
                        help="comma-separated stages to run first, in this order (profiles, blip, vgg); the others follow")
    parser.add_argument("--deadline-s", type=int, default=None,
                        help="skip (and report) stages that would end more than this many seconds after the start")
    parser.add_argument("--tiny", action="store_true",
                        help="run the same code path on the tiny models on the CPU at 64 px, 2 steps (implies --no-write)")
    parser.add_argument("--models", default=None, help="tiny models folder for --tiny (default: $DESKGEN_MODELS or models/tiny)")
    parser.add_argument("--no-write", action="store_true", help="do not append to BENCHMARKS.md")
    parser.add_argument("--gate-worker", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--gate-json", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--gate-torch", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.n is not None and args.n < 1:
        raise InvalidParameter(f"`--n` must be >= 1 but is {args.n}.", field="n")

    if args.gate_worker is not None:
        if args.gate_torch:
            gate_worker_torch(args.gate_json, args.n or 20)
        else:
            gate_worker(args.gate_worker, args.gate_json, args.n or 20)
        return

    # Everything is local: never let a hub lookup wait on a network the GPU machine does not have.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    parts = parse_choices(args.only, PARTS, option="--only")
    profiles = parse_choices(args.profiles, list(PROFILES), option="--profiles")
    arm_profiles = parse_choices(args.arms, list(PROFILES), option="--arms") if args.arms else ()
    overrides = parse_overrides(args.set)
    order_first = parse_choices(args.order, [*PROFILES, "blip", "vgg"], option="--order") if args.order else ()
    for profile in (*profiles, *arm_profiles):  # a bad --set fails now, not after minutes of building
        production_settings(Path("/unused"), Path("/unused"), "cpu", {**PROFILES[profile], **overrides})
    started = time.perf_counter()
    sc, paths = locate_models(args, parts)
    if sc.tiny:
        import torch

        # Compile (if asked) at the tiny size, not at production's 1024 px; one thread, as a 1-CPU replica
        # (and steadier on a shared machine).
        overrides.setdefault("compile_warmup_size", sc.size)
        torch.set_num_threads(1)
    build_s = time.perf_counter() - started
    host = machine()
    gpu_name = host.gpus[0] if host.gpus and sc.cuda else ""
    log.info("models ready in %.1f s; scenario %s", build_s, sc)

    payload: dict[str, Any] = {"scenario": dataclasses.asdict(sc), "build_s": build_s, "machine": dataclasses.asdict(host)}
    base: SdxlResult | None = None
    runs: list[SdxlResult] = []
    arm_runs: list[dict[str, Any]] = []
    failures: list[str] = []
    extra: list[Table] = []
    preface = [f"Models: {paths['sdxl'].parent} (ready in {build_s:.0f} s"
               + ("; tiny models)." if sc.tiny else "; full-size parts missing there are built on the GPU first).")]
    if sc.tiny:
        preface.insert(0, "**--tiny: a code-path check on the tiny models on the CPU, not a benchmark.**")
    title = "GPU suite (--tiny check)" if sc.tiny else "GPU suite"

    def report() -> str:
        """The section so far; also written to $OUT after every stage, so a run cut short still reports."""
        tables = arms_tables(arm_runs, sc, gpu_name) if arm_runs else []
        tables += sdxl_tables(sc, base, runs, gpu_name) if "sdxl" in parts and (base or runs) else []
        tables += [*extra, reference_table()]
        if failures or skipped:
            failed = Table("Failures and skipped stages", ["stage", "error"])
            for line in failures:
                failed.add(*line.split(": ", 1))
            for name in skipped:
                failed.add(name, f"skipped: would have ended past `--deadline-s {args.deadline_s}`")
            tables.insert(0, failed)
        section = render_section(title, tables, command=command_line(), wall_s=time.perf_counter() - started,
                                 host=host, preface=preface)
        payload.update(tables=[t.as_dict() for t in tables], wall_s=time.perf_counter() - started, failures=failures)
        payload["sdxl"] = {"baseline": dataclasses.asdict(base) if base else None,
                           "generator": [dataclasses.asdict(r) for r in runs], "arms": arm_runs}
        write_out_dir("bench_gpu", section, payload)
        return section

    skipped: list[str] = []

    def stage(name: str, fn: Callable[[], Any], kind: str | None = None) -> Any:
        # One failing stage (a compile error, an OOM) must not lose the others' numbers: it is reported
        # in the Failures table and the run goes on. With --deadline-s, a stage that would end past the
        # deadline is skipped and reported.
        elapsed = time.perf_counter() - started
        need = STAGE_ESTIMATE_S.get(name) or STAGE_ESTIMATE_S[kind or name]
        if args.deadline_s is not None and elapsed + need > args.deadline_s:
            log.warning("skipping %s: %.0f s elapsed + ~%d s needed > --deadline-s %d", name, elapsed, need, args.deadline_s)
            skipped.append(name)
            return None
        log.info("stage %s starts at %.0f s", name, elapsed)
        try:
            return fn()
        except Exception as exc:
            log.exception("stage %s failed", name)
            failures.append(f"{name}: {type(exc).__name__}: {str(exc)[:300]}")
            return None
        finally:
            free_device(sc.device)
            log.info("%s done at %.0f s", name, time.perf_counter() - started)
            report()

    # Default order: cheap stages first and compiled profiles last, so a long compile loses nothing else;
    # --order names another (the profiles, blip and vgg; the baseline always runs first).
    profiles_first = [p for p in profiles if not PROFILES[p].get("compile")]
    profiles_last = [p for p in profiles if PROFILES[p].get("compile")]
    order = [*profiles_first, "blip", "vgg", *profiles_last]
    order = [*order_first, *(name for name in order if name not in order_first)]
    reference: Any = None

    def measure(profile: str) -> None:
        kind = "compiled" if PROFILES[profile].get("compile") else "uncompiled"
        run = functools.partial(run_generator, profile, paths["sdxl"], paths["loras"], sc, overrides, reference)
        result = stage(profile, run, kind)
        if result is not None:
            runs.append(result)

    if "sdxl" in parts and not args.skip_baseline:
        done = stage("baseline", lambda: run_baseline(paths["sdxl"], paths["loras"], sc))
        if done is not None:
            base, reference = done
    for profile in arm_profiles if "sdxl" in parts else ():
        kind = "arms_compiled" if PROFILES[profile].get("compile") is not False and sc.cuda else "arms_uncompiled"
        arms = stage(f"arms:{profile}", functools.partial(run_arms, profile, paths["sdxl"], paths["loras"], sc, overrides),
                     kind)  # fmt: skip
        if arms is not None:
            arm_runs.append(arms)
    for name in order:
        if name in profiles and "sdxl" in parts:
            measure(name)
        elif name == "blip" and "blip" in parts:
            blip = stage("blip", lambda: run_blip(paths["blip"], sc.device, n=3 if sc.tiny else 5))
            if blip is not None:
                payload["blip"] = blip
                extra.append(blip_table(blip, gpu_name or sc.device, "tiny BLIP" if sc.tiny else "BLIP-base (224 M params)"))
        elif name == "vgg" and "vgg" in parts:
            gate = stage("vgg", lambda: run_gate_subprocess(paths["vgg"], n=5 if sc.tiny else 20, cpu_only=not sc.cuda))
            if gate is not None:
                payload["vgg"] = gate
                extra.append(gate_table(gate, "tiny gate" if sc.tiny else "VGG16 gate (14.8 M params, 224x224)"))

    section = report()
    print(section)
    if os.environ.get("OUT"):
        log.info("wrote %s/bench_gpu.md and bench_gpu.json", os.environ["OUT"])
    if not (args.no_write or sc.tiny):
        append_report(section)
        log.info("appended to %s", PROJECT_ROOT / "BENCHMARKS.md")
    if failures:
        raise SystemExit(f"{len(failures)} stage(s) failed: " + "; ".join(failures))


if __name__ == "__main__":
    main()
