"""Memory under mix churn: one Generator replica, many mixes through its 4-mix cache, for an hour or more.

    python -m bench.soak                          # 60 min, the fused switching path, 2 clients, 22 mixes, 8 adapters
    python -m bench.soak --adapters 3             # the tiny folder's 3 adapters only (12 mixes): no adapter unload
    python -m bench.soak --shapes same            # the 5 added adapters with their origins' ranks and layers
    python -m bench.soak --minutes 90 --path slots
    python -m bench.soak --minutes 20 --no-write  # a quick look
    python -m bench.soak --malloc-arena-max 8     # glibc's arenas in the replica (serve_config.yaml: 2)
    python -m bench.soak --loads 150              # in-process: memory kept per LoRA load, by reader
    python -m bench.soak --in-process --minutes 20  # the replica's logic without Ray, same churn

The app of serve_config.yaml on the tiny models (64x64, 1 step, no product location) with one Generator
replica; ``--clients`` closed-loop clients send /v1/text2img requests cycling through the 7 named mixes
and ad-hoc ones, more distinct mixes than the replica's cache holds, so mixes are loaded, activated and
evicted all the time (far more churn per minute than production). ``--adapters N`` (default 8) serves them
from a temporary LoRA folder holding the tiny folder's three adapters and ``N - 3`` more, made from them
(:func:`added_adapters`: weights scaled; with ``--shapes varied``, the default, of other ranks and on fewer
or more layers, as a folder of adapters trained apart would be), each in mixes of its own (:func:`soak_mixes`): more
adapters than a replica keeps loaded (``generator_cache.keep_adapters``), so adapters are read and unloaded all the
time too. With ``--adapters 3`` the replica keeps all three and unloads none. The Generator replica's resident set
(``VmRSS`` of its process, read from /proc) is sampled every ``--sample-s`` seconds; after ``--warmup-min``
minutes the least-squares slope of RSS over time is reported in MiB/hour and in % of the post-warm-up RSS
per hour (goal: at most 1 %/hour), with the requests, loads and evictions it took.

``--path fused`` (default) runs the generator as configured; ``--path slots`` runs it with LoRA hot-swap
slots (``hotswap: true``), without compiling.

``--in-process`` runs the same churn without Ray: the Generator replica's own logic
(:class:`deployments.generator.GeneratorReplica`: the pipeline thread, loads, evictions, generations) with
the multiplexed cache's LRU (``DEFAULT_CACHE.mixes``) emulated, in this process, sampling this process's RSS. Flat here
and growing under Serve means the growth is Serve's replica machinery, not deskgen's pipeline.

``--loads N`` measures one suspect alone, in this process (no Serve): a LoRA file loaded into the tiny
pipeline and unloaded again, N times after a warm-up, read by diffusers from the file
(``load_lora_weights``: safetensors' memory-mapped ``load_file``) and by deskgen
(:func:`deskgen.generator.adapters.load_adapter`: the file's bytes); the anonymous memory
(``/proc/self/smaps_rollup``) each load leaves behind.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from bench.common import Table, append_report, command_line, machine, render_section
from bench.cpu import ServeApp, bench_serve_config, free_port
from deskgen.paths import models_dir

log = logging.getLogger("bench.soak")

MIXES = ["ott_3d", "dalle_ott", "mix", "dalle_only", "ott_only", "3d_only", "dalle_3d",
         "ott:0.3", "dalle:0.4+3d:0.2", "3d:0.9", "ott:0.5+dalle:0.5", "3d:0.2+ott:0.9"]  # fmt: skip
#: The tiny LoRA folder's adapters, which the named mixes use.
TINY_ADAPTERS = ("dalle", "ott", "3d")
#: ``--shapes``: the added adapters' shapes (:func:`added_adapters`).
SHAPES = ("varied", "same")


@dataclass(frozen=True)
class AddedAdapter:
    """How the soak makes one of the adapters it adds to the tiny three, from a tiny adapter's file."""

    name: str
    #: The tiny adapter whose file it starts from (its layout, kohya or diffusers, too).
    origin: str
    #: Its up (B) factors are multiplied by this, so its weights are its own.
    scale: float
    #: Its rank is twice the origin's (:func:`deskgen.tools.tiny_sdxl.double_rank`: the added rows and columns
    #: are seeded noise); else the origin's.
    rank_doubled: bool
    #: It adapts only the UNet's ``to_q`` and ``to_v`` (the origin's text-encoder, ``to_k`` and ``to_out``
    #: layers left out); else every layer the origin adapts.
    qv_only: bool
    #: It also adapts each UNet transformer block's feed-forward output (``ff.net.2``), which no tiny adapter
    #: adapts (:func:`deskgen.tools.tiny_sdxl.feed_forward_pair`; kohya origins only).
    feed_forward: bool = False


def extra_adapters(adapters: int) -> list[str]:
    """The names of the adapters the soak adds to the tiny three, to have ``adapters`` in all."""
    if adapters < len(TINY_ADAPTERS):
        raise ValueError(f"--adapters must be at least {len(TINY_ADAPTERS)} (the tiny folder's), got {adapters}")
    return [f"soak{k}" for k in range(len(TINY_ADAPTERS) + 1, adapters + 1)]


def added_adapters(adapters: int, shapes: str = "varied") -> list[AddedAdapter]:
    """The :func:`extra_adapters`, made from the tiny three in turn, the k-th's up factors scaled by
    ``1 + 0.1 (k + 1)``. With ``shapes="varied"`` (the default) every second one has twice its origin's rank,
    those not made from dalle adapt only the UNet's to_q and to_v, and those made from dalle at twice its rank
    also adapt the feed-forward layers: the 5 of ``--adapters 8`` are dalle's layers at rank 4, ott's
    (diffusers layout) at rank 8 on to_q/to_v, 3d's at rank 4 on to_q/to_v, dalle's and the feed-forward
    outputs at rank 8, ott's at rank 4 on to_q/to_v. With ``"same"`` each has its origin's shapes."""
    if shapes not in SHAPES:
        raise ValueError(f"--shapes must be one of {SHAPES}, got {shapes!r}")
    varied = shapes == "varied"
    made = []
    for k, name in enumerate(extra_adapters(adapters)):
        origin = TINY_ADAPTERS[k % len(TINY_ADAPTERS)]
        doubled = varied and k % 2 == 1
        made.append(AddedAdapter(name, origin, scale=1.0 + 0.1 * (k + 1), rank_doubled=doubled,
                                 qv_only=varied and origin != "dalle", feed_forward=doubled and origin == "dalle"))  # fmt: skip
    return made


def _on_unet_q_or_v(key: str) -> bool:
    """Whether a LoRA file's tensor ``key`` belongs to a UNet to_q or to_v layer (kohya or diffusers names)."""
    if key.startswith("lora_unet_"):
        return key.split(".", 1)[0].endswith(("_to_q", "_to_v"))
    return key.startswith("unet.") and (".to_q.lora_" in key or ".to_v.lora_" in key)


def _added(adapter: AddedAdapter, tensors: dict[str, Any], metadata: dict[str, str]) -> tuple[dict[str, Any], dict[str, str]]:
    """The tensors (numpy) and metadata of ``adapter``'s file, from its origin's."""
    import numpy as np

    from deskgen import kohya
    from deskgen.tools.tiny_sdxl import double_rank, feed_forward_pair

    rng = np.random.default_rng(int(adapter.name.removeprefix("soak")))
    kept = {key: value for key, value in tensors.items() if not adapter.qv_only or _on_unet_q_or_v(key)}
    out: dict[str, Any] = {}
    for key in sorted(kept):
        for down_suffix, up_suffix in ((".lora_down.weight", ".lora_up.weight"), (".lora_A.weight", ".lora_B.weight")):
            if key.endswith(down_suffix):
                base = key.removesuffix(down_suffix)
                down, up = kept[key], kept[base + up_suffix]
                if adapter.rank_doubled:
                    down, up = double_rank(down, up, rng)
                out[key], out[base + up_suffix] = down, (up * adapter.scale).astype(up.dtype)
                if adapter.feed_forward and base.startswith(kohya.UNET_PREFIX) and base.endswith("_attn1_to_q"):
                    ff, ff_down, ff_up = feed_forward_pair(base, down.shape[0], kept[key], kept[base + up_suffix], rng)
                    out |= {ff + kohya.DOWN: ff_down, ff + kohya.UP: ff_up, ff + kohya.ALPHA: kept[base + kohya.ALPHA]}
    if adapter.feed_forward and not any(key.endswith("ff_net_2" + kohya.DOWN) for key in out):
        raise ValueError(f"{adapter.name}: feed-forward layers are made for a kohya origin's UNet, not {adapter.origin}'s")
    out |= {key: value for key, value in kept.items() if key not in out}  # kohya's alphas
    metadata, factor = dict(metadata), 2 if adapter.rank_doubled else 1
    if "ss_network_dim" in metadata:  # kohya: its rank (each layer's alpha is a tensor of its own)
        metadata["ss_network_dim"] = str(int(metadata["ss_network_dim"]) * factor)
    if "lora_adapter_metadata" in metadata:  # diffusers: each component's LoraConfig
        config = json.loads(metadata["lora_adapter_metadata"])
        for field in [f for f in config if f.endswith(".r")]:
            config[field] *= factor
        if adapter.qv_only:
            config = {f: v for f, v in config.items() if f.startswith("unet.")}
            config["unet.target_modules"] = ["to_q", "to_v"]
        metadata["lora_adapter_metadata"] = json.dumps(config, indent=2, sort_keys=True)
    return out, metadata


def soak_loras(adapters: int, folder: Path, shapes: str = "varied") -> Path:
    """A LoRA folder in ``folder`` with the tiny folder's adapters and the :func:`added_adapters`, each written
    from its origin's file in the origin's layout. Returns the folder."""
    from safetensors import safe_open
    from safetensors.numpy import save_file

    source = models_dir() / "loras"
    folder.mkdir(parents=True, exist_ok=True)
    for name in TINY_ADAPTERS:
        shutil.copyfile(source / f"{name}.safetensors", folder / f"{name}.safetensors")
    for adapter in added_adapters(adapters, shapes):
        with safe_open(str(source / f"{adapter.origin}.safetensors"), "np") as reader:
            tensors, metadata = _added(adapter, {key: reader.get_tensor(key) for key in reader.keys()},
                                       reader.metadata() or {})  # fmt: skip
        save_file(tensors, str(folder / f"{adapter.name}.safetensors"), metadata=metadata)
    return folder


def soak_mixes(adapters: int) -> list[str]:
    """:data:`MIXES`, then two ad-hoc mixes per added adapter: alone, and with its origin (so a mix of an added
    adapter also evicts or reads one of the three)."""
    mixes = list(MIXES)
    for adapter in added_adapters(adapters):
        mixes += [f"{adapter.name}:0.6", f"{adapter.name}:0.5+{adapter.origin}:0.3"]
    return mixes


def soak_config(path: str, malloc_arena_max: int | None = None, lora_dir: Path | None = None) -> dict[str, Any]:
    tiny = models_dir()
    config = bench_serve_config(free_port(), tiny, tiny / "classifier" / "desk_gate.keras")
    if lora_dir is not None:
        config["applications"][0]["args"]["lora_dir"] = str(lora_dir)
    for deployment in config["applications"][0]["deployments"]:
        if deployment["name"] == "Ingress":
            deployment["user_config"].update(default_steps=1, default_width=64, default_height=64, request_timeout_s=300)
        if deployment["name"] == "Generator" and malloc_arena_max is not None:
            options = deployment.setdefault("ray_actor_options", {})
            env = options.setdefault("runtime_env", {}).setdefault("env_vars", {})
            env["MALLOC_ARENA_MAX"] = str(malloc_arena_max)
    if path == "slots":
        args = config["applications"][0]["args"]
        args["generator_options"] = {**copy.deepcopy(args.get("generator_options") or {}), "hotswap": True}
    return config


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (t, y): y units per t unit."""
    n = len(points)
    mean_t = sum(t for t, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    var = sum((t - mean_t) ** 2 for t, _ in points)
    return sum((t - mean_t) * (y - mean_y) for t, y in points) / var if var else 0.0


async def churn(url: str, clients: int, until: float, counts: dict[str, int], mixes: list[str]) -> None:
    async def client(offset: int) -> None:
        i = offset
        async with httpx.AsyncClient(base_url=url, timeout=300) as http:
            while time.monotonic() < until:
                mix = mixes[i % len(mixes)]
                i += clients
                response = await http.post("/v1/text2img", json={"prompt": "a tidy desk", "mix": mix, "seed": i, "locate": False})
                counts["ok" if response.status_code == 200 else "failed"] += 1

    await asyncio.gather(*(client(k) for k in range(clients)))


async def sample(pid: int, until: float, every_s: float, started: float, points: list[tuple[float, float]]) -> None:
    while time.monotonic() < until:
        points.append(((time.monotonic() - started) / 60, rss_mib(pid)))
        await asyncio.sleep(every_s)


def anonymous_mib() -> float:
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith("Anonymous:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no Anonymous line in /proc/self/smaps_rollup")


def kept_per_load(loads: int) -> Table:
    """KiB of anonymous memory each load + unload of a tiny LoRA leaves behind, per reader."""
    import gc

    import torch
    from diffusers import StableDiffusionXLPipeline

    from deskgen.generator.adapters import load_adapter
    from deskgen.loras import quiet_adapter_load

    torch.set_num_threads(1)
    tiny = models_dir()
    path = tiny / "loras" / "dalle.safetensors"
    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny / "sdxl"))

    def diffusers_reader() -> None:
        with quiet_adapter_load():
            pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name="probe")

    def deskgen_reader() -> None:
        load_adapter(pipe, path, "probe")

    table = Table(f"Memory kept per LoRA load + unload — tiny `dalle` ({path.stat().st_size // 1024} KiB), "
                  f"{loads} loads after 30 warm-up loads, one process",
                  ["reader", "anonymous memory before (MiB)", "after (MiB)", "kept per load (KiB)"])  # fmt: skip
    for label, load in (("diffusers `load_lora_weights` (safetensors `load_file`, mmap)", diffusers_reader),
                        ("deskgen `load_adapter` (the file's bytes, `safetensors.torch.load`)", deskgen_reader)):
        def cycle(load: Any = load) -> None:
            load()
            with quiet_adapter_load():
                pipe.unload_lora_weights()

        for _ in range(30):
            cycle()
        gc.collect()
        before = anonymous_mib()
        for _ in range(loads):
            cycle()
        gc.collect()
        after = anonymous_mib()
        table.add(label, f"{before:.1f}", f"{after:.1f}", f"{(after - before) * 1024 / loads:.1f}")
    return table


async def churn_in_process(until: float, sample_s: float, started: float, points: list[tuple[float, float]],
                           path: str, lora_dir: Path, adapters: int) -> dict[str, int]:  # fmt: skip
    """The soak's churn on a GeneratorReplica in this process: :func:`soak_mixes` in turn, an LRU of
    ``DEFAULT_CACHE.mixes``."""
    import collections
    import dataclasses

    from deployments.generator import DEFAULT_CACHE, GeneratorReplica
    from deskgen.contracts import GenerationRequest
    from deskgen.generator import DeskGenerator, GenerationParams
    from deskgen.generator.settings import GeneratorSettings
    from deskgen.loras import LoraRegistry
    from deskgen.mixes import MixCatalog

    tiny = models_dir()
    extra = {"hotswap": True} if path == "slots" else {}
    generator = DeskGenerator.from_pretrained(
        GeneratorSettings(model_id=str(tiny / "sdxl"), lora_dir=str(lora_dir), device="cpu", **extra)
    )
    replica = GeneratorReplica(generator)
    catalog = MixCatalog(LoraRegistry(lora_dir).usable())
    ids = [catalog.resolve(spec).id for spec in soak_mixes(adapters)]
    lru: collections.OrderedDict[str, Any] = collections.OrderedDict()
    params = GenerationParams(prompt="a tidy desk", steps=1, width=64, height=64)
    counts = {"ok": 0, "loads": 0, "adapter_loads": 0}
    next_sample = time.monotonic()
    i = 0
    while time.monotonic() < until:
        mix_id = ids[i % len(ids)]
        if mix_id in lru:
            lru.move_to_end(mix_id)
        else:
            if len(lru) >= DEFAULT_CACHE.mixes:
                _, old = lru.popitem(last=False)
                replica.release(old)
            lru[mix_id] = await replica.load_mix(mix_id)
            counts["loads"] += 1
        loaded = lru[mix_id]

        async def get(loaded: Any = loaded) -> Any:
            return loaded

        await replica.generate(GenerationRequest(params=dataclasses.replace(params, seed=i)), get)
        counts["ok"] += 1
        i += 1
        if time.monotonic() >= next_sample:
            points.append(((time.monotonic() - started) / 60, rss_mib(os.getpid())))
            next_sample += sample_s
    counts["adapter_loads"] = int(replica.load_total("adapter_loads"))
    return counts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=60.0)
    parser.add_argument("--warmup-min", type=float, default=None, help="minutes left out of the slope (default: a sixth)")
    parser.add_argument("--sample-s", type=float, default=15.0)
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--path", choices=("fused", "slots"), default="fused")
    parser.add_argument("--adapters", type=int, default=8,
                        help="adapters the mixes use (default 8; 3 = the tiny folder's alone, all kept loaded)")
    parser.add_argument("--shapes", choices=SHAPES, default="varied",
                        help="the added adapters' ranks and layers: varied (default) or their origins' (same)")
    parser.add_argument("--malloc-arena-max", type=int, default=None,
                        help="glibc's MALLOC_ARENA_MAX in the Generator replica's environment (default: serve_config.yaml's)")
    parser.add_argument("--no-write", action="store_true", help="print the table, do not append it to BENCHMARKS.md")
    parser.add_argument("--in-process", action="store_true", help="the replica's logic without Ray (see above)")
    parser.add_argument("--loads", type=int, default=None,
                        help="measure the memory kept per LoRA load in this process instead (no Serve)")
    args = parser.parse_args(argv)
    if args.loads is not None:
        wall = time.perf_counter()
        section = render_section("Memory kept per LoRA load", [kept_per_load(args.loads)], command=command_line(),
                                 wall_s=time.perf_counter() - wall, host=machine())  # fmt: skip
        print(section)
        if not args.no_write:
            append_report(section)
        return
    warmup = args.warmup_min if args.warmup_min is not None else args.minutes / 6
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    wall = time.perf_counter()
    extra_adapters(args.adapters)  # refuses too few before anything starts
    scratch = Path(tempfile.mkdtemp(prefix="deskgen-soak-loras-"))
    try:
        lora_dir = soak_loras(args.adapters, scratch / "loras", args.shapes)
        if args.in_process:
            run_in_process(args, lora_dir, warmup, wall)
        else:
            run_serve(args, lora_dir, warmup, wall)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def run_in_process(args: argparse.Namespace, lora_dir: Path, warmup: float, wall: float) -> None:
    import torch

    torch.set_num_threads(1)
    points: list[tuple[float, float]] = []
    started = time.monotonic()
    counts = asyncio.run(churn_in_process(started + 60 * args.minutes, args.sample_s, started, points, args.path,
                                          lora_dir, args.adapters))  # fmt: skip
    from deployments.generator import DEFAULT_CACHE

    report(args, points, warmup, {"ok": counts["ok"], "failed": 0}, counts["loads"], counts["adapter_loads"],
           DEFAULT_CACHE.model_dump(), wall, "in one process, no Ray")  # fmt: skip


def run_serve(args: argparse.Namespace, lora_dir: Path, warmup: float, wall: float) -> None:
    with ServeApp(soak_config(args.path, args.malloc_arena_max, lora_dir)) as app:
        generator = app.handle("Generator")
        before = generator.info.remote().result()
        pid = int(before["pid"])
        if args.malloc_arena_max is not None:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            assert f"MALLOC_ARENA_MAX={args.malloc_arena_max}".encode() in environ, "the replica lacks MALLOC_ARENA_MAX"
        points: list[tuple[float, float]] = []
        counts = {"ok": 0, "failed": 0}
        started = time.monotonic()
        until = started + 60 * args.minutes

        async def both() -> None:
            await asyncio.gather(churn(app.url, args.clients, until, counts, soak_mixes(args.adapters)),
                                 sample(pid, until, args.sample_s, started, points))  # fmt: skip

        asyncio.run(both())
        after = generator.info.remote().result()
    assert after["pid"] == pid, "the Generator replica was replaced during the soak"
    how = f"{args.clients} clients" + (f", MALLOC_ARENA_MAX={args.malloc_arena_max}" if args.malloc_arena_max else "")
    report(args, points, warmup, counts, after["mix_loads"] - before["mix_loads"],
           after["adapter_loads"] - before["adapter_loads"], after["cache"], wall, how)  # fmt: skip


def report(args: argparse.Namespace, points: list[tuple[float, float]], warmup: float, counts: dict[str, int],
           loads: int, adapter_loads: int, cache: dict[str, int], wall: float, how: str) -> None:  # fmt: skip
    late = [(t, y) for t, y in points if t >= warmup]
    per_hour = slope(late) * 60
    base = late[0][1] if late else float("nan")
    table = Table(f"Generator replica RSS under mix churn — path {args.path}, {args.minutes:.0f} min, {how}, "
                  f"{len(soak_mixes(args.adapters))} mixes of {args.adapters} adapters ({args.shapes} shapes) through a "
                  f"{cache['mixes']}-mix cache keeping up to {cache['keep_adapters']} adapters, tiny SDXL 64x64, 1 step",
                  ["requests (non-200)", "mix loads", "adapter files read", "RSS at start (MiB)", f"RSS after warm-up ({warmup:.0f} min)",
                   "RSS at end", "slope after warm-up (MiB/h)", "slope (% of post-warm-up RSS per hour)"])  # fmt: skip
    table.add(f"{counts['ok'] + counts['failed']} ({counts['failed']})", loads, adapter_loads,
              f"{points[0][1]:.0f}", f"{base:.0f}", f"{points[-1][1]:.0f}", f"{per_hour:+.1f}",
              f"{100 * per_hour / base:+.2f} %")  # fmt: skip
    table.notes.append(f"RSS sampled every {args.sample_s:.0f} s ({len(points)} samples; {len(late)} after warm-up): "
                       + ", ".join(f"{t:.0f} min {y:.0f}" for t, y in points[:: max(1, len(points) // 12)]))
    section = render_section("Memory under mix churn (soak)", [table], command=command_line(),
                             wall_s=time.perf_counter() - wall, host=machine(),
                             preface=[f"Machine load (1-min) at end {os.getloadavg()[0]:.1f}; the goal is at most 1 % per hour."])  # fmt: skip
    print(section)
    if not args.no_write:
        append_report(section)


if __name__ == "__main__":
    main()
