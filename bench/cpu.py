"""The CPU benchmark suite: what the service costs around the models, measured side by side in one run.

    python -m bench.cpu [--models DIR] [--fullsize DIR] [--only serve,mix,gate,blip] [--no-write]
    make bench-cpu

1. **Serving overhead** (tiny models): ``POST /v1/text2img`` over HTTP through the real Serve graph
   (serve_config.yaml deployed the way tests/serve/conftest.py does it, on a free 127.0.0.1 port) against
   the same stage called in-process (``DeskGenerator.generate`` + ``png()``, same params, same model),
   interleaved call by call so both see the same machine load; then throughput at 1, 4 and 16 clients.
2. **Mix switching** on one ``DeskGenerator``: generations alternating two cached mixes vs repeating one;
   ``activate_mix`` between them vs reloading the pipeline (``DeskGenerator.from_pretrained``).
3. **The gate**: the FULL-SIZE VGG16 gate (``bench.fullsize`` vgg) — one image with ``model.predict`` and
   ``predict_on_batch``, and ``/v1/classify`` through the Classifier deployment's batching under 8
   concurrent clients (the graph above is deployed with ``classifier_model`` pointed at that file).
4. **BLIP-base** (full size, fp32): one caption set (unconditional + the 3 prefixes) and one caption.

Small sample counts (the table says N) and p50s: this runs on a 2-core machine shared with other
work, in about 5 minutes. The tables are appended to BENCHMARKS.md. No timing is asserted anywhere.

Threads: torch runs with 1 thread in this process, as in a Serve replica with ``num_cpus: 1`` (Ray
sets ``OMP_NUM_THREADS`` to the actor's CPUs; the report shows the value read from the generator
replica). TensorFlow keeps its default pools in both places (``tf_threads`` is unset in the config).

One file of sections (~600 lines), each a function that returns its table: the sections share the app
they deploy and the run they are compared in.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import io
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

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
    percentile,
    render_section,
    s,
    time_calls,
)
from deskgen.errors import InvalidParameter, ModelFilesMissing
from deskgen.paths import PROJECT_ROOT, models_dir, resolve

if TYPE_CHECKING:
    from PIL import Image

log = logging.getLogger("bench.cpu")

SECTIONS = ("serve", "mix", "gate", "blip")
APP = "deskgen"
PROMPT = "a minimalist desk setup with a monitor, a keyboard and a plant, warm light"
#: The tiny generation every serving measurement uses (the point is the overhead around it).
STEPS, GUIDANCE, SIDE = 2, 5.0, 64
MIX_A, MIX_B = "ott_3d", "dalle_ott"
CONCURRENCY = (1, 4, 16)
GATE_CLIENTS = 8
READY_TIMEOUT_S = 300


# --------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------


def ensure_fullsize(fullsize: Path, parts: list[str]) -> None:
    """Build the missing full-size parts with ``python -m bench.fullsize`` (a child process, so this one
    does not hold the builder's memory)."""
    from bench.fullsize import is_built

    missing = [p for p in parts if not is_built(fullsize, p)]
    if not missing:
        return
    command = [sys.executable, "-m", "bench.fullsize", "--out", str(fullsize), "--only", ",".join(missing)]
    log.info("building full-size %s: %s", missing, " ".join(command))
    subprocess.run(command, check=True, cwd=PROJECT_ROOT)


# --------------------------------------------------------------------------------------------------
# 1. Serving overhead and throughput (+ 3b. the gate through Serve)
# --------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def bench_serve_config(port: int, tiny: Path, classifier_model: Path) -> dict[str, Any]:
    """serve_config.yaml with the overrides of tests/serve/conftest.py: loopback port, tiny models, one
    replica per stage (no autoscaling: replicas appearing mid-run would distort the numbers), and the
    FULL-SIZE VGG16 gate as ``classifier_model``. Everything else (queues, batching) is production."""
    from deskgen.serve_config import app_args, load_serve_config, with_models, without_jobs

    store = Path(tempfile.mkdtemp(prefix="deskgen-bench-experiments-")) / "experiments.db"
    images = {**app_args(load_serve_config())["image_store"], "dir": str(store.parent / "images")}
    config = with_models(without_jobs(load_serve_config()), tiny, classifier_model=str(classifier_model),
                         experiments_db=f"sqlite:///{store}", image_store=images)  # fmt: skip
    config["http_options"] = {"host": "127.0.0.1", "port": port}
    (app,) = config["applications"]
    for deployment in app["deployments"]:
        deployment.pop("autoscaling_config", None)
        deployment["num_replicas"] = 1
        if deployment["name"] == "Ingress":
            deployment["user_config"].update(request_timeout_s=300)
    return config


class ServeApp:
    """A local Ray + the deskgen app from ``config``; a context manager that always shuts both down."""

    def __init__(self, config: dict[str, Any], *, num_cpus: int = 5, num_gpus: int = 2, metrics_port: int | None = None) -> None:
        self.config = config
        self.num_cpus, self.num_gpus = num_cpus, num_gpus
        #: Where Ray's metrics agent serves the app's metrics (reported every second), if given.
        self.metrics_port = metrics_port
        self.url = f"http://127.0.0.1:{config['http_options']['port']}"
        self.deploy_s = 0.0

    def __enter__(self) -> ServeApp:
        import ray

        # Logical resources are declared here (as the serve tests do); an override from `make` would fight them.
        os.environ.pop("RAY_OVERRIDE_RESOURCES", None)
        start = time.perf_counter()
        # Logical CPUs: the four stages take 3.5; one more leaves room for the 1-CPU thread probe.
        metrics: dict[str, Any] = {}
        if self.metrics_port is not None:
            metrics = {"_metrics_export_port": self.metrics_port, "_system_config": {"metrics_report_interval_ms": 1000}}
        ray.init(num_cpus=self.num_cpus, num_gpus=self.num_gpus, resources={"cpu_node": 1000}, include_dashboard=False,
                 namespace="bench", log_to_driver=False, **metrics)  # fmt: skip
        try:
            self._deploy()
        except BaseException:
            self.__exit__()
            raise
        self.deploy_s = time.perf_counter() - start
        return self

    def _deploy(self) -> None:
        import httpx
        from ray import serve
        from ray.serve._private.api import serve_start
        from ray.serve.schema import ServeDeploySchema

        schema = ServeDeploySchema.model_validate(self.config)
        # Not _blocking=True: its 60 s limit is too short for four replicas on a busy 2-core machine.
        serve_start(http_options=self.config["http_options"]).deploy_apps(schema)
        with httpx.Client(base_url=self.url, timeout=30) as client:
            deadline = time.monotonic() + READY_TIMEOUT_S
            while True:
                app = serve.status().applications.get(APP)
                if app is not None and app.status == "DEPLOY_FAILED":
                    raise RuntimeError(f"deploying {APP} failed: {app.message}")
                try:
                    if client.get("/readyz").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the deskgen app was not ready after {READY_TIMEOUT_S} s")
                time.sleep(1.0)

    def __exit__(self, *exc: object) -> None:
        import ray
        from ray import serve

        try:
            serve.shutdown()
        finally:
            ray.shutdown()

    def handle(self, deployment: str) -> Any:
        from ray import serve

        return serve.get_deployment_handle(deployment, APP)


def ray_worker_threads() -> tuple[str | None, int]:
    """``OMP_NUM_THREADS`` and torch's thread count in a ``num_cpus=1`` Ray worker of this cluster: what
    Ray gives every 1-CPU actor, the Generator replica included."""
    import ray

    @ray.remote(num_cpus=1)
    def probe() -> tuple[str | None, int]:
        import torch

        return os.environ.get("OMP_NUM_THREADS"), torch.get_num_threads()

    try:
        return ray.get(probe.remote(), timeout=120)  # type: ignore[no-any-return]
    except ray.exceptions.GetTimeoutError:
        return None, 0


def text2img_body(mix: str, seed: int) -> dict[str, Any]:
    return {"prompt": PROMPT, "mix": mix, "seed": seed, "steps": STEPS, "guidance": GUIDANCE, "width": SIDE,
            "height": SIDE}


def tiny_params(seed: int) -> Any:
    """The in-process twin of :func:`text2img_body`."""
    from deskgen.generator import GenerationParams

    return GenerationParams(prompt=PROMPT, seed=seed, steps=STEPS, guidance=GUIDANCE, width=SIDE, height=SIDE)


def post_text2img(client: Any, mix: str, seed: int) -> tuple[float, int, bytes, dict[str, float]]:
    """(client-side seconds, status, body, stage seconds): ``total`` (the ingress handler) and ``generate``
    (its Generator handle call) from the ingress's Server-Timing header."""
    start = time.perf_counter()
    response = client.post("/v1/text2img", json=text2img_body(mix, seed))
    seconds = time.perf_counter() - start
    stages: dict[str, float] = {}
    if response.status_code == 200:
        for item in response.headers.get("server-timing", "").split(","):
            name, _, duration = item.strip().partition(";dur=")
            if duration:
                stages[name] = float(duration) / 1000
    return seconds, response.status_code, response.content, stages


def same_pixels(png_a: bytes, png_b: bytes) -> bool:
    import numpy as np
    from PIL import Image

    with Image.open(io.BytesIO(png_a)) as a, Image.open(io.BytesIO(png_b)) as b:
        return bool(np.array_equal(np.asarray(a), np.asarray(b)))


def ping_generator(handle: Any) -> float:
    """Seconds for one ``Generator.ping`` (returns "ok", touches no model) through a deployment handle from the
    driver: one Serve hop (the handle's router and the replica's actor call), without the proxy or the ingress."""
    start = time.perf_counter()
    answer = handle.ping.remote().result(timeout_s=60)
    seconds = time.perf_counter() - start
    if answer != "ok":
        raise RuntimeError(f"Generator.ping answered {answer!r}")
    return seconds


def bench_overhead(app: ServeApp, tiny: Path, n: int) -> tuple[Table, dict[str, Any]]:
    """Interleaved: one HTTP request, then the identical in-process call, ``n`` times."""
    import httpx

    from deskgen.generator import DeskGenerator, GeneratorSettings
    from deskgen.mixes import NAMED_MIXES, Mix

    gen = DeskGenerator.from_pretrained(GeneratorSettings(model_id=str(tiny / "sdxl"), lora_dir=str(tiny / "loras")))
    mix = Mix.from_weights(NAMED_MIXES[MIX_A])
    seed = 7
    params = tiny_params(seed)

    def in_process() -> bytes:
        return gen.generate(params, mix).png()

    http_s, local_s, failures = [], [], 0
    floor_s: list[float] = []
    ping_s: list[float] = []
    json_s: list[float] = []
    replica_model_s: list[float] = []
    generator = app.handle("Generator")
    with httpx.Client(base_url=app.url, timeout=120) as client:
        # Warm both: the replica loads the mix on its first request, the local generator likewise.
        for _ in range(3):
            _, status, served_png, _ = post_text2img(client, MIX_A, seed)
            local_png = in_process()
            ping_generator(generator)
        identical = status == 200 and same_pixels(served_png, local_png)
        stages: dict[str, list[float]] = {}
        for _ in range(n):
            seconds, status, _, parts = post_text2img(client, MIX_A, seed)
            failures += status != 200
            http_s.append(seconds)
            for name, value in parts.items():
                stages.setdefault(name, []).append(value)
            start = time.perf_counter()
            in_process()
            local_s.append(time.perf_counter() - start)
            # Serve's floor here: a route that calls no stage (proxy + ingress only) ...
            start = time.perf_counter()
            client.get("/v1/limits")
            floor_s.append(time.perf_counter() - start)
            # ... one Serve hop alone: the driver's handle to the Generator, no proxy, no ingress, no model ...
            ping_s.append(ping_generator(generator))
            # ... and the same generation as JSON, whose metadata has the replica's own model time (products not
            # located: the locator is a model stage of its own).
            start = time.perf_counter()
            answer = client.post("/v1/text2img", json=text2img_body(MIX_A, seed) | {"locate": False},
                                 headers={"Accept": "application/json"})  # fmt: skip
            json_s.append(time.perf_counter() - start)
            inner = answer.json()["metadata"]["timings"]
            replica_model_s.append(inner["activate_s"] + inner["generate_s"])

    table = Table(
        f"Serving overhead — tiny SDXL, {SIDE}x{SIDE}, {STEPS} steps, CFG {GUIDANCE}, "
        f"mix {MIX_A}, N={n} interleaved pairs",
        ["path", "p50 (ms)", "p99 (ms)"],
    )
    table.add("in-process `DeskGenerator.generate` + `png()`", ms(p50(local_s)), ms(percentile(local_s, 99)))
    table.add("HTTP `POST /v1/text2img` through Ingress → Generator", ms(p50(http_s)), ms(percentile(http_s, 99)))
    table.add("**overhead** (HTTP − in-process)", f"**{ms(p50(http_s) - p50(local_s))}**",
              f"**{ms(percentile(http_s, 99) - percentile(local_s, 99))}**")
    for name, label in (
        ("generate", "… of which the Generator handle call, as the ingress timed it (`Server-Timing: generate`)"),
        ("total", "… of which the ingress handler, request parsed to response (`Server-Timing: total`)"),
    ):
        if stages.get(name):
            table.add(label, ms(p50(stages[name])), ms(percentile(stages[name], 99)))
    table.add("Serve's floor: `GET /v1/limits` (proxy + ingress, no stage called)", ms(p50(floor_s)),
              ms(percentile(floor_s, 99)))
    table.add("a Generator `ping` through a handle from the driver (one Serve hop, no model)", ms(p50(ping_s)),
              ms(percentile(ping_s, 99)))
    outside = [j - m for j, m in zip(json_s, replica_model_s, strict=True)]
    table.add("same generation as JSON (`locate: false`): HTTP − the replica's own model time (its metadata `timings`)",
              ms(p50(outside)), ms(percentile(outside, 99)))
    above = [o - f for o, f in zip(outside, floor_s, strict=True)]
    table.add("**above Serve's floor**: that − the floor route, per sample (deskgen's own cost: the second Serve "
              "hop, the ingress's work, the exposure's commit, PNG/JSON encoding)", f"**{ms(p50(above))}**",
              ms(percentile(above, 99)))
    omp, worker_threads = ray_worker_threads()
    table.notes += [
        "The overhead row compares against the driver's in-process run; the last row compares against the model "
        "time inside the Generator replica (same process contention as the served path), so it is the serving "
        "cost alone: two Serve hops, the ingress and PNG/JSON encoding.",
        "The `ping` row is the hop to the Generator alone, timed from the driver between the other requests: a "
        "deployment handle's routing and the replica's actor call, without Serve's proxy, the ingress or a model.",
        f"Same tiny model, params and seed; served and in-process pixels identical: {'yes' if identical else 'NO'}; "
        f"non-200 answers: {failures}.",
        f"torch threads: in-process 1; a 1-CPU Ray worker (as the Generator replica) has OMP_NUM_THREADS={omp}, "
        f"torch threads {worker_threads}.",
        "p99 of N samples is the nearest-rank value (for N < 100: the maximum).",
    ]
    return table, {"http_s": http_s, "in_process_s": local_s, "stages_s": stages, "identical_pixels": identical,
                   "failures": failures, "floor_s": floor_s, "ping_s": ping_s, "json_s": json_s,
                   "replica_model_s": replica_model_s}


def bench_throughput(app: ServeApp, local_p50: float) -> tuple[Table, dict[str, Any]]:
    """Closed loop: ``c`` clients send a bounded number of requests as fast as answers come back."""
    import httpx

    table = Table(
        "Throughput — `POST /v1/text2img`, tiny SDXL (as above), 1 Generator replica, production queue limits",
        ["clients", "requests", "req/s", "latency p50 (ms)", "latency p99 (ms)", "non-200"],
    )
    raw: dict[str, Any] = {}
    limits = httpx.Limits(max_connections=max(CONCURRENCY), max_keepalive_connections=max(CONCURRENCY))
    with httpx.Client(base_url=app.url, timeout=300, limits=limits) as client:
        for clients in CONCURRENCY:
            total = max(12, 2 * clients)
            with concurrent.futures.ThreadPoolExecutor(clients) as pool:
                start = time.perf_counter()
                results = list(pool.map(lambda i: post_text2img(client, MIX_A, 100 + i)[:2], range(total)))
                wall = time.perf_counter() - start
            latencies = [r[0] for r in results]
            errors = sum(r[1] != 200 for r in results)
            table.add(clients, total, f"{total / wall:.1f}", ms(p50(latencies)), ms(percentile(latencies, 99)), errors)
            raw[str(clients)] = {"wall_s": wall, "latencies_s": latencies, "errors": errors}
    table.notes.append(
        f"One generation at a time per replica by design; the in-process ceiling is 1 / p50 = {1 / local_p50:.1f} req/s."
    )
    return table, raw


def bench_gate_serve(app: ServeApp, photo: bytes, per_client: int) -> tuple[list[str], dict[str, Any]]:
    """``/v1/classify`` from ``GATE_CLIENTS`` concurrent clients: latency, images/s, batch sizes."""
    import httpx

    stats = app.handle("Classifier").stats

    def classify(client: Any) -> tuple[float, int]:
        start = time.perf_counter()
        response = client.post("/v1/classify", files={"image": ("desk.jpg", photo, "image/jpeg")})
        return time.perf_counter() - start, response.status_code

    limits = httpx.Limits(max_connections=GATE_CLIENTS, max_keepalive_connections=GATE_CLIENTS)
    with httpx.Client(base_url=app.url, timeout=300, limits=limits) as client:
        with concurrent.futures.ThreadPoolExecutor(GATE_CLIENTS) as pool:
            list(pool.map(lambda _: classify(client), range(2 * GATE_CLIENTS)))  # warm: TF traces batch shapes
            before = stats.remote().result()
            start = time.perf_counter()
            results = list(pool.map(lambda _: [classify(client) for _ in range(per_client)], range(GATE_CLIENTS)))
            wall = time.perf_counter() - start
            after = stats.remote().result()
    flat = [r for client_results in results for r in client_results]
    latencies = [r[0] for r in flat]
    batches = after["batches"] - before["batches"]
    images = after["items"] - before["items"]
    row = [
        f"`/v1/classify` via Serve, {GATE_CLIENTS} concurrent clients (N={len(flat)}), 1 replica",
        ms(p50(latencies)),
        ms(percentile(latencies, 99)),
        f"{len(flat) / wall:.1f}",
        f"mean batch {images / max(batches, 1):.1f} (max {after['max_batch']})",
    ]
    errors = sum(r[1] != 200 for r in flat)
    return row, {"latencies_s": latencies, "wall_s": wall, "batches": batches, "images": images, "errors": errors}


# --------------------------------------------------------------------------------------------------
# 2. Mix switching on one generator
# --------------------------------------------------------------------------------------------------


def bench_mix_switching(tiny: Path, rounds: int, reloads: int) -> tuple[Table, dict[str, Any]]:
    from deskgen.generator import DeskGenerator, GeneratorSettings
    from deskgen.mixes import NAMED_MIXES, Mix

    settings = GeneratorSettings(model_id=str(tiny / "sdxl"), lora_dir=str(tiny / "loras"))
    gen = DeskGenerator.from_pretrained(settings)
    a, b = Mix.from_weights(NAMED_MIXES[MIX_A]), Mix.from_weights(NAMED_MIXES[MIX_B])
    params = tiny_params(3)
    for mix in (a, b, a):  # load both mixes' adapters, warm the kernels
        gen.generate(params, mix)
    loads_before = DeskGenerator.base_loads

    def timed(mix: Mix) -> float:
        start = time.perf_counter()
        gen.generate(params, mix)
        return time.perf_counter() - start

    # Interleaved rounds: [B, A] both switch (A was active), then [A, A] neither does.
    alternating, repeating = [], []
    for _ in range(rounds):
        alternating += [timed(b), timed(a)]
        repeating += [timed(a), timed(a)]

    switches = []
    for i in range(4 * rounds):
        switches.append(gen.activate_mix(b if i % 2 == 0 else a))
    no_change = [gen.activate_mix(a) for _ in range(5)]
    base_reloads = DeskGenerator.base_loads - loads_before

    def reload() -> None:
        fresh = DeskGenerator.from_pretrained(settings)
        fresh.activate_mix(a)

    reload_s = time_calls(reload, reloads, warmup=0)
    ratio = p50(reload_s) / max(p50(switches), 1e-9)

    table = Table(
        f"Mix switching on one DeskGenerator — tiny SDXL, {MIX_A} ↔ {MIX_B} (both cached)",
        ["measurement", "N", "p50 (ms)"],
    )
    table.add(f"generation, repeating {MIX_A}", len(repeating), ms(p50(repeating)))
    table.add(f"generation, alternating {MIX_A}/{MIX_B} (every call switches)", len(alternating), ms(p50(alternating)))
    table.add("`activate_mix` switch between the two cached mixes", len(switches), ms(p50(switches)))
    table.add("`activate_mix` of the already active mix", len(no_change), ms(p50(no_change)))
    table.add("reload: `DeskGenerator.from_pretrained` + `activate_mix` (loads the adapters)", len(reload_s), ms(p50(reload_s)))
    table.add("**reload / switch**", "", f"**{ratio:.0f}x**")
    table.notes.append(
        f"Base pipeline loads during the {len(alternating) + len(switches)} switches: {base_reloads}. "
        "On the tiny model the pipeline loads in a fraction of a second; the real SDXL takes tens of seconds, "
        "so the real ratio is far larger."
    )
    raw = {"alternating_s": alternating, "repeating_s": repeating, "switch_s": switches, "reload_s": reload_s,
           "base_reloads": base_reloads}
    return table, raw


# --------------------------------------------------------------------------------------------------
# 3. The full-size VGG16 gate in-process
# --------------------------------------------------------------------------------------------------


def bench_gate_local(keras_file: Path, photo: Image.Image, n: int) -> tuple[list[list[str]], dict[str, Any]]:
    import numpy as np

    from deskgen.classifier import DeskClassifier

    start = time.perf_counter()
    gate = DeskClassifier.load(keras_file)
    load_s = time.perf_counter() - start
    x = gate.preprocess([photo])
    x8 = np.repeat(x, 8, axis=0)
    predict = time_calls(lambda: gate.model.predict(x, verbose=0), n, warmup=2)
    on_batch = time_calls(lambda: gate.model.predict_on_batch(x), n, warmup=2)
    score = time_calls(lambda: gate.score(photo), n, warmup=1)
    batch8 = time_calls(lambda: gate.model.predict_on_batch(x8), max(3, n // 3), warmup=1)
    rows = [
        [f"`model.predict`, 1 image (N={n})", ms(p50(predict)), ms(percentile(predict, 99)), f"{1 / p50(predict):.1f}", ""],
        [f"`model.predict_on_batch`, 1 image (N={n})", ms(p50(on_batch)), ms(percentile(on_batch, 99)),
         f"{1 / p50(on_batch):.1f}", ""],
        [f"`DeskClassifier.score` (resize + normalise + predict_on_batch), 1024x768 photo (N={n})", ms(p50(score)),
         ms(percentile(score, 99)), f"{1 / p50(score):.1f}", ""],
        [f"`model.predict_on_batch`, batch of 8 (N={len(batch8)})", ms(p50(batch8)), ms(percentile(batch8, 99)),
         f"{8 / p50(batch8):.1f}", "per batch"],
    ]
    raw = {"load_s": load_s, "predict_s": predict, "predict_on_batch_s": on_batch, "score_s": score, "batch8_s": batch8}
    return rows, raw


# --------------------------------------------------------------------------------------------------
# 4. BLIP-base
# --------------------------------------------------------------------------------------------------


def rss_gib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024**2
    return float("nan")


def bench_blip(blip_dir: Path, photo: Image.Image, n: int) -> tuple[Table, dict[str, Any]]:
    from deskgen.captioner import Captioner

    rss0 = rss_gib()
    start = time.perf_counter()
    captioner = Captioner.from_pretrained(str(blip_dir), device="cpu", dtype="float32")
    load_s = time.perf_counter() - start
    prefixes = captioner.prefixes
    full = time_calls(lambda: captioner.caption(photo), n, warmup=1)
    words = len(captioner.caption(photo).unconditional.split())
    captioner.set_prefixes([])
    single = time_calls(lambda: captioner.caption(photo), n, warmup=1)
    rss = rss_gib() - rss0

    table = Table(
        "BLIP-base captioning — full size (224 M params), fp32, CPU, 1 torch thread, greedy, "
        f"max_new_tokens={captioner.max_new_tokens}",
        ["measurement", "N", "p50 (s)", "max (s)"],
    )
    table.add(f"caption set: unconditional + {len(prefixes)} prefixes (vision encoder once)", n, s(p50(full)), s(max(full)))
    table.add("one caption (unconditional only)", n, s(p50(single)), s(max(single)))
    table.add("load (`Captioner.from_pretrained`)", 1, s(load_s), s(load_s))
    table.notes.append(
        f"Random weights: greedy decoding rarely meets [SEP], so each prompt runs to max_new_tokens "
        f"(the unconditional caption had {words} words) — an upper bound on a trained model's ~10-20 tokens. "
        f"RSS grew by {rss:.2f} GiB."
    )
    return table, {"load_s": load_s, "set_s": full, "single_s": single, "rss_gib": rss}


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=None, help="tiny models folder (default: $DESKGEN_MODELS or models/tiny)")
    parser.add_argument("--fullsize", type=Path, default=DEFAULT_FULLSIZE_DIR,
                        help=f"full-size models folder, built if missing (default {DEFAULT_FULLSIZE_DIR})")
    parser.add_argument("--only", default=None, help=f"comma-separated sections of {','.join(SECTIONS)} (default: all)")
    parser.add_argument("--n", type=int, default=30, help="interleaved HTTP/in-process pairs for the overhead (default 30)")
    parser.add_argument("--no-write", action="store_true", help="print the tables, do not append them to BENCHMARKS.md")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sections = parse_choices(args.only, SECTIONS, option="--only")
    if args.n < 1:
        raise InvalidParameter(f"`--n` must be >= 1 but is {args.n}.", field="n")

    import torch

    torch.set_num_threads(1)
    tiny = resolve(args.models) if args.models else models_dir()
    if not (tiny / ".complete").is_file():
        raise ModelFilesMissing("tiny models", str(tiny), hint="run `make models` (or python -m deskgen.tools.tiny --out DIR)")
    fullsize = args.fullsize.expanduser().resolve()
    needed = [p for p, section in (("vgg", "gate"), ("blip", "blip")) if section in sections]
    ensure_fullsize(fullsize, needed)
    from bench.fullsize import part_dir, vgg_path

    photo = desk_photo()
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    tables: list[Table] = []
    raw: dict[str, Any] = {}
    gate_rows: list[list[str]] = []

    if "serve" in sections or "gate" in sections:
        classifier_model = vgg_path(fullsize) if "gate" in sections else tiny / "classifier" / "desk_gate.keras"
        with ServeApp(bench_serve_config(free_port(), tiny, classifier_model)) as app:
            log.info("deskgen deployed in %.1f s at %s", app.deploy_s, app.url)
            if "serve" in sections:
                table, raw["overhead"] = bench_overhead(app, tiny, args.n)
                tables.append(table)
                table, raw["throughput"] = bench_throughput(app, p50(raw["overhead"]["in_process_s"]))
                tables.append(table)
            if "gate" in sections:
                row, raw["gate_serve"] = bench_gate_serve(app, jpeg_bytes(photo), per_client=4)
                gate_rows.append(row)
    if "mix" in sections:
        table, raw["mix"] = bench_mix_switching(tiny, rounds=8, reloads=3)
        tables.append(table)
    if "gate" in sections:
        rows, raw["gate_local"] = bench_gate_local(vgg_path(fullsize), photo, n=15)
        gate = Table(
            "Desk gate — FULL-SIZE VGG16 (14.8 M params, 224x224), TensorFlow CPU, default thread pools",
            ["measurement", "p50 (ms)", "p99 (ms)", "images/s", "notes"],
        )
        for r in [*rows, *gate_rows]:
            gate.add(*r)
        gate.notes.append(
            f"Load: {raw['gate_local']['load_s']:.1f} s. Via Serve the latency includes the JPEG upload and decode in "
            "the ingress, the batch wait (10 ms) and queueing behind the batches in progress."
        )
        if "gate_serve" in raw:
            served = raw["gate_serve"]
            gate.notes.append(
                f"The replica formed {served['batches']} batches for {served['images']} images (non-200: "
                f"{served['errors']}) with deskgen.batching.DynamicBatcher, which forms the next batch when the model "
                "is free. Ray Serve 2.60's `@serve.batch`, used before, closes a batch `batch_wait_timeout_s` after its "
                "first request even while the previous one runs, and gave mean batch 1.1 in this same measurement. "
                "On this CPU batching buys little — a batch of 8 is hardly cheaper per image than 8 single images "
                "(rows above) — on a GPU it does."
            )
        tables.append(gate)
    if "blip" in sections:
        table, raw["blip"] = bench_blip(part_dir(fullsize, "blip"), photo, n=3)
        tables.append(table)

    wall = time.perf_counter() - started
    preface = [
        f"Machine load (1-min load average) at start {load_before:.1f}, at end {os.getloadavg()[0]:.1f}: the "
        "machine is shared, so compare rows measured side by side rather than across runs."
    ]
    section = render_section("CPU suite", tables, command=command_line(), wall_s=wall, host=machine(), preface=preface)
    print(section)
    if not args.no_write:
        append_report(section)
        log.info("appended to %s", PROJECT_ROOT / "BENCHMARKS.md")


if __name__ == "__main__":
    main()
