"""Generator routing side by side: Serve's default router vs the mix-aware router (deployments/routing.py).

    python -m bench.router                        # 3 generator replicas, 240 requests, 4 clients, Zipf s=1.1
    python -m bench.router --replicas 2 --requests 120 --no-write
    python -m bench.router --replicas 2 --workload ab  # the default experiment's arms only, in its split

One Ray instance, the app of serve_config.yaml on the tiny models (64x64, 2 steps, no product location),
N Generator replicas; the same seeded workload is sent twice, once per router (the app redeployed between
them): requests for the 7 named mixes and 3 ad-hoc ones drawn from a Zipf distribution (the A/B arms and
the default mix most popular), each streamed (SSE) so its ``started`` event gives the replica and the
queue wait (``--workload ab``: the default experiment's two arms in its split instead, the traffic when every user is
in the experiment). Reported per router: mix switches per 100 requests (generations that found another mix
active, read from every replica's counters), p50/p95 queue wait on the replica, p50/p95 latency, throughput, p50 latency per
mix, and how the hottest mix spread over the replicas; each round's wait p95 and throughput too, and in how
many rounds each mix-aware router beat Serve's default in the same round (``--rounds`` alternate the routers,
so a round's pair shares the machine's state of the moment; this host's run-to-run spread is large; which
router goes first alternates too, round by round); the
time each request spent outside the replica (ingress, router, transport: where the mix-aware router holds a
request back); and the A/B arms' p50 gap with a 95 % bootstrap interval, read against the 5 % goal, where
each arm's time goes, and each arm's own mix loads (the replicas' counters by mix label: the adapter files
they read and what that cost per request of the arm). ``--spill-graces-ms 20,0`` compares the router's spill grace (``spill_grace_s``); for
each mix-aware router, the requests it held within the grace (its ``deskgen_router_hold_seconds`` metric,
read from Ray's metrics agent): how many stayed on a holder of their mix (the done-callback of a finished
request landed during the hold) and how soon, and how many spilled. Where the machine's time goes: each
router's generations grouped by how many replicas generated at once (the replicas share the cores, so a
router that keeps more of them busy makes each image slower), and each process's CPU time per request
(the replicas, the Ingress with its routers, the proxy, the controller, the clients, Ray's own).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import copy
import json
import logging
import os
import random
import time
from collections.abc import Mapping
from typing import Any

import httpx

from bench.common import (
    Table,
    append_report,
    command_line,
    machine,
    p50_difference,
    percentile,
    ray_processes,
    render_section,
)
from bench.cpu import ServeApp, bench_serve_config, free_port
from deployments.generator import LOAD_COUNTERS
from deployments.routing import SPILL_GRACE_S
from deskgen.paths import models_dir
from deskgen.serve_config import deployment_config, load_serve_config

log = logging.getLogger("bench.router")

NAMED = ["ott_3d", "dalle_ott", "mix", "dalle_only", "ott_only", "3d_only", "dalle_3d"]
ADHOC = ["ott:0.3", "dalle:0.4+3d:0.2", "3d:0.9"]
#: The default experiment's split, read from serve_config.yaml's ``ab_split``: each arm's share, the control first.
AB_SPLIT: dict[str, float] = dict(deployment_config(load_serve_config(), "Ingress")["user_config"]["ab_split"])
ARMS = tuple(AB_SPLIT)
MIX_AWARE = "deployments.routing:MixAwareRouter"
#: Issue 24's goal: once warm, the A/B arms' p50 latencies within 5 % of each other.
ARMS_GOAL = 0.05


#: The workloads: ``zipf`` over the named mixes then the ad-hoc ones, or ``ab``: the default experiment's arms in
#: its split (the traffic when every user is in the experiment).
WORKLOADS = ("zipf", "ab")


def workload_mixes(kind: str) -> list[str]:
    """The mixes a workload draws from, in order."""
    return NAMED + ADHOC if kind == "zipf" else list(ARMS)


def workload(n: int, seed: int, s: float, kind: str = "zipf") -> list[str]:
    """``n`` mixes drawn from a Zipf distribution over the named mixes then the ad-hoc ones, or from the default
    experiment's split."""
    weights = zipf_weights(s) if kind == "zipf" else [AB_SPLIT[arm] for arm in ARMS]
    return random.Random(seed).choices(workload_mixes(kind), weights=weights, k=n)


def workload_title(args: argparse.Namespace) -> str:
    if args.workload == "zipf":
        return f"Zipf s={args.zipf} over 7 named + 3 ad-hoc mixes (seed {args.seed})"
    split = ", ".join(f"{arm} {100 * AB_SPLIT[arm]:g} %" for arm in ARMS)
    return f"the default experiment's split ({split}; seed {args.seed})"


def zipf_weights(s: float) -> list[float]:
    """The workload's weight of each mix of ``NAMED + ADHOC``, in that order: 1 / rank^s."""
    return [1.0 / (rank + 1) ** s for rank in range(len(NAMED + ADHOC))]


def router_config(base: dict[str, Any], replicas: int, spill_queue: int | None, grace_s: float = SPILL_GRACE_S) -> dict[str, Any]:
    """The app with ``replicas`` Generator replicas and Serve's default router (``spill_queue`` None) or the
    mix-aware router with that threshold and spill grace; the Ingress restarts with each (a handle keeps its
    router)."""
    config = copy.deepcopy(base)
    for deployment in config["applications"][0]["deployments"]:
        if deployment["name"] == "Generator":
            deployment["num_replicas"] = replicas
            deployment["ray_actor_options"] = {"num_cpus": 1, "num_gpus": 1}
            if spill_queue is None:
                deployment.pop("request_router_config", None)
            else:
                deployment["request_router_config"] = {
                    "request_router_class": MIX_AWARE,
                    "request_router_kwargs": {"spill_queue": spill_queue, "spill_grace_s": grace_s},
                    "request_routing_stats_period_s": 1,
                }  # fmt: skip
        if deployment["name"] == "Ingress":
            deployment["user_config"].update(default_steps=2, default_width=64, default_height=64, request_timeout_s=300)
            env = {"DESKGEN_GENERATOR_ROUTER": "serve" if spill_queue is None else f"mix_aware-{spill_queue}-{grace_s}"}
            deployment.setdefault("ray_actor_options", {})["runtime_env"] = {"env_vars": env}
    return config


def round_order(routers: list[Any], round_: int) -> list[Any]:
    """The routers in the order they run in round ``round_`` (from 0): as given in even rounds, reversed in odd
    ones, so a drift within a round (the machine warming, the previous deployment still shutting down) does not
    always fall on the same router."""
    return list(routers) if round_ % 2 == 0 else list(reversed(routers))


def redeploy(app: ServeApp, config: dict[str, Any], replicas: int) -> None:
    from ray import serve
    from ray.serve._private.api import serve_start
    from ray.serve.schema import ServeDeploySchema

    serve_start(http_options=config["http_options"]).deploy_apps(ServeDeploySchema.model_validate(config))
    time.sleep(2.0)  # the controller starts the update (the Ingress replicas restart)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        status = serve.status().applications.get("deskgen")
        if status is not None and status.status == "RUNNING":
            ingress, generator = status.deployments["Ingress"], status.deployments["Generator"]
            running = {state: n for state, n in generator.replica_states.items() if n}
            if ingress.status == "HEALTHY" and generator.status == "HEALTHY" and running == {"RUNNING": replicas}:
                with httpx.Client(base_url=app.url, timeout=30) as client:
                    if client.get("/readyz").status_code == 200 and len(replica_infos(app, replicas)) == replicas:
                        return
        time.sleep(1.0)
    raise TimeoutError("the app did not come up with its generator replicas")


def replica_infos(app: ServeApp, replicas: int) -> dict[str, dict[str, Any]]:
    """Every generator replica's counters (asked until each answered once)."""
    handle = app.handle("Generator")
    seen: dict[str, dict[str, Any]] = {}
    for _ in range(40 * replicas):
        info = handle.info.remote().result()
        seen[info["replica"]] = info
        if len(seen) == replicas:
            break
    return seen


async def one(http: httpx.AsyncClient, mix: str, seed: int) -> dict[str, Any]:
    body = {"prompt": "a tidy desk with a monitor", "mix": mix, "seed": seed, "locate": False}
    started = time.perf_counter()
    out: dict[str, Any] = {"mix": mix}
    async with http.stream("POST", "/v1/text2img", json=body, headers={"Accept": "text/event-stream"}) as response:
        event = ""
        async for line in response.aiter_lines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: ") and event == "started":
                data = json.loads(line[6:])
                out.update(replica=data["replica"], queued_s=data["queued_s"], began=time.perf_counter())
            elif line.startswith("data: ") and event == "done":
                timings = json.loads(line[6:])["metadata"]["timings"]
                out.update(ok=True, activate_s=timings["activate_s"], generate_s=timings["generate_s"], ended=time.perf_counter())
            elif line.startswith("data: ") and event == "error":
                out["ok"] = False
    out["latency_s"] = time.perf_counter() - started
    if out.get("ok") and "queued_s" in out:
        # The rest of the latency: the ingress, the router (a request it holds back waits there, not in a
        # replica's queue), the transport and the PNG; alike for every router but for the router's part.
        out["outside_s"] = out["latency_s"] - out["queued_s"] - out["activate_s"] - out["generate_s"]
    return out


async def drive(url: str, mixes: list[str], clients: int) -> tuple[list[dict[str, Any]], float]:
    queue: asyncio.Queue[tuple[int, str]] = asyncio.Queue()
    for i, mix in enumerate(mixes):
        queue.put_nowait((i, mix))
    results: list[dict[str, Any]] = []

    async def client() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=600) as http:
            while not queue.empty():
                i, mix = queue.get_nowait()
                results.append(await one(http, mix, seed=i))

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return results, time.perf_counter() - started


def replicas_busy(results: list[dict[str, Any]]) -> list[tuple[float, float]]:
    """For each answered request of one round: how many replicas generated at once while its replica worked on
    it (from its ``started`` event to its ``done`` event, as this client received them; its own replica
    counted), averaged over that time, and its generation time on the replica. Each other replica's spans are
    merged first, so one replica counts at most once at any moment. The replicas share this machine's cores:
    this is what separates a slower generation from a slower router."""
    spans = [r for r in results if r.get("ok") and "began" in r and r["ended"] > r["began"]]
    by_replica: dict[str, list[tuple[float, float]]] = collections.defaultdict(list)
    for r in spans:
        by_replica[r["replica"]].append((r["began"], r["ended"]))
    merged_spans = {replica: union(s) for replica, s in by_replica.items()}
    out = []
    for r in spans:
        length = r["ended"] - r["began"]
        others = sum(max(0.0, min(r["ended"], b) - max(r["began"], a))
                     for replica, s in merged_spans.items() if replica != r["replica"] for a, b in s)  # fmt: skip
        out.append((1.0 + others / length, r["generate_s"]))
    return out


def union(spans: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Overlapping or touching time spans merged, in order."""
    out: list[tuple[float, float]] = []
    for a, b in sorted(spans):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


#: Where the machine's CPU time goes during a round, by process: (role, a substring of the process's command
#: line as Ray titles it), the first match wins; other processes with "ray" in their command line are Ray's own.
ROLES = (("Generator replicas", "ServeReplica:deskgen:Generator"), ("Ingress (and its routers)", "ServeReplica:deskgen:Ingress"),
         ("other stages", "ServeReplica:"), ("proxy", "ProxyActor"), ("controller", "ServeController"))  # fmt: skip
CLIENTS, RAY = "bench clients", "Ray's own"


def cpu_seconds() -> dict[int, tuple[str, float]]:
    """Every Ray process's and this one's CPU time so far (user + system, its threads included), by pid."""
    out = {}
    for process in ray_processes(with_self=True):
        role = CLIENTS if process.pid == os.getpid() else next((r for r, key in ROLES if key in process.cmdline), RAY)
        if process.cpu_s is not None:
            out[process.pid] = (role, process.cpu_s)
    return out


def cpu_by_role(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]) -> dict[str, float]:
    """The CPU seconds each role spent between two :func:`cpu_seconds` readings: processes alive at both only
    (a process started or ended between them is left out rather than counted with its start-up)."""
    out: dict[str, float] = collections.defaultdict(float)
    for pid, (role, seconds) in after.items():
        if pid in before and before[pid][0] == role:
            out[role] += seconds - before[pid][1]
    return dict(out)


#: The threads of a generator replica's own work, as its ``info()["threads"]`` names them; the rest of its
#: process's CPU time is Serve's and Ray's threads (queue-length probes, routing stats, metrics, RPC).
REPLICA_THREADS = ("pipeline", "requests", "adapter watch")
SERVE_AND_RAY = "Serve's and Ray's threads"


def replica_thread_seconds(infos: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """CPU seconds so far (user + system, psutil's) of the generator replicas' own threads, summed by role, and
    of their whole processes (``all``). A replica whose process is gone is left out, a thread gone counts 0."""
    import psutil

    out: dict[str, float] = collections.defaultdict(float)
    for info in infos.values():
        try:
            process = psutil.Process(info["pid"])
            with process.oneshot():
                total, threads = process.cpu_times(), {t.id: t.user_time + t.system_time for t in process.threads()}
        except psutil.NoSuchProcess:
            continue
        out["all"] += total.user + total.system
        for role, tid in info["threads"].items():
            out[role] += threads.get(tid, 0.0)
    return dict(out)


def replica_threads_delta(before: Mapping[str, float], after: Mapping[str, float]) -> dict[str, float]:
    """The seconds each of the replicas' threads spent between two readings, and the rest of their processes."""
    out = {role: after.get(role, 0.0) - before.get(role, 0.0) for role in REPLICA_THREADS}
    out[SERVE_AND_RAY] = after.get("all", 0.0) - before.get("all", 0.0) - sum(out.values())
    return out


#: The metric the mix-aware router observes for each request it held within its spill grace.
HOLD_METRIC = "ray_deskgen_router_hold_seconds"


def holds(metrics_text: str) -> dict[tuple[str, float], float]:
    """The hold histogram's cumulative bucket counts in Prometheus text, summed over series by (outcome, le)."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[tuple[str, float], float] = collections.defaultdict(float)
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name == HOLD_METRIC + "_bucket":
                out[(sample.labels["outcome"], float(sample.labels["le"]))] += sample.value
    return dict(out)


def scrape_holds(app: ServeApp) -> dict[tuple[str, float], float]:
    time.sleep(3.0)  # Ray's metrics agent has the replicas' last second (reported every second)
    return holds(httpx.get(f"http://127.0.0.1:{app.metrics_port}/metrics", timeout=30).text)


def held_counts(held: dict[tuple[str, float], float]) -> tuple[float, float]:
    """The requests held that stayed and that spilled: each outcome's +Inf bucket."""
    return held.get(("stayed", float("inf")), 0.0), held.get(("spilled", float("inf")), 0.0)


def held_note(run: dict[str, Any]) -> str:
    """The requests a mix-aware router held within its spill grace: how many stayed on a holder (the counts
    had lagged a finished request) and how soon they left the hold, and how many spilled."""
    held = run.get("held", {})
    stayed = {le: n for (outcome, le), n in held.items() if outcome == "stayed"}
    total, spilled = held_counts(held)
    if total + spilled == 0:
        return f"{run['router']}: held no request within its spill grace."
    soon = (" (" + ", ".join(f"{100 * stayed.get(le, 0.0) / total:.0f} % within {1000 * le:g} ms" for le in (0.001, 0.002, 0.005))
            + ")") if total else ""  # fmt: skip
    return (f"{run['router']}: held {100 * (total + spilled) / run['requests']:.1f} requests per 100 within its spill "
            f"grace: {total:.0f} stayed on a holder of their mix{soon}"
            + f", {spilled:.0f} spilled.")  # fmt: skip


def run(app: ServeApp, base: dict[str, Any], router: str, spill_queue: int | None, grace_s: float,
        args: argparse.Namespace) -> dict[str, Any]:  # fmt: skip
    redeploy(app, router_config(base, args.replicas, spill_queue, grace_s), args.replicas)
    asyncio.run(drive(app.url, workload_mixes(args.workload), 1))  # warm: every mix once
    before = replica_infos(app, args.replicas)
    held_before = scrape_holds(app)
    cpu_before, threads_before = cpu_seconds(), replica_thread_seconds(before)
    results, wall = asyncio.run(drive(app.url, workload(args.requests, args.seed, args.zipf, args.workload), args.clients))
    cpu = cpu_by_role(cpu_before, cpu_seconds())
    threads = replica_threads_delta(threads_before, replica_thread_seconds(before))
    after = replica_infos(app, args.replicas)
    held = {key: n - held_before.get(key, 0.0) for key, n in scrape_holds(app).items()}
    switches, loads, load_s, adapter_loads, adapter_load_s = (
        sum(after[r][key] - before.get(r, {key: 0})[key] for r in after)
        for key in ("switches", "mix_loads", "mix_load_s", "adapter_loads", "adapter_load_s"))  # fmt: skip
    loads_by_label = label_deltas(before, after)
    ok = [r for r in results if r.get("ok")]
    waits = [r["queued_s"] for r in ok if "queued_s" in r]
    by_mix: dict[str, list[float]] = collections.defaultdict(list)
    parts: dict[str, list[tuple[float, float, float, float]]] = collections.defaultdict(list)
    spread: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for r in ok:
        by_mix[r["mix"]].append(r["latency_s"])
        if "outside_s" in r:
            parts[r["mix"]].append((r["queued_s"], r["activate_s"], r["generate_s"], r["outside_s"]))
        spread[r["mix"]][r.get("replica", "?")] += 1
    return {"router": router, "requests": len(results), "ok": len(ok), "switches": switches, "loads": loads, "wall_s": wall,
            "waits": waits, "latencies": by_mix, "parts": parts, "spread": spread,
            "rounds": [{"wait_p95": percentile(waits, 95), "rps": len(results) / wall}],
            "generate_s": [r["generate_s"] for r in ok], "switch_s": [r["activate_s"] for r in ok if r["activate_s"] > 0],
            "load_s": load_s, "adapter_loads": adapter_loads, "adapter_load_s": adapter_load_s,
            "loads_by_label": loads_by_label, "held": held, "busy": replicas_busy(results), "cpu": cpu,
            "replica_threads": threads}  # fmt: skip


def label_deltas(before: dict[str, dict[str, Any]], after: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """The replicas' mix-load counters by mix label (``loads_by_label`` of their info) between two readings,
    summed over the replicas."""
    out: dict[str, dict[str, float]] = collections.defaultdict(lambda: dict.fromkeys(LOAD_COUNTERS, 0))
    for replica, info in after.items():
        earlier = before.get(replica, {}).get("loads_by_label", {})
        for label, counts in info["loads_by_label"].items():
            for key in LOAD_COUNTERS:
                out[label][key] += counts[key] - earlier.get(label, {}).get(key, 0)
    return dict(out)


def merged(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rounds of each router as one run: switches and requests summed, waits and latencies pooled; each
    round's wait p95 and throughput kept in order (``rounds``) for the spread and the paired comparison."""
    out: dict[str, dict[str, Any]] = {}
    for r in runs:
        m = out.setdefault(r["router"], {"router": r["router"], "latencies": collections.defaultdict(list),
                                         "parts": collections.defaultdict(list), "spread": collections.defaultdict(list)})  # fmt: skip
        for key in ("requests", "ok", "switches", "loads", "wall_s", "load_s", "adapter_loads", "adapter_load_s"):
            m[key] = m.get(key, 0) + r[key]
        for key in ("waits", "rounds", "generate_s", "switch_s", "busy"):
            m[key] = m.get(key, []) + r[key]
        for key in ("latencies", "parts"):
            for mix, values in r[key].items():
                m[key][mix] += values
        held = m.setdefault("held", {})
        for key, n in r.get("held", {}).items():
            held[key] = held.get(key, 0.0) + n
        by_label = m.setdefault("loads_by_label", {})
        for label, counts in r.get("loads_by_label", {}).items():
            into = by_label.setdefault(label, dict.fromkeys(LOAD_COUNTERS, 0))
            for key, n in counts.items():
                into[key] += n
        for key in ("cpu", "replica_threads"):
            into = m.setdefault(key, {})
            for role, seconds in r.get(key, {}).items():
                into[role] = into.get(role, 0.0) + seconds
        # Per round: each round redeploys the app, so its replicas are new ones.
        for mix, counter in r["spread"].items():
            m["spread"][mix].append(len(counter))
    for m in out.values():
        m["wait_p50"], m["wait_p95"] = percentile(m["waits"], 50), percentile(m["waits"], 95)
        m["per_mix_p50"] = {mix: percentile(v, 50) for mix, v in m["latencies"].items()}
    return list(out.values())


def paired(runs: list[dict[str, Any]]) -> list[str]:
    """Each router against Serve's default round by round: rounds alternate routers on the same app, so a
    round's pair shares the machine's state of the moment (load, caches), which the pooled figures do not
    separate from the router."""
    base = next((r for r in runs if r["router"].startswith("serve")), None)
    notes = []
    for r in runs:
        if base is None or r is base or len(r["rounds"]) != len(base["rounds"]):
            continue
        pairs = list(zip(r["rounds"], base["rounds"], strict=True))
        lower = sum(x["wait_p95"] < y["wait_p95"] for x, y in pairs)
        faster = sum(x["rps"] > y["rps"] for x, y in pairs)
        notes.append(f"{r['router']} against {base['router']}, round by round: a lower wait p95 in {lower} of "
                     f"{len(pairs)} rounds, a higher throughput in {faster} of {len(pairs)}.")  # fmt: skip
    return notes


def costs(runs: list[dict[str, Any]]) -> str:
    """What a generation, a switch and an adapter load cost on the replicas in this run, every router pooled:
    the inputs of bench.router_sim's model with shared cores (``--image-s``, ``--switch-s``, ``--adapter-load-s``)."""
    generate_s = [x for r in runs for x in r["generate_s"]]
    switch_s = [x for r in runs for x in r["switch_s"]]
    mix_loads, load_s = sum(r["loads"] for r in runs), sum(r["load_s"] for r in runs)
    adapter_loads, adapter_load_s = sum(r["adapter_loads"] for r in runs), sum(r["adapter_load_s"] for r in runs)
    per_adapter = f"{adapter_load_s / adapter_loads:.2f} s per file" if adapter_loads else "none read"
    switches = (f"a switch p50 {1000 * percentile(switch_s, 50):.0f} ms (p95 {1000 * percentile(switch_s, 95):.0f}, "
                f"{len(switch_s)} switches)" if switch_s else "no switch")  # fmt: skip
    per_load = f"{1000 * (load_s - adapter_load_s) / mix_loads:.0f} ms per mix load" if mix_loads else "no mix load"
    return (f"Costs on the replicas, every router's rounds (the inputs of bench.router_sim's model with shared cores): "
            f"a generation p50 {percentile(generate_s, 50):.2f} s (p95 {percentile(generate_s, 95):.2f}, "
            f"{len(generate_s)} images, the switch not included); {switches}; {mix_loads} mix loads read "
            f"{adapter_loads} adapter file{'' if adapter_loads == 1 else 's'} ({per_adapter}); the rest of a load (trim, bookkeeping): {per_load}.")  # fmt: skip


def latency_p50_p95(run: dict[str, Any]) -> str:
    """Every answered request's latency (the client's: request sent to last event), all mixes pooled."""
    values = [x for latencies in run["latencies"].values() for x in latencies]
    return f"{1000 * percentile(values, 50):.0f} / {1000 * percentile(values, 95):.0f}" if values else "-"


def outside_p50_p95(run: dict[str, Any]) -> str:
    values = [p[3] for parts in run["parts"].values() for p in parts]
    return f"{1000 * percentile(values, 50):.0f} / {1000 * percentile(values, 95):.0f}" if values else "-"


def arms_note(run: dict[str, Any]) -> str:
    """How far the A/B arms' p50 latencies lie apart under one router, with a bootstrap interval, read against
    the goal of at most ARMS_GOAL apart: a few hundred latencies per arm leave several per cent of sampling
    error, so a point above or below the goal alone decides nothing."""
    control, other = ARMS
    d = p50_difference(run["latencies"][control], run["latencies"][other])
    if d.low > -ARMS_GOAL and d.high < ARMS_GOAL:
        verdict = f"within {100 * ARMS_GOAL:.0f} %"
    elif d.low > ARMS_GOAL or d.high < -ARMS_GOAL:
        verdict = f"more than {100 * ARMS_GOAL:.0f} % apart"
    else:
        verdict = f"not resolved against {100 * ARMS_GOAL:.0f} % by this sample"
    return (f"{run['router']}: the A/B arms' p50 differ by {100 * abs(d.point):.1f} % ({other} against {control}: "
            f"{100 * d.point:+.1f} %, {100 * d.level:.0f} % bootstrap interval {100 * d.low:+.1f} to {100 * d.high:+.1f} %; "
            f"{len(run['latencies'][control])} and {len(run['latencies'][other])} requests): {verdict}{where(run)}.")  # fmt: skip


def arm_loads_note(run: dict[str, Any]) -> str:
    """Each A/B arm's own mix loads (inside its requests' queue wait): how often its mix was not in its
    replica's cache, how many adapter files those loads read, and what they cost per request of the arm. An
    arm whose adapter no other hot mix uses loses it whenever its mix is evicted, and reads it again."""
    by_label = run.get("loads_by_label", {})

    def one(arm: str) -> str:
        n, counts = len(run["latencies"][arm]), by_label.get(arm, dict.fromkeys(LOAD_COUNTERS, 0))
        return (f"{arm} {100 * counts['mix_loads'] / n:.1f} loads per 100 of its requests, reading "
                f"{100 * counts['adapter_loads'] / n:.1f} files, {1000 * counts['mix_load_s'] / n:.0f} ms per request")  # fmt: skip

    return f"{run['router']}: each arm's own mix loads (inside its queue wait): " + "; ".join(one(a) for a in ARMS) + "."


def where(run: dict[str, Any]) -> str:
    """Where each arm's time goes, as means (which add up, unlike p50s): the wait in the replica's queue (with
    any mix load), the switch, the generation, and the rest outside the replica (ingress, router, transport);
    and the share of the arm's requests that found another mix active."""
    if not all(run["parts"].get(a) for a in ARMS):
        return ""

    def one(arm: str) -> str:
        parts = run["parts"][arm]
        queue, switch, generate, outside = (1000 * sum(p[i] for p in parts) / len(parts) for i in range(4))
        switched = sum(p[1] > 0 for p in parts) / len(parts)
        return (f"{arm} {queue:.0f} + {switch:.0f} + {generate:.0f} + {outside:.0f} ms "
                f"({100 * switched:.0f} % switched)")  # fmt: skip

    return "; mean queue + switch + generation + outside the replica: " + ", ".join(one(a) for a in ARMS)


def concurrency_table(runs: list[dict[str, Any]], replicas: int) -> Table:
    """Each router's generations grouped by how many replicas generated at once (:func:`replicas_busy`, rounded
    to the nearest whole replica): the share of generations in each group and their mean generation time. On a
    machine with fewer cores than replicas, a router that keeps more replicas generating at once makes each
    generation slower; the same group's times alike under both routers say the router is not the cause."""
    groups = range(1, replicas + 1)
    table = Table("Generations by how many replicas generated at once (time-weighted over each generation, its own "
                  "replica counted; the replicas share the machine's cores)",
                  ["router", "replicas generating at once (mean)",
                   *(f"{k} at once: share / mean generation (ms)" for k in groups)])  # fmt: skip
    for r in runs:
        busy = r.get("busy", [])
        if not busy:
            continue
        cells = []
        for k in groups:
            times = [g for b, g in busy if min(max(int(b + 0.5), 1), replicas) == k]
            cells.append(f"{100 * len(times) / len(busy):.0f} % / {1000 * sum(times) / len(times):.0f}" if times else "0 % / -")
        table.add(r["router"], f"{sum(b for b, _ in busy) / len(busy):.2f}", *cells)
    return table


def cpu_table(runs: list[dict[str, Any]]) -> Table:
    """Each router's CPU time per request by process, every round pooled, and all of it against the cores'
    time over the rounds' wall clock: what the router's own work costs on the Ingress, next to the replicas'."""
    roles = [r for r, _ in ROLES] + [CLIENTS, RAY]
    cores = os.cpu_count() or 1
    table = Table(f"CPU time per request by process (ms; user + system, every round pooled; {cores} cores)",
                  ["router", *roles, "all", "share of the cores' time"])  # fmt: skip
    for r in runs:
        cpu = r.get("cpu", {})
        if not cpu:
            continue
        total = sum(cpu.values())
        table.add(r["router"], *(f"{1000 * cpu.get(role, 0.0) / r['requests']:.1f}" for role in roles),
                  f"{1000 * total / r['requests']:.1f}", f"{100 * total / (cores * r['wall_s']):.0f} %")  # fmt: skip
    return table


def replica_threads_table(runs: list[dict[str, Any]]) -> Table:
    """The generator replicas' CPU time per request by thread: the replica's own work (the pipeline: loads,
    switches, generations; the request code's event loop; the adapter watch) against the rest of the process."""
    roles = [*REPLICA_THREADS, SERVE_AND_RAY]
    table = Table("The Generator replicas' CPU time per request by thread (ms; user + system, every round pooled)",
                  ["router", "pipeline (loads, switches, generations)", "request code's event loop (waits, PNG, events)",
                   "adapter watch", "the rest of the process (Serve's and Ray's threads)", "all"])  # fmt: skip
    for r in runs:
        threads = r.get("replica_threads", {})
        if not threads:
            continue
        table.add(r["router"], *(f"{1000 * threads.get(role, 0.0) / r['requests']:.1f}" for role in roles),
                  f"{1000 * sum(threads.values()) / r['requests']:.1f}")  # fmt: skip
    table.notes.append("Threads by the OS thread ids each replica reports (`info()['threads']`), their CPU time read "
                       "(psutil) before and after each round; the rest is the replica's process less those threads.")
    return table


def tables(runs: list[dict[str, Any]], args: argparse.Namespace) -> list[Table]:
    main = Table(f"Generator routing — {args.replicas} replicas, {args.rounds} x {args.requests} requests per router "
                 f"(rounds alternated), {args.clients} clients, "
                 f"{workload_title(args)}, tiny SDXL 64x64, 2 steps",
                 ["router", "mix switches / 100 requests", "mix loads / 100 requests", "queue wait p50 (ms)",
                  "queue wait p95 (ms)", "outside the replica p50 / p95 (ms)", "latency p50 / p95 (ms)", "req/s", "non-200",
                  "wait p95 by round (ms)", "req/s by round"])  # fmt: skip
    for r in runs:
        main.add(r["router"], f"{100 * r['switches'] / r['requests']:.1f}", f"{100 * r['loads'] / r['requests']:.1f}",
                 f"{1000 * r['wait_p50']:.0f}",
                 f"{1000 * r['wait_p95']:.0f}", outside_p50_p95(r), latency_p50_p95(r), f"{r['requests'] / r['wall_s']:.2f}",
                 r["requests"] - r["ok"],
                 " / ".join(f"{1000 * x['wait_p95']:.0f}" for x in r["rounds"]),
                 " / ".join(f"{x['rps']:.2f}" for x in r["rounds"]))  # fmt: skip
    main.notes += [*paired(runs), *(held_note(r) for r in runs if not r["router"].startswith("serve")), costs(runs)]
    mixes = [m for m in NAMED + ADHOC if all(m in r["per_mix_p50"] for r in runs)]
    per_mix = Table("p50 latency per mix (ms), and on how many replicas each mix ran in a round (fewest-most)",
                    ["mix", *[r["router"] for r in runs]])  # fmt: skip

    def replicas(counts: list[int]) -> str:
        return f"{min(counts)} repl." if min(counts) == max(counts) else f"{min(counts)}-{max(counts)} repl."

    for m in mixes:
        per_mix.add(m, *(f"{1000 * r['per_mix_p50'][m]:.0f} ({replicas(r['spread'][m])})" for r in runs))
    for r in runs:
        if all(a in r["latencies"] for a in ARMS) and len(ARMS) == 2:
            per_mix.notes += [arms_note(r), arm_loads_note(r)]
    per_mix.notes.append("A switch is a generation that found another mix active on its replica; a load, a request whose mix "
                         "was not in its replica's mix cache (the adapters it lacked loaded, inside the queue wait); "
                         "each replica's counters.")
    return [main, per_mix, concurrency_table(runs, args.replicas), cpu_table(runs), replica_threads_table(runs)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--requests", type=int, default=240)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--workload", choices=WORKLOADS, default="zipf",
                        help="zipf: the named and ad-hoc mixes by Zipf's law (default); ab: the default experiment's arms in its split")
    parser.add_argument("--zipf", type=float, default=1.1)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--spill-queues", default="0,1", help="the mix-aware router's thresholds to compare (default 0,1)")
    parser.add_argument("--spill-graces-ms", default=f"{1000 * SPILL_GRACE_S:g}",
                        help=f"the mix-aware router's spill graces to compare, ms (default {1000 * SPILL_GRACE_S:g}, the router's)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds per router, alternated (default 2)")
    parser.add_argument("--no-write", action="store_true", help="print the tables, do not append them to BENCHMARKS.md")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    tiny = models_dir()
    base = bench_serve_config(free_port(), tiny, tiny / "classifier" / "desk_gate.keras")
    runs = []
    graces = [float(g) / 1000 for g in args.spill_graces_ms.split(",")]
    routers: list[tuple[str, int | None, float]] = [("serve (default)", None, SPILL_GRACE_S)]
    routers += [(f"mix-aware, spill_queue {q}" + ("" if g == SPILL_GRACE_S else f", grace {1000 * g:g} ms"), int(q), g)
                for q in args.spill_queues.split(",") for g in graces]  # fmt: skip
    with ServeApp(router_config(base, args.replicas, None), num_cpus=4 + args.replicas,
                  num_gpus=1 + args.replicas, metrics_port=free_port()) as app:  # fmt: skip
        for round_ in range(args.rounds):
            for name, spill_queue, grace_s in round_order(routers, round_):
                log.info("round %d, router %s", round_ + 1, name)
                runs.append(run(app, base, name, spill_queue, grace_s, args))
                log.info("%s", {k: v for k, v in runs[-1].items() if k in ("router", "requests", "ok", "switches", "wall_s")})
    runs = merged(runs)
    section = render_section("Generator routing", tables(runs, args), command=command_line(),
                             wall_s=time.perf_counter() - started, host=machine(),
                             preface=[f"Machine load (1-min) at start {load_before:.1f}, at end {os.getloadavg()[0]:.1f}; "
                                      "clients run on the same machine; the replicas share its cores."])  # fmt: skip
    print(section)
    if not args.no_write:
        append_report(section)


if __name__ == "__main__":
    main()
