"""The cluster tier: the app from serve_config.yaml on a local multi-node Ray cluster (cluster/local.sh).

One cluster per session: a CPU head node (``cpu_node``) and two GPU nodes declaring two logical GPUs
each (``gpu_node``), deployed with ``serve deploy`` of a copy of serve_config.yaml that differs only
in what a test on a 2-core machine needs:

* ``args``: the tiny models of the ``tiny_models`` fixture;
* Generator: ``num_replicas: 2`` instead of autoscaling (routing by mix and the replica kill need two);
* Ingress ``user_config``: 64 px, 2 steps (tiny generations) and ``retry_after_s: 1`` (clients retry soon);
* ``args.jobs.redis_url``: the cluster's own Redis (local.sh starts it on the port given here), and the
  experiment store and image store in temporary folders.

Everything else — resources, the Classifier's autoscaling_config, queue limits — is production's
(``DESKGEN_CLUSTER_CONTROL=no-autoscale`` caps the Classifier at one replica: the control run in which
the autoscaling test must fail).
Traffic goes to 127.0.0.1 only; every wait is bounded.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from cluster.dashboard import ReplicaInfo
from cluster.local import LocalCluster, wait_ready
from deskgen.paths import PROJECT_ROOT
from deskgen.serve_config import app_args, load_serve_config, with_models
from deskgen.serve_config import deployment_config as deployment

APP = "deskgen"
LOCAL_SH = PROJECT_ROOT / "cluster" / "local.sh"
GPU_NODES = 2


def cluster_test_config(models: Path, redis_port: int) -> dict[str, Any]:
    """serve_config.yaml with the overrides listed in the module docstring, nothing else."""
    # The experiment store in a temporary folder, not the work tree's build/.
    store = Path(tempfile.mkdtemp(prefix="deskgen-cluster-experiments-")) / "experiments.db"
    production = app_args(load_serve_config())
    images = {**production["image_store"], "dir": str(store.parent / "images")}
    jobs = {**production["jobs"], "redis_url": f"redis://127.0.0.1:{redis_port}/0"}
    config = with_models(load_serve_config(), models, experiments_db=f"sqlite:///{store}", image_store=images,
                         jobs=jobs)  # fmt: skip
    if os.environ.get("DESKGEN_CLUSTER_CONTROL") == "no-autoscale":
        # The control run of the autoscaling test: a Classifier that may never scale out must fail it.
        deployment(config, "Classifier")["autoscaling_config"]["max_replicas"] = 1
    generator = deployment(config, "Generator")
    generator.pop("autoscaling_config", None)
    generator["num_replicas"] = 2
    deployment(config, "Ingress")["user_config"].update(
        default_steps=2, default_width=64, default_height=64, retry_after_s=1, request_timeout_s=60
    )
    return config


def _bindable(port: int) -> bool:
    for host in ("127.0.0.1", "0.0.0.0"):
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
            except OSError:
                return False
    return True


def free_block(size: int, low: int, high: int) -> int:
    """The first port of ``size`` consecutive free ports in [low, high)."""
    for _ in range(200):
        base = random.randrange(low, high - size)
        if all(_bindable(p) for p in range(base, base + size)):
            return base
    raise RuntimeError(f"no {size} consecutive free ports in [{low}, {high})")


@dataclass
class RunningCluster:
    """The session's cluster: where it is, what was deployed, and helpers to look inside."""

    cluster: LocalCluster
    config: dict[str, Any]
    start_seconds: float
    samples: Path
    measurements: dict[str, float] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return self.cluster.http_url

    def replicas(self, deployment_name: str) -> list[ReplicaInfo]:
        with self.cluster.dashboard() as dashboard:
            return dashboard.replicas(APP, deployment_name)

    def running(self, deployment_name: str) -> list[ReplicaInfo]:
        return [r for r in self.replicas(deployment_name) if r.state == "RUNNING"]

    def node_kinds(self) -> dict[str, str]:
        """node_id -> ``cpu`` / ``gpu`` (from the resources each node declares), alive nodes only."""
        with self.cluster.dashboard() as dashboard:
            return {n.node_id: n.kind for n in dashboard.nodes() if n.alive}

    def redeploy(self, config: dict[str, Any], timeout_s: float = 240) -> float:
        """``serve deploy`` of ``config`` (what ops do), then wait until the Ingress replicas that ran before
        are gone, the app is RUNNING with two RUNNING Generator replicas, and /readyz answers; returns the
        seconds it took. A handle keeps the request router it was created with, so a change of the
        Generator's router reaches the Ingress only through new Ingress replicas: ``config`` must change
        the Ingress's ``ray_actor_options`` (which restarts them) when it changes the router."""
        start = time.perf_counter()
        ingress_before = {r.replica_id for r in self.replicas("Ingress")}
        path = self.cluster.state_dir / "serve_config.redeploy.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        serve_cli = Path(sys.executable).with_name("serve")
        proc = subprocess.run([str(serve_cli), "deploy", str(path), "-a", self.cluster.dashboard_url],
                              env=self.cluster.client_env(), capture_output=True, text=True, timeout=120)  # fmt: skip
        assert proc.returncode == 0, f"serve deploy failed:\n{proc.stdout}\n{proc.stderr}"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            ingress = self.replicas("Ingress")
            generators = self.replicas("Generator")
            if (ingress and all(r.state == "RUNNING" and r.replica_id not in ingress_before for r in ingress)
                    and len(generators) == 2 and all(r.state == "RUNNING" for r in generators)):  # fmt: skip
                wait_ready(self.cluster, max(deadline - time.monotonic(), 1.0))
                self.config = config
                return time.perf_counter() - start
            time.sleep(1.0)
        raise TimeoutError(f"the redeployed app did not settle within {timeout_s:.0f} s")

    def generator_info(self, mix: str | None = None, calls: int = 8) -> list[dict[str, Any]]:
        """``Generator.info()`` of each replica answering ``calls`` handle calls (cluster.probe, a
        separate Ray driver); with ``mix`` the calls are routed like generations of that mix."""
        command = [sys.executable, "-m", "cluster.probe", str(self.cluster.state_dir), "generator-info", "--calls", str(calls)]
        if mix is not None:
            command += ["--mix", mix]
        proc = subprocess.run(
            command, env=self.cluster.client_env(), cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 0, f"cluster.probe failed:\n{proc.stdout}\n{proc.stderr}"
        return json.loads(proc.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def local_cluster(tiny_models: Path) -> Iterator[RunningCluster]:
    """cluster/local.sh start with the test config and free ports; local.sh stop after the module's tests
    (not at the end of the whole run: its three nodes would slow every later tier on a small machine)."""
    # A short state dir: Ray's Unix socket paths under it must stay below 108 bytes.
    state = Path(tempfile.mkdtemp(prefix="dgc-", dir="/tmp"))
    redis_port = free_block(1, 29000, 30000)  # a range none of the ports below come from
    config = cluster_test_config(tiny_models, redis_port)
    config_path = state / "serve_config.cluster-test.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    http = free_block(3, 30000, 40000)
    dashboard, gcs = http + 1, http + 2
    env = dict(os.environ)
    for key in ("RAY_ADDRESS", "RAY_OVERRIDE_RESOURCES", "RAY_AUTH_TOKEN"):
        env.pop(key, None)
    env.update(
        DESKGEN_CLUSTER_DIR=str(state),
        DESKGEN_SERVE_CONFIG=str(config_path),
        DESKGEN_CLUSTER_HTTP_PORT=str(http),
        DESKGEN_CLUSTER_DASHBOARD_PORT=str(dashboard),
        DESKGEN_CLUSTER_GCS_PORT=str(gcs),
        DESKGEN_CLUSTER_REDIS_PORT=str(redis_port),
        DESKGEN_CLUSTER_PORT_BASE=str(free_block(20 * (GPU_NODES + 1), 40000, 50000)),
        DESKGEN_CLUSTER_WORKER_PORT_BASE=str(free_block(200 * (GPU_NODES + 1), 50000, 60000)),
        DESKGEN_CLUSTER_GPU_NODES=str(GPU_NODES),
        DESKGEN_CLUSTER_GPUS="2",
        DESKGEN_CLUSTER_TIMEOUT="240",
    )
    start = time.perf_counter()
    try:
        proc = subprocess.run([str(LOCAL_SH), "start"], env=env, capture_output=True, text=True, timeout=420)
        if proc.returncode != 0:
            pytest.fail(f"cluster/local.sh start failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        start_seconds = time.perf_counter() - start
        print(f"\n[cluster] local.sh start: {start_seconds:.1f} s\n{proc.stdout}")
        running = RunningCluster(LocalCluster.load(state), config, start_seconds, tiny_models / "samples")
        yield running
        if running.measurements:
            print("\n[cluster] measurements: " + json.dumps({k: round(v, 2) for k, v in running.measurements.items()}))
    finally:
        stop = subprocess.run([str(LOCAL_SH), "stop"], env=env, capture_output=True, text=True, timeout=120)
        print(f"[cluster] local.sh stop: {stop.stdout.strip()} {stop.stderr.strip()}")
        if os.environ.get("DESKGEN_CLUSTER_KEEP_LOGS") != "1":
            shutil.rmtree(state, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# Load generation
# ----------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    """What one logical request (with its retries of 503s) came to."""

    status: int | None  # the final HTTP status; None for a transport error
    attempts: int
    started: float  # time.monotonic() of the first attempt
    finished: float
    replica: str = ""
    retry_afters: int = 0  # 503s answered with Retry-After (retried)
    error: str = ""


async def send_with_retries(
    client: httpx.AsyncClient,
    request: Callable[[httpx.AsyncClient], Awaitable[httpx.Response]],
    *,
    max_attempts: int,
    max_wait_s: float = 1.0,
) -> Outcome:
    """Send until an answer other than a 503 with Retry-After (waiting min(Retry-After, max_wait_s)).

    A 503 *without* Retry-After, any other status or a transport error ends the request at once."""
    started = time.monotonic()
    retried = 0
    for attempt in range(1, max_attempts + 1):
        try:
            response = await request(client)
        except httpx.HTTPError as exc:
            return Outcome(None, attempt, started, time.monotonic(), retry_afters=retried, error=repr(exc))
        retry_after = response.headers.get("retry-after")
        if response.status_code == 503 and retry_after is not None and attempt < max_attempts:
            retried += 1
            await asyncio.sleep(min(float(retry_after), max_wait_s))
            continue
        return Outcome(
            response.status_code,
            attempt,
            started,
            time.monotonic(),
            replica=response.headers.get("x-deskgen-replica", ""),
            retry_afters=retried,
            error="" if response.status_code == 200 else response.text[:300],
        )
    raise AssertionError("unreachable")


async def run_load(
    base_url: str,
    request: Callable[[httpx.AsyncClient], Awaitable[httpx.Response]],
    *,
    concurrency: int,
    stop: asyncio.Event,
    max_attempts: int = 1,
    outcomes: list[Outcome] | None = None,
) -> list[Outcome]:
    """``concurrency`` closed-loop clients sending ``request`` until ``stop`` is set; every finished
    request is appended to ``outcomes`` as it ends (pass a list to watch them live)."""
    outcomes = [] if outcomes is None else outcomes

    async def client_loop(client: httpx.AsyncClient) -> None:
        while not stop.is_set():
            outcomes.append(await send_with_retries(client, request, max_attempts=max_attempts))

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base_url, timeout=60, limits=limits) as client:
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
    return outcomes
