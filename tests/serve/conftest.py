"""The serve tier: the real application from serve_config.yaml on a real local Ray, over real HTTP.

The app is deployed exactly as `serve run serve_config.yaml` / `serve deploy` do (the YAML validated
into ServeDeploySchema and applied by the Serve controller), with a few test overrides: one replica
per stage, tiny generation defaults and a tight generator queue so backpressure is reachable.
"""

from __future__ import annotations

import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from deskgen.serve_config import app_args, load_serve_config, with_models
from deskgen.serve_config import deployment_config as deployment
from deskgen.tools.samples import desk_scene, non_desk_scene

from .helpers import png_bytes

APP = "deskgen"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


#: Signs the webhooks of the tier's app (open API: the ingress's own `webhook_secret`).
WEBHOOK_SECRET = "whsec_" + "dGVzdC1zZWNyZXQtb2YtdGhlLXNlcnZlLXRpZXI="


#: The tier's Generator cache: fewer mixes than serve_config.yaml's 4, so a test can tell the configured size
#: reached Serve's multiplexed LRU.
TIER_CACHE = {"mixes": 3}


def test_config(port: int, models: Path, lora_dir: Path, experiments_db: str, image_store: Path,
                redis_url: str) -> dict[str, Any]:  # fmt: skip
    # Jobs: the tier's own Redis; a dead consumer's job redelivered within seconds; quick webhook retries.
    jobs = {**app_args(load_serve_config())["jobs"], "redis_url": redis_url, "redelivery_s": 10, "lease_s": 3,
            "max_queued": 6, "idempotency_lease_s": 5, "webhooks": {"max_attempts": 3, "base_delay_s": 0.2, "max_total_s": 5, "timeout_s": 5}}  # fmt: skip
    config = with_models(load_serve_config(), models, lora_dir=str(lora_dir), experiments_db=experiments_db,
                         image_store={**app_args(load_serve_config())["image_store"], "dir": str(image_store)},
                         jobs=jobs, generator_cache=TIER_CACHE)  # fmt: skip
    config["http_options"] = {"host": "127.0.0.1", "port": port}
    (app,) = config["applications"]
    for d in app["deployments"]:
        d.pop("autoscaling_config", None)
        d["num_replicas"] = 1
    ingress = deployment(config, "Ingress")["user_config"]
    ingress.update(default_steps=2, default_width=64, default_height=64, max_side=512, request_timeout_s=60,
                   webhook_secret=WEBHOOK_SECRET, webhook_allow=["127.0.0.1"])  # fmt: skip
    generator = deployment(config, "Generator")
    generator.update(max_ongoing_requests=1, max_queued_requests=2)
    # Every product counts as found: the tiny detector's random scores then never decide a test.
    deployment(config, "Locator")["user_config"]["threshold"] = 0.0
    return config


def deploy(config: dict[str, Any], timeout_s: float = 300) -> None:
    """Apply ``config`` through the Serve controller (what `serve deploy` does) and wait until the
    app is RUNNING; a failed deployment raises with Serve's own messages."""
    from ray import serve
    from ray.serve._private.api import serve_start
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(config)
    client = serve_start(http_options=config["http_options"])
    client.deploy_apps(schema)
    deadline = time.monotonic() + timeout_s
    while True:
        app = serve.status().applications.get(APP)
        if app is not None and app.status == "RUNNING":
            return
        if app is not None and app.status in ("DEPLOY_FAILED", "UNHEALTHY"):
            details = {name: d.message for name, d in app.deployments.items() if d.message}
            raise RuntimeError(f"deskgen {app.status}: {app.message} {details}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"deskgen not RUNNING after {timeout_s} s: {app}")
        time.sleep(0.5)


@pytest.fixture(scope="session")
def lora_dir(tiny_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The app's LoRA folder: a private copy of the tiny adapters, so a test may add or remove files."""
    folder = tmp_path_factory.mktemp("loras")
    for path in (tiny_models / "loras").glob("*.safetensors"):
        shutil.copy2(path, folder / path.name)
    return folder


@pytest.fixture(scope="session")
def experiments_db(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The app's experiment store: a SQLite file of its own (the PostgreSQL tier overrides this)."""
    return f"sqlite:///{tmp_path_factory.mktemp('experiments') / 'experiments.db'}"


@pytest.fixture(scope="session")
def image_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The app's image store folder (delivered PNGs by image id), of its own."""
    return tmp_path_factory.mktemp("images")


@pytest.fixture(scope="session")
def redis_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("redis")


@pytest.fixture(scope="session")
def redis_url(redis_dir: Path) -> Iterator[str]:
    """The app's Redis (jobs and idempotency keys), in a temporary folder of its own."""
    from deskgen.tools.redis import running_redis

    with running_redis(redis_dir) as url:
        yield url


@pytest.fixture(scope="session")
def serve_app(tiny_models: Path, lora_dir: Path, experiments_db: str, image_store: Path,
              redis_url: str, redis_dir: Path) -> Iterator[dict[str, Any]]:  # fmt: skip
    """Deploy the app once per session; yields {"url", "config", "deploy_seconds"}."""
    import ray
    from ray import serve

    port, metrics_port = free_port(), free_port()
    config = test_config(port, tiny_models, lora_dir, experiments_db, image_store, redis_url)
    # Ray's Prometheus endpoint on a known port (the observability tier scrapes it), reporting every second.
    # 4.25 logical CPUs are what the app's replicas reserve; a whole one more is for the LoRA training job
    # of test_lora_training.py (a Ray Train worker on the app's own cluster, as on a real one).
    ray.init(num_cpus=6, num_gpus=2, resources={"cpu_node": 1000}, include_dashboard=False, namespace="serve",
             log_to_driver=False, _metrics_export_port=metrics_port, _system_config={"metrics_report_interval_ms": 1000})  # fmt: skip
    start = time.perf_counter()
    deploy(config)
    url = f"http://127.0.0.1:{port}"
    with httpx.Client(base_url=url, timeout=60) as client:
        deadline = time.monotonic() + 120
        while client.get("/readyz").status_code != 200:
            if time.monotonic() > deadline:
                raise TimeoutError("deskgen never became ready")
            time.sleep(0.5)
    yield {"url": url, "config": config, "deploy_seconds": time.perf_counter() - start, "experiments_db": experiments_db,
           "metrics_port": metrics_port, "redis_url": redis_url, "redis_dir": redis_dir}  # fmt: skip
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="session")
def desk_photo() -> bytes:
    return png_bytes(desk_scene(np.random.default_rng(1234), 128), "JPEG")


@pytest.fixture(scope="session")
def not_a_desk() -> bytes:
    return png_bytes(non_desk_scene(np.random.default_rng(4321), 128))


@pytest.fixture()
def client(serve_app: dict[str, Any]) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=serve_app["url"], timeout=120) as c:
        yield c


def generator_info() -> dict[str, Any]:
    from ray import serve

    handle = serve.get_deployment_handle("Generator", APP)
    return handle.info.remote().result()  # type: ignore[no-any-return]


def stage_stats() -> dict[str, int]:
    """How much work each model stage has done so far: photos gated, photos captioned, images made."""
    from ray import serve

    classifier = serve.get_deployment_handle("Classifier", APP).stats.remote().result()
    captioner = serve.get_deployment_handle("Captioner", APP).stats.remote().result()
    return {"gated": classifier["items"], "captioned": captioner["items"], "generated": generator_info()["generations"]}
