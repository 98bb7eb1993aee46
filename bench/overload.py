"""Overload: goodput when more clients want images than the generator makes, with admission control
(``shed_load``: refuse at the door, before the body is parsed) off and on, in the same run.

    make bench-overload          # or: python -m bench.overload [--seconds 30] [--only suite|refusal|burst] [--bursts 100] [--no-write]

The workload is the tiny ``/v1/text2img`` of the CPU suite (64 px, 2 steps, four mixes in rotation) on the
app of ``bench.cpu`` (one replica per stage) with the serve tier's tight generator queue: one running and
two queued per caller, so the generator holds **3** requests (its *capacity* here). First one client
alone, in a closed loop: the throughput to beat (the issue's reference); and as many clients as the
generator holds, none refused: what it makes when kept busy. Then 4x and 10x the capacity in clients, each posting in
a loop and, on a 503 or 429, waiting before it retries either the answer's ``Retry-After`` (a polite
client) or 0.2 s (an impatient one). Goodput is images answered per second; every answer must be a PNG
or a JSON 503/429 with ``Retry-After``, and a request with no answer counts as lost.

Everything shares this machine's cores: the clients, Serve's proxy and the ingress take CPU from the
generator in proportion to the requests they handle, refused or not, which a GPU generator would not
feel. The second table therefore repeats the rows with the Generator replica alone on one core and
everything else (clients included) on the others, standing in for a generator on its own device.

``--only refusal`` (also part of the full run) measures what one refusal at the full door costs: with the
generator's capacity held by long generations, requests with bodies of several sizes are refused 503; the
refused body is never parsed, but it is read off the connection and dropped (at most 64 MiB) so that the
client reads the 503 instead of a reset. Per refusal: latency, the bytes the body had, and the CPU seconds
of the Ingress replica and of Serve's HTTP proxy (``/proc`` times of their processes).

``--only burst`` (also part of the full run): an idle generator gets as many generations at once as it
holds, again and again. Serve's router counts a request as queued until a replica accepts it, so it may
refuse some of them while the replica is free; the Ingress sends a refused generation again after the
pauses of ``router_retry_s``. Each row counts the 503s with ``router_retry_s: []`` and with the config's.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

from bench.common import Table, append_report, command_line, machine, ray_processes, render_section
from bench.cpu import APP, PROMPT, ServeApp, bench_serve_config, free_port
from deskgen.paths import models_dir

log = logging.getLogger("bench.overload")

MIXES = ("dalle_ott", "ott_3d", "mix", "dalle_only")
STEPS, SIDE = 2, 64
#: The generator's queue limits for this benchmark (the serve tier's): capacity = 1 + 2 per caller.
MAX_ONGOING, MAX_QUEUED = 1, 2
CAPACITY = MAX_ONGOING + MAX_QUEUED
LOADS = (4, 10)
IMPATIENT_S = 0.2


@dataclass
class Tally:
    ok: int = 0
    refused: int = 0
    refused_without_retry_after: int = 0
    other: dict[str, int] = field(default_factory=dict)
    lost: int = 0
    latencies: list[float] = field(default_factory=list)


async def client_loop(http: Any, until: float, retry: str, tally: Tally, offset: int) -> None:
    import httpx

    i = offset
    while time.monotonic() < until:
        body = {"prompt": PROMPT, "mix": MIXES[i % len(MIXES)], "seed": i, "steps": STEPS, "width": SIDE, "height": SIDE}
        i += 1
        started = time.monotonic()
        try:
            response = await http.post("/v1/text2img", json=body)
        except httpx.HTTPError as exc:
            tally.lost += 1
            log.warning("no answer: %r", exc)
            continue
        if response.status_code == 200 and response.headers.get("content-type") == "image/png":
            tally.ok += 1
            tally.latencies.append(time.monotonic() - started)
            continue
        if response.status_code in (429, 503) and response.headers.get("content-type", "").startswith("application/json"):
            tally.refused += 1
            wait_header = response.headers.get("retry-after")
            if wait_header is None:
                tally.refused_without_retry_after += 1
            wait = float(wait_header or 1) if retry == "retry-after" else IMPATIENT_S
            await asyncio.sleep(min(wait, max(0.0, until - time.monotonic())))
            continue
        key = f"{response.status_code} {response.text[:80]}"
        tally.other[key] = tally.other.get(key, 0) + 1


async def run_phase(url: str, clients: int, seconds: float, retry: str) -> tuple[Tally, float]:
    import httpx

    tally = Tally()
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:
        started = time.monotonic()
        until = started + seconds
        await asyncio.gather(*(client_loop(http, until, retry, tally, 1000 * n) for n in range(clients)))
        wall = time.monotonic() - started
    return tally, wall


def set_door(app: ServeApp, on: bool, router_retry_s: list[float] | None = None) -> None:
    """Redeploy with the ingress's ``shed_load`` switched and, if given, its ``router_retry_s`` (a
    reconfigure: no replica restarts); return once /healthz shows both."""
    import httpx
    from ray.serve._private.api import serve_start
    from ray.serve.schema import ServeDeploySchema

    config = copy.deepcopy(app.config)
    for deployment in config["applications"][0]["deployments"]:
        if deployment["name"] == "Ingress":
            deployment["user_config"]["shed_load"] = on
            if router_retry_s is not None:
                deployment["user_config"]["router_retry_s"] = router_retry_s
            retries = deployment["user_config"].get("router_retry_s")
    serve_start(http_options=config["http_options"]).deploy_apps(ServeDeploySchema.model_validate(config))
    deadline = time.monotonic() + 120
    with httpx.Client(base_url=app.url, timeout=30) as http:
        while True:
            door = http.get("/healthz").json()["admission"]
            if (door["shed_load"] is on and (not on or door["capacity"] == CAPACITY)
                    and (retries is None or door["router_retry_s"] == retries)):  # fmt: skip
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"shed_load={on} router_retry_s={retries} never applied: {door}")
            time.sleep(0.5)


def pin_generator(pinned: bool) -> str:
    """Give the Generator replica's process one core of its own and every other process of the session
    (Ray's, this one) the rest — or undo it. Every thread of each process is moved."""
    cores = sorted(os.sched_getaffinity(0) | set(range(os.cpu_count() or 1)))
    if len(cores) < 2:
        raise RuntimeError("pinning needs at least 2 cores")
    own, rest = {cores[-1]}, set(cores[:-1])
    moved = []
    for process in ray_processes(with_self=True):
        cmdline = process.cmdline
        target = own if "ServeReplica:deskgen:Generator" in cmdline else rest
        for task in os.listdir(f"/proc/{process.pid}/task"):
            try:
                os.sched_setaffinity(int(task), set(cores) if not pinned else target)
            except OSError:
                pass
        if "Generator" in cmdline:
            moved.append(process.pid)
    if pinned and not moved:
        raise RuntimeError("no Generator replica process found to pin")
    return f"generator pid {moved} on core {cores[-1]}, the rest on {sorted(rest)}"


def overload_config(port: int) -> dict[str, Any]:
    tiny = models_dir()
    config = bench_serve_config(port, tiny, tiny / "classifier" / "desk_gate.keras")
    for deployment in config["applications"][0]["deployments"]:
        if deployment["name"] == "Generator":
            deployment.update(max_ongoing_requests=MAX_ONGOING, max_queued_requests=MAX_QUEUED)
    return config


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=30.0, help="length of each phase (default 30)")
    parser.add_argument("--no-write", action="store_true", help="print the table, do not append it to BENCHMARKS.md")
    parser.add_argument("--only", choices=("suite", "refusal", "burst"), default=None, help="run one part (default: all)")
    parser.add_argument("--bursts", type=int, default=100, help="bursts per row of the burst part (default 100)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    tables = []
    with ServeApp(overload_config(free_port()), metrics_port=free_port()) as app:
        log.info("%s deployed in %.1f s at %s", APP, app.deploy_s, app.url)
        asyncio.run(run_phase(app.url, 1, 5.0, "retry-after"))  # warm every mix on the replica
        if args.only in (None, "suite"):
            for pinned in (False, True):
                where = pin_generator(pinned)
                log.info("placement: %s", where if pinned else "shared cores")
                tables.append(measure(app, args.seconds, pinned))
                if pinned:
                    tables[-1].notes.append(f"Placement: {where}.")
            pin_generator(False)
            tables[0].notes.append(
                "admission off: every request walks the ingress (body parsed, mix chosen, exposure reserved) until the "
                "generator's router refuses it (BackPressureError, 503 with the configured Retry-After). On: the ingress "
                "refuses at the door from its count of generation requests in flight and the generator's capacity read "
                "from the Serve controller; its Retry-After is a place in a virtual queue (deployments/door/admission.py)."
            )
        if args.only in (None, "refusal"):
            tables.append(refusal_cost(app))
        if args.only in (None, "burst"):
            tables.append(bursts(app, args.bursts))
    section = render_section("Overload suite", tables, command=command_line(), wall_s=time.perf_counter() - started,
                             host=machine(), preface=[f"Machine load (1-min) at start {load_before:.1f}, at end "
                                                      f"{os.getloadavg()[0]:.1f}; clients run on the same machine."])  # fmt: skip
    print(section)
    if not args.no_write:
        append_report(section)


def measure(app: ServeApp, seconds: float, pinned: bool) -> Table:
    place = "Generator alone on one core, everything else on the others" if pinned else "all processes share the cores"
    table = Table(
        f"Overload — tiny `POST /v1/text2img` ({SIDE} px, {STEPS} steps, {len(MIXES)} mixes in rotation), 1 Generator "
        f"replica holding {CAPACITY} ({MAX_ONGOING} running + {MAX_QUEUED} queued), {seconds:.0f} s per row; {place}",
        ["admission", "clients", "retry after", "images/s (goodput)", "vs one client", f"vs {CAPACITY} clients",
         "refused (503/429)", "without Retry-After", "other answers", "lost", "latency p50 (s)"],
    )  # fmt: skip
    set_door(app, True)
    alone, wall = asyncio.run(run_phase(app.url, 1, seconds, "retry-after"))
    baseline = alone.ok / wall
    full, wall = asyncio.run(run_phase(app.url, CAPACITY, seconds, "retry-after"))
    at_capacity = full.ok / wall
    for clients, tally, rate in ((1, alone, baseline), (CAPACITY, full, at_capacity)):
        table.add("-", clients, "-", f"{rate:.2f}", f"{100 * rate / baseline:.0f} %", f"{100 * rate / at_capacity:.0f} %",
                  tally.refused, tally.refused_without_retry_after, sum(tally.other.values()), tally.lost,
                  f"{_p50(tally.latencies):.3f}")  # fmt: skip
    for shed in (False, True):
        set_door(app, shed)
        for load in LOADS:
            for retry in ("retry-after", "0.2 s"):
                tally, wall = asyncio.run(run_phase(app.url, load * CAPACITY, seconds, retry))
                goodput = tally.ok / wall
                log.info("pinned=%s shed=%s %dx %s: %.2f img/s, %d refused, other %s, lost %d", pinned, shed, load,
                         retry, goodput, tally.refused, tally.other, tally.lost)  # fmt: skip
                table.add("on" if shed else "off", f"{load * CAPACITY} ({load}x)", retry, f"{goodput:.2f}",
                          f"{100 * goodput / baseline:.0f} %", f"{100 * goodput / at_capacity:.0f} %",
                          tally.refused, tally.refused_without_retry_after,
                          sum(tally.other.values()), tally.lost, f"{_p50(tally.latencies):.3f}")  # fmt: skip
    return table


#: The idle time after each burst of ``--only burst`` (the door empties, the replica idles).
BURST_GAP_S = 0.3


async def burst_round(http: Any, size: int, seed: int) -> list[tuple[int, str, float]]:
    """``size`` generations posted at once on connections opened beforehand: (status, error code, seconds)."""
    await asyncio.gather(*(http.get("/healthz") for _ in range(size)))  # every connection open and idle

    async def one(i: int) -> tuple[int, str, float]:
        body = {"prompt": PROMPT, "mix": MIXES[0], "seed": seed + i, "steps": STEPS, "width": SIDE, "height": SIDE}
        started = time.monotonic()
        response = await http.post("/v1/text2img", json=body)
        code = "" if response.status_code == 200 else response.json()["error"]["code"]
        return response.status_code, code, time.monotonic() - started

    return list(await asyncio.gather(*(one(i) for i in range(size))))


def bursts(app: ServeApp, count: int) -> Table:
    """An idle generator gets as many generations at once as it holds, ``count`` times, with the ingress
    answering the router's first refusal (``router_retry_s: []``) and with serve_config.yaml's pauses."""
    import httpx

    table = Table(
        f"Bursts at an idle generator: {CAPACITY} tiny `POST /v1/text2img` at once (the generator holds {CAPACITY}: "
        f"{MAX_ONGOING} running + {MAX_QUEUED} queued), {count} bursts per row, {BURST_GAP_S} s idle between them; "
        "admission on",
        ["router_retry_s", "requests", "answered 200", "refused 503", "bursts with a 503", "refusals retried",
         "latency p50 (ms)", "latency max (ms)"],
    )  # fmt: skip
    default = next(d for d in app.config["applications"][0]["deployments"] if d["name"] == "Ingress")["user_config"]["router_retry_s"]
    for retries in ([], default):
        set_door(app, True, retries)

        async def run() -> list[list[tuple[int, str, float]]]:
            limits = httpx.Limits(max_connections=CAPACITY, max_keepalive_connections=CAPACITY)
            async with httpx.AsyncClient(base_url=app.url, timeout=120, limits=limits) as http:
                rounds = []
                for n in range(count):
                    rounds.append(await burst_round(http, CAPACITY, 1000 * n))
                    await asyncio.sleep(BURST_GAP_S)
                return rounds

        retried_before = generator_refusals(app, "retried")
        rounds = asyncio.run(run())
        answers = [a for r in rounds for a in r]
        ok = [seconds for status, _, seconds in answers if status == 200]
        refused = [a for a in answers if a[0] != 200]
        log.info("router_retry_s=%s: %d refused %s", retries, len(refused), sorted({(s, c) for s, c, _ in refused}))
        table.add(str(retries), len(answers), len(ok), len(refused), sum(any(a[0] != 200 for a in r) for r in rounds),
                  generator_refusals(app, "retried") - retried_before,
                  f"{_p50(ok) * 1000:.0f}", f"{max(ok) * 1000:.0f}")  # fmt: skip
    table.notes.append(
        "Serve's router counts a request as queued until a replica accepts it, so of generations that arrive "
        "together it may refuse some (BackPressureError, 503) while the replica is still free. `refusals retried`: "
        "the Ingress's `deskgen_generator_refusals_total{outcome=\"retried\"}`, read from Ray's metrics agent."
    )
    return table


def generator_refusals(app: ServeApp, outcome: str) -> float:
    """The Ingress's ``deskgen_generator_refusals_total`` of ``outcome``, summed over its series (0 before any)."""
    import httpx

    from bench.common import metric_total

    time.sleep(3.0)  # Ray's metrics agent has the Ingress's last second (reported every second)
    text = httpx.get(f"http://127.0.0.1:{app.metrics_port}/metrics", timeout=10).text
    return metric_total(text, "ray_deskgen_generator_refusals_total", {"outcome": outcome})


#: Bodies of the refused requests: a tiny JSON generation request, then padded JSON of 1 and 10 MiB.
REFUSAL_BODIES = (("tiny JSON", 0), ("1 MiB", 1 << 20), ("10 MiB", 10 << 20))
REFUSALS = 20


def _cpu_seconds(pid: int) -> float:
    import psutil

    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


def _proxy_pid() -> int:
    for process in ray_processes():
        if "ProxyActor" in process.cmdline:
            return process.pid
    raise RuntimeError("no Serve ProxyActor process found")


def refusal_cost(app: ServeApp) -> Table:
    """What a refusal at the full door costs, per body size (see the module docstring)."""
    import threading

    import httpx

    from bench.ingress_kill import ingress_pid

    set_door(app, True)
    table = Table(
        f"A refusal at the full door (admission on; the generator's {CAPACITY} places held by long generations), "
        f"{REFUSALS} refusals per row, one at a time",
        ["body", "bytes sent", "answer", "latency p50 (ms)", "Ingress CPU per refusal (ms)", "proxy CPU per refusal (ms)"],
    )  # fmt: skip
    release = threading.Event()
    holding: list[int] = []

    def hold() -> None:
        body = {"prompt": "desk", "steps": 150, "width": 512, "height": 512, "timeout_s": 120}
        with httpx.Client(base_url=app.url, timeout=180) as c, c.stream(
            "POST", "/v1/text2img", json=body, headers={"Accept": "text/event-stream"}
        ) as response:
            lines = response.iter_lines()
            if response.status_code == 200:
                next(lines)
                holding.append(1)
            release.wait(150)

    threads = [threading.Thread(target=hold, daemon=True) for _ in range(CAPACITY)]
    for t in threads:
        t.start()
    try:
        with httpx.Client(base_url=app.url, timeout=60) as http:
            deadline = time.monotonic() + 60
            while http.get("/healthz").json()["admission"]["in_flight"] < CAPACITY:
                if time.monotonic() > deadline:
                    raise TimeoutError("the long generations never filled the door")
                time.sleep(0.2)
            ingress, proxy = ingress_pid(), _proxy_pid()
            for label, size in REFUSAL_BODIES:
                body = b'{"prompt": "a desk", "pad": "' + b"x" * size + b'"}'
                statuses: set[int] = set()
                latencies = []
                cpu_ingress, cpu_proxy = _cpu_seconds(ingress), _cpu_seconds(proxy)
                for _ in range(REFUSALS):
                    t = time.perf_counter()
                    r = http.post("/v1/text2img", content=body, headers={"Content-Type": "application/json"})
                    latencies.append(time.perf_counter() - t)
                    statuses.add(r.status_code)
                cpu_ingress = (_cpu_seconds(ingress) - cpu_ingress) / REFUSALS
                cpu_proxy = (_cpu_seconds(proxy) - cpu_proxy) / REFUSALS
                table.add(label, f"{len(body):,}", " ".join(str(c) for c in sorted(statuses)),
                          f"{_p50(latencies) * 1000:.1f}", f"{cpu_ingress * 1000:.2f}", f"{cpu_proxy * 1000:.2f}")  # fmt: skip
    finally:
        release.set()
        for t in threads:
            t.join(timeout=180)
    table.notes.append(
        "the refused body is not parsed, but the Ingress reads it off Serve's proxy and drops it (deployments/access.py "
        "`refuse` -> `drain`, at most 64 MiB) so the client reads the 503 instead of a reset; the proxy receives the "
        "whole body from the client either way. CPU: user + system seconds of each process over the row, divided by "
        "the refusals (the long generations' streams add a little to the Ingress's and the proxy's)."
    )
    return table


def _p50(values: list[float]) -> float:
    from bench.common import p50

    return p50(values) if values else float("nan")


if __name__ == "__main__":
    main()
