"""The app on a local multi-node cluster: placement, autoscaling, routing by mix, losing a replica.

The tests run in file order on one session cluster (conftest.py); each leaves it as it found it
(one Classifier replica, two Generator replicas). Measured times are printed (`pytest -s`) and
collected in the session's ``[cluster] measurements`` line; nothing asserts on a duration except
the generous bounds that keep every wait finite.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import copy
import os
import signal
import time
from pathlib import Path

import httpx
import pytest

from bench.common import metric_total
from deskgen.serve_config import deployment_config as deployment
from deskgen.serve_config import load_serve_config
from observability.dashboard import needing_more
from tests.cluster.conftest import APP, Outcome, RunningCluster, run_load
from tests.prometheus import running_prometheus

pytestmark = pytest.mark.cluster

MIX_A = "dalle_only"
MIX_B = "ott_only"


def sample_png(cluster: RunningCluster) -> bytes:
    return sorted((cluster.samples / "true").glob("*.png"))[0].read_bytes()


def mix_id(client: httpx.Client, name: str) -> str:
    mixes = client.get("/v1/mixes").json()["named_mixes"]
    return str(mixes[name]["id"])


def text2img(client: httpx.Client, mix: str, seed: int) -> httpx.Response:
    return client.post("/v1/text2img", json={"prompt": "a tidy desk with a lamp", "mix": mix, "seed": seed})


# ----------------------------------------------------------------------------------------------
# (a) placement
# ----------------------------------------------------------------------------------------------


def test_replicas_run_on_the_nodes_their_resources_pin(local_cluster: RunningCluster) -> None:
    """Ingress, Classifier, Recorder and JobConsumer (``cpu_node``) on the CPU head; Captioner, Locator and Generator (GPUs) on GPU
    nodes. Read from Serve's details through the dashboard (node ids) and the state API (resources)."""
    kinds = local_cluster.node_kinds()
    assert sorted(kinds.values()) == ["cpu"] + ["gpu"] * 2, kinds
    placed: dict[str, list[str]] = {}
    for name in ("Ingress", "Classifier", "Recorder", "JobConsumer", "Captioner", "Locator", "Generator"):
        replicas = local_cluster.running(name)
        assert replicas, f"no RUNNING {name} replica"
        placed[name] = sorted(kinds[r.node_id] for r in replicas)
        for r in replicas:  # the pid Serve reports is a live replica process of this machine
            cmdline = Path(f"/proc/{r.pid}/cmdline").read_bytes()
            assert f"ServeReplica:{APP}:{name}".encode() in cmdline, (r, cmdline[:200])
    print(f"\n[cluster] placement: {placed}")
    assert placed == {"Ingress": ["cpu"], "Classifier": ["cpu"], "Recorder": ["cpu"], "JobConsumer": ["cpu"],
                      "Captioner": ["gpu"], "Locator": ["gpu"], "Generator": ["gpu", "gpu"]}  # fmt: skip


def test_a_photo_job_runs_across_the_nodes_on_the_clusters_own_redis(local_cluster: RunningCluster) -> None:
    """POST /v1/jobs with a photo on the cluster as local.sh deployed it (its own Redis): the consumer on the
    CPU head runs the Ingress's pipeline, the gate on the CPU node, captions and the image on GPU nodes;
    the job succeeds within the wait and its PNG is served. A Redis the jobs could not reach would answer
    503 ``jobs_unavailable``; one speaking another protocol, an error."""
    photo = base64.b64encode(sample_png(local_cluster)).decode()
    with httpx.Client(base_url=local_cluster.url, timeout=90) as client:
        r = client.post("/v1/jobs", json={"generate": {"image_b64": photo, "mix": MIX_A, "seed": 5}},
                        headers={"Prefer": "wait=60"})  # fmt: skip
        assert r.status_code == 200, r.text
        job = r.json()
        assert job["status"] == "succeeded" and job["attempts"] == 1, job
        (image,) = job["images"]
        assert image["result"]["mix"]["name"] == MIX_A and image["result"]["desk_score"] is not None
        assert image["result"]["captions"], image["result"]  # the captioner ran (a GPU node)
        png = client.get(image["url"])
        assert png.status_code == 200 and png.content.startswith(b"\x89PNG")


# ----------------------------------------------------------------------------------------------
# (b) autoscaling
# ----------------------------------------------------------------------------------------------


#: Every wait in this tier is bounded by this: ~20x what the step takes here (a Classifier replica
#: starts in ~3-6 s on an idle 2-core machine, Serve decides in ~4-5 s; measured figures are printed).
WAIT_S = 120.0


def classifier_pids(cluster: RunningCluster) -> list[int]:
    return [r.pid for r in cluster.running("Classifier") if r.pid is not None]


#: The niceness of the Classifier replica that is RUNNING when the burst starts. CFS gives a nice-0
#: thread ~70x the CPU share of a nice-19 one when both want it.
SLOW_REPLICA_NICENESS = 19


def set_niceness(pids: list[int], niceness: int) -> None:
    """Every thread of each process (niceness is per thread on Linux: a Ray actor runs its work, gRPC
    and TensorFlow in threads other than the main one); threads started later inherit it."""
    for pid in pids:
        try:
            threads = [int(t.name) for t in Path(f"/proc/{pid}/task").iterdir()]
        except OSError:
            continue
        for tid in threads:
            try:
                os.setpriority(os.PRIO_PROCESS, tid, niceness)
            except OSError:  # gone, or (unprivileged) not allowed to lower it back
                continue


def test_a_classify_burst_scales_the_classifier_out_and_back_in(local_cluster: RunningCluster) -> None:
    """A burst on /v1/classify until Serve adds a Classifier replica; the new replica reaches RUNNING
    and serves; once the burst ends, Serve removes it. The deployed autoscaling_config is production's.

    On this machine every "node" shares the same two cores, and the tiny gate answers in milliseconds:
    closed-loop clients then saturate the proxy and ingress while few requests are in flight at the
    Classifier, so Serve's ongoing-request metric only crosses ``target_ongoing_requests`` in spikes
    and a replica it starts is withdrawn again (seen here, also with the busy processes confined to one
    CPU), or starves. So the replica running when the burst starts is made the bottleneck, as the real
    VGG16 gate is in production: it runs at nice 19. Requests then queue at the Classifier, the metric
    stays above the target, and the new replica (nice 0, like a replica on a node of its own) gets the
    CPU it needs to start. Clients are added ``target_ongoing_requests`` at a time every
    ``look_back_period_s`` until Serve decides, and the burst goes on until the new replica is RUNNING.
    Control: with ``max_replicas: 1`` (DESKGEN_CLUSTER_CONTROL=no-autoscale) no decision comes and
    this test fails."""
    deployed = deployment(local_cluster.config, "Classifier")["autoscaling_config"]
    if os.environ.get("DESKGEN_CLUSTER_CONTROL") != "no-autoscale":
        assert deployed == deployment(load_serve_config(), "Classifier")["autoscaling_config"]
    assert len(local_cluster.running("Classifier")) == 1
    png = sample_png(local_cluster)
    step, step_s, most = int(deployed["target_ongoing_requests"]), float(deployed["look_back_period_s"]), 64

    async def classify(client: httpx.AsyncClient) -> httpx.Response:
        return await client.post("/v1/classify", files={"image": ("desk.png", png, "image/png")})

    async def burst() -> tuple[list[Outcome], float | None, float | None, int]:
        stop = asyncio.Event()
        outcomes: list[Outcome] = []
        loads: list[asyncio.Task[list[Outcome]]] = []
        started = time.monotonic()
        decided = running = None
        slow = await asyncio.to_thread(classifier_pids, local_cluster)
        set_niceness(slow, SLOW_REPLICA_NICENESS)
        try:
            while decided is None and time.monotonic() - started < WAIT_S:
                if len(loads) * step < most and time.monotonic() - started >= len(loads) * step_s:
                    loads.append(asyncio.create_task(
                        run_load(local_cluster.url, classify, concurrency=step, stop=stop, outcomes=outcomes)
                    ))  # fmt: skip
                await asyncio.sleep(0.5)
                if len(await asyncio.to_thread(local_cluster.replicas, "Classifier")) > 1:
                    decided = time.monotonic() - started
            if decided is not None:
                while running is None and time.monotonic() - started - decided < WAIT_S:
                    await asyncio.sleep(0.25)
                    replicas = await asyncio.to_thread(local_cluster.replicas, "Classifier")
                    if os.environ.get("DESKGEN_CLUSTER_DEBUG"):
                        print("DBG", round(time.monotonic() - started, 1), [(r.state, r.pid) for r in replicas],
                              len(outcomes), Path("/proc/loadavg").read_text().split()[:3], flush=True)
                    if sum(r.state == "RUNNING" for r in replicas) >= 2:
                        running = time.monotonic() - started - decided
        finally:
            stop.set()
            set_niceness(slow, 0)
            await asyncio.gather(*loads)
        return outcomes, decided, running, len(loads) * step

    outcomes, decided, running, clients = asyncio.run(burst())
    assert decided is not None, f"Serve did not add a Classifier replica within {WAIT_S:.0f} s ({len(outcomes)} requests)"
    assert running is not None, (
        f"the second Classifier replica was not RUNNING within {WAIT_S:.0f} s of the decision; replicas now: "
        f"{[(r.state, r.pid, r.node_id[:8]) for r in local_cluster.replicas('Classifier')]}"
    )
    assert {o.status for o in outcomes} == {200}, [o for o in outcomes if o.status != 200][:3]
    # The service answers while Serve has two replicas.
    with httpx.Client(base_url=local_cluster.url, timeout=60) as client:
        answers = [client.post("/v1/classify", files={"image": ("desk.png", png, "image/png")}) for _ in range(4)]
    assert [a.status_code for a in answers] == [200] * 4

    down = None
    idle_since = time.monotonic()
    while down is None and time.monotonic() - idle_since < WAIT_S:
        replicas = local_cluster.replicas("Classifier")
        if len(replicas) == 1 and replicas[0].state == "RUNNING":
            down = time.monotonic() - idle_since
        else:
            time.sleep(0.5)
    assert down is not None, f"the Classifier did not scale back to 1 replica within {WAIT_S:.0f} s"
    local_cluster.measurements.update(
        classifier_upscale_decision_s=decided, classifier_new_replica_running_s=running, classifier_downscale_s=down
    )
    print(
        f"\n[cluster] classify burst of {clients} clients: {len(outcomes)} requests, all 200; 2nd replica decided "
        f"after {decided:.1f} s; RUNNING {running:.1f} s after the decision; back to 1 replica {down:.1f} s after the load"
    )


# ----------------------------------------------------------------------------------------------
# (c) routing by mix
# ----------------------------------------------------------------------------------------------


def test_a_mix_is_served_by_the_generator_replica_holding_it(local_cluster: RunningCluster) -> None:
    """With two Generator replicas, the requests of a mix keep going to the replica that loaded it
    (X-Deskgen-Replica), and ``Generator.info`` routed by the mix's id reports the same replica."""
    replica_ids = {r.replica_id for r in local_cluster.running("Generator")}
    assert len(replica_ids) == 2
    with httpx.Client(base_url=local_cluster.url, timeout=60) as client:
        holders: dict[str, str] = {}
        for name in (MIX_A, MIX_B):
            mix = mix_id(client, name)
            first = text2img(client, name, seed=1)
            assert first.status_code == 200, first.text
            assert first.headers["content-type"] == "image/png"
            assert first.headers["x-deskgen-mix"] == mix
            holders[mix] = first.headers["x-deskgen-replica"]
            assert holders[mix] in replica_ids
            # The replica reports its loaded mixes to the controller every 0.1 s and the controller
            # pushes them to the ingress's router: give that a moment before relying on it.
            time.sleep(1.0)
            served_by = [text2img(client, name, seed=2 + i).headers.get("x-deskgen-replica") for i in range(6)]
            assert served_by == [holders[mix]] * 6, (name, holders[mix], served_by)

    for mix, holder in holders.items():
        infos = local_cluster.generator_info(mix=mix, calls=16)
        assert [i["replica"] for i in infos] == [holder], (mix, holder, infos)
        assert mix in infos[0]["cached_mixes"]
    everyone = {i["replica"]: i for i in local_cluster.generator_info(calls=16)}
    assert set(everyone) == replica_ids
    for mix, holder in holders.items():
        others = [rid for rid in replica_ids if rid != holder]
        assert all(mix not in everyone[rid]["cached_mixes"] for rid in others), everyone
    print(f"\n[cluster] mix holders: {holders}")


def serve_hot_mix(cluster: RunningCluster, mix: str, requests: int, clients: int) -> collections.Counter[str]:
    """``clients`` closed-loop clients send ``requests`` generations of one mix; which replica served each."""
    seeds = iter(range(5000, 5000 + requests))

    async def generate(client: httpx.AsyncClient) -> httpx.Response:
        return await client.post("/v1/text2img", json={"prompt": "a desk by a window", "mix": mix, "seed": next(seeds, 0)})

    async def scenario() -> list[Outcome]:
        stop = asyncio.Event()
        done: list[Outcome] = []
        load = asyncio.create_task(run_load(cluster.url, generate, concurrency=clients, stop=stop, max_attempts=30,
                                            outcomes=done))  # fmt: skip
        deadline = time.monotonic() + WAIT_S
        while len(done) < requests and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        stop.set()
        return await load

    outcomes = asyncio.run(scenario())
    assert len(outcomes) >= requests and all(o.status == 200 for o in outcomes), [o for o in outcomes if o.status != 200][:3]
    return collections.Counter(o.replica for o in outcomes)


def test_a_hot_mix_takes_a_second_replica_with_the_mix_aware_router_and_not_without(local_cluster: RunningCluster) -> None:
    """Two clients keep one mix busy. The mix-aware router (serve_config.yaml, deployments/routing.py) sends
    the mix to the idle replica too once its holder is busy (``spill_queue`` 0), so both replicas serve it.
    Control, in the same run: the app redeployed without ``request_router_config`` (Serve's default
    router) keeps every request of the mix on the replica that holds it while the other one idles (its
    queue never passes ``max_ongoing_requests``: two clients, two places). The router is then restored."""
    routed = deployment(local_cluster.config, "Generator").get("request_router_config", {})
    assert routed.get("request_router_class") == "deployments.routing:MixAwareRouter", routed
    with httpx.Client(base_url=local_cluster.url, timeout=60) as client:
        assert text2img(client, MIX_A, seed=1).status_code == 200  # the mix is held by one replica
    time.sleep(2.0)  # routing stats (every 1 s) and loaded mixes reach the router
    with_router = serve_hot_mix(local_cluster, MIX_A, requests=24, clients=2)
    print(f"\n[cluster] hot mix, mix-aware router: served by {dict(with_router)}")
    assert len(with_router) == 2 and min(with_router.values()) >= 3, with_router

    serve_default = copy.deepcopy(local_cluster.config)
    deployment(serve_default, "Generator").pop("request_router_config")
    # New Ingress replicas, whose Generator handles get the new router (redeploy's docstring says why).
    options = deployment(serve_default, "Ingress").setdefault("ray_actor_options", {})
    options.setdefault("runtime_env", {}).setdefault("env_vars", {})["DESKGEN_GENERATOR_ROUTER"] = "serve"
    mix_aware = local_cluster.config
    try:
        local_cluster.measurements["redeploy_router_off_s"] = local_cluster.redeploy(serve_default)
        with httpx.Client(base_url=local_cluster.url, timeout=60) as client:
            assert text2img(client, MIX_A, seed=1).status_code == 200
        time.sleep(2.0)
        control = serve_hot_mix(local_cluster, MIX_A, requests=24, clients=2)
        print(f"[cluster] hot mix, Serve's default router: served by {dict(control)}")
        assert len(control) == 1, control
    finally:
        local_cluster.measurements["redeploy_router_on_s"] = local_cluster.redeploy(mix_aware)


#: An ad-hoc mix that no other test sends: held by the one replica that loaded it.
HELD_MIX = "ott:0.35"


def hold_counts(cluster: RunningCluster) -> dict[str, float]:
    """``ray_deskgen_router_hold_seconds_count`` by outcome, summed over every node's metrics endpoint."""
    texts = [httpx.get(f"http://{target}/metrics", timeout=30).text for target in cluster.cluster.metrics_targets]
    return {outcome: sum(metric_total(t, "ray_deskgen_router_hold_seconds_count", {"outcome": outcome}) for t in texts)
            for outcome in ("stayed", "spilled")}  # fmt: skip


def test_a_request_for_a_busy_holder_is_held_then_spills_and_the_dashboard_shows_it(local_cluster: RunningCluster) -> None:
    """One replica holds an ad-hoc mix and is busy with a long generation of it; the other idles. A request of
    the mix is hot by the router's counts: it is held within ``spill_grace_s``, then offered to the idle
    replica first, which serves it (X-Deskgen-Replica), and the hold is counted ``spilled``. (Run after the
    router test's redeploys, the idle replica is new to the Ingress's router, which has no queue length of
    it: offered in one rank with the holder, Serve took the holder, whose length it had.) The dashboard's
    hold panels, which the observability tier (one Generator replica) cannot fill, return data from a real
    Prometheus scraping every node of the cluster."""
    larger = needing_more()
    assert any("router_hold" in e for e in larger), larger
    with running_prometheus(local_cluster.cluster.metrics_targets) as prometheus, \
            httpx.Client(base_url=local_cluster.url, timeout=60) as client:  # fmt: skip
        deadline = time.monotonic() + WAIT_S
        while not prometheus.targets_up():
            assert time.monotonic() < deadline, f"Prometheus never scraped every node: {prometheus.targets_health()}"
            time.sleep(0.5)
        first = text2img(client, HELD_MIX, seed=1)
        assert first.status_code == 200, first.text
        holder = first.headers["x-deskgen-replica"]
        time.sleep(2.0)  # the holder's loaded and active mix reach the router (stats every 1 s)
        before = hold_counts(local_cluster)
        body = {"prompt": "a tidy desk with a lamp", "mix": HELD_MIX, "steps": 150, "width": 512, "height": 512,
                "timeout_s": 30}  # fmt: skip
        # The idle holder takes the long generation; it runs until the block ends (which cancels it).
        with client.stream("POST", "/v1/text2img", json=body, headers={"Accept": "text/event-stream"}) as long:
            assert long.status_code == 200
            lines = long.iter_lines()
            next(lines)
            # Three stats periods: the holder's report of a request in flight reaches the router (the
            # router sees a replica busy only when its own count and the report agree).
            time.sleep(3.0)
            spilled = text2img(client, HELD_MIX, seed=2)
        assert spilled.status_code == 200, spilled.text
        assert spilled.headers["x-deskgen-replica"] != holder, (
            f"the request waited for its busy holder {holder}: holds {before} -> {hold_counts(local_cluster)}; "
            f"replicas {[(i['replica'], i['cached_mixes'], i['generations']) for i in local_cluster.generator_info(calls=16)]}")
        deadline = time.monotonic() + WAIT_S
        while (after := hold_counts(local_cluster)).get("spilled", 0) < before.get("spilled", 0) + 1:
            assert time.monotonic() < deadline, f"no spilled hold counted: before {before}, after {after}"
            time.sleep(0.5)
        left = list(larger)
        while left:
            assert time.monotonic() < deadline, f"dashboard queries without data: {left}; {prometheus.scrape_report()}"
            time.sleep(1)
            left = [e for e in left if not prometheus.query(e)]
    print(f"\n[cluster] a request for a busy holder spilled to {spilled.headers['x-deskgen-replica']} (holder "
          f"{holder}); holds by outcome {before} -> {after}; the dashboard's {len(larger)} hold queries return data")


# ----------------------------------------------------------------------------------------------
# (d) losing a replica under load
# ----------------------------------------------------------------------------------------------


def test_killing_a_generator_replica_under_load_loses_no_accepted_request(local_cluster: RunningCluster) -> None:
    """SIGKILL of the busiest Generator replica's process while 6 clients send /v1/text2img.

    "Accepted" = answered with anything but a 503 carrying Retry-After: a 503 + Retry-After is the
    service declining a request cleanly, and the clients retry it (waiting min(Retry-After, 1 s)).
    So: no transport error, no other status, every 503 carries Retry-After, every request ends in
    200 within its retries — and the service answers again within seconds."""
    before = {r.replica_id: r for r in local_cluster.running("Generator")}
    assert len(before) == 2
    seeds = iter(range(1000, 100000))

    async def generate(client: httpx.AsyncClient) -> httpx.Response:
        seed = next(seeds)
        mix = MIX_A if seed % 2 else MIX_B
        return await client.post("/v1/text2img", json={"prompt": "a desk by a window", "mix": mix, "seed": seed})

    async def scenario() -> tuple[list[Outcome], str, float, float | None]:
        stop = asyncio.Event()
        done: list[Outcome] = []
        load = asyncio.create_task(
            run_load(local_cluster.url, generate, concurrency=6, stop=stop, max_attempts=30, outcomes=done)
        )
        try:
            # 1. Warm load until both replicas have answered, then kill the busiest one.
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                await asyncio.sleep(0.5)
                if sum(o.status == 200 for o in done) >= 12:
                    break
            served = [o.replica for o in done if o.status == 200]
            victim = max(before, key=served.count)
            pid = before[victim].pid
            assert pid is not None
            killed_at = time.monotonic()
            os.kill(pid, signal.SIGKILL)
            # 2. Keep the load on until Serve has replaced the replica (and 2 s more).
            replaced = None
            while time.monotonic() - killed_at < WAIT_S:
                await asyncio.sleep(0.5)
                now = {r.replica_id for r in await asyncio.to_thread(local_cluster.running, "Generator")}
                if len(now) == 2 and victim not in now:
                    replaced = time.monotonic() - killed_at
                    break
            await asyncio.sleep(2.0)
        finally:
            stop.set()
        return await load, victim, killed_at, replaced

    outcomes, victim, killed_at, replaced = asyncio.run(scenario())
    lost = [o for o in outcomes if o.status != 200]
    assert not lost, f"{len(lost)} of {len(outcomes)} requests did not end in 200: {lost[:3]}"
    after_kill = [o for o in outcomes if o.started >= killed_at]
    assert after_kill, "no request was sent after the kill"
    first_ok_after_kill = min(o.finished for o in after_kill) - killed_at
    # Requests in flight at the kill: how long until they (after retries) got their image.
    in_flight = [o for o in outcomes if o.started < killed_at < o.finished]
    worst_in_flight = max((o.finished - killed_at for o in in_flight), default=0.0)
    retried = sum(o.retry_afters for o in outcomes)
    assert replaced is not None, f"replica {victim} was not replaced within {WAIT_S:.0f} s"
    local_cluster.measurements.update(
        kill_first_success_after_s=first_ok_after_kill,
        kill_worst_in_flight_s=worst_in_flight,
        kill_replica_replaced_s=replaced,
    )
    print(
        f"\n[cluster] killed generator {victim}: {len(outcomes)} requests, all 200; {retried} clean 503s retried; "
        f"{len(in_flight)} in flight at the kill, all answered within {worst_in_flight:.1f} s; "
        f"first success of a request sent after the kill {first_ok_after_kill:.2f} s; "
        f"replacement RUNNING after {replaced:.1f} s"
    )

