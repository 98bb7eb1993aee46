"""Jobs against the synchronous routes, on one app (issue 25).

    python -m bench.jobs                   # 40 submits, 10 one-image rounds, 3 batch rounds
    python -m bench.jobs --submits 20 --rounds 5 --batches 2 --no-write

The app of serve_config.yaml on the tiny models (64x64, 2 steps, no product location), one replica per
stage, its own Redis in a temporary folder (``deskgen.tools.redis``). Measured, in this order:

- **submit overhead**: ``POST /v1/jobs`` answered 202 (checks, the job record and the queue in Redis), p50
  and p99 over ``--submits`` jobs, each canceled at once so the queue stays short;
- **one image**: a one-image job followed to its end (submit, then ``GET /v1/jobs/{id}`` every 20 ms until it
  succeeded, then the PNG) against the same request on ``POST /v1/text2img``, alternated, ``--rounds`` each;
- **seven images**: a batch job of the 7 weekday concepts against 7 synchronous calls of the same concepts
  one after the other, ``--batches`` each (both make the same 7 images; the job's images come one by one
  from one consumer thread, so this shows the queue's cost, not a parallel speed-up).
"""

from __future__ import annotations

import argparse
import logging
import time
from typing import Any

import httpx

from bench.common import Table, append_report, command_line, machine, percentile, render_section
from bench.cpu import ServeApp, free_port

log = logging.getLogger("bench.jobs")

BODY = {"prompt": "a tidy desk setup, warm light", "steps": 2, "width": 64, "height": 64, "mix": "ott_3d", "locate": False}


def jobs_config(port: int, redis_url: str) -> dict[str, Any]:
    import tempfile
    from pathlib import Path

    from deskgen.paths import models_dir
    from deskgen.serve_config import app_args, deployment_config, load_serve_config, with_models

    tiny = models_dir()
    store = Path(tempfile.mkdtemp(prefix="deskgen-bench-jobs-")) / "experiments.db"
    base = load_serve_config()
    config = with_models(base, tiny, experiments_db=f"sqlite:///{store}",
                         image_store={**app_args(base)["image_store"], "dir": str(store.parent / "images")},
                         jobs={**app_args(base)["jobs"], "redis_url": redis_url})  # fmt: skip
    config["http_options"] = {"host": "127.0.0.1", "port": port}
    for deployment in config["applications"][0]["deployments"]:
        deployment.pop("autoscaling_config", None)
        deployment["num_replicas"] = 1
    deployment_config(config, "Ingress")["user_config"].update(request_timeout_s=300)
    return config


def weekday_concepts(client: httpx.Client) -> list[str]:
    """The 7 concepts of the weekly schedule (GET /v1/concepts), Monday first."""
    schedule = client.get("/v1/concepts").json()["schedule"]
    days = ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"]
    return [schedule[day] for day in days]


def follow(client: httpx.Client, job_id: str, poll_s: float = 0.02) -> dict[str, Any]:
    while True:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in ("succeeded", "failed", "canceled"):
            if job["status"] != "succeeded":
                raise RuntimeError(f"job {job_id} {job['status']}: {job.get('error')}")
            return job  # type: ignore[no-any-return]
        time.sleep(poll_s)


def one_job(client: httpx.Client, body: dict[str, Any]) -> float:
    t = time.perf_counter()
    r = client.post("/v1/jobs", json=body)
    r.raise_for_status()
    job = follow(client, r.json()["id"])
    for image in job["images"]:
        client.get(image["url"]).raise_for_status()
    return time.perf_counter() - t


def sync_calls(client: httpx.Client, bodies: list[dict[str, Any]]) -> float:
    t = time.perf_counter()
    for body in bodies:
        client.post("/v1/text2img", json=body).raise_for_status()
    return time.perf_counter() - t


def main(argv: list[str] | None = None) -> None:
    from deskgen.tools.redis import running_redis

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--submits", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--no-write", action="store_true", help="print the tables, do not append them to BENCHMARKS.md")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    wall = time.perf_counter()
    with running_redis() as redis_url, ServeApp(jobs_config(free_port(), redis_url)) as app, \
            httpx.Client(base_url=app.url, timeout=300) as client:  # fmt: skip
        concepts = weekday_concepts(client)
        # Warm-up: every concept's mix loaded on the generator, the consumer's handle made.
        sync_calls(client, [{**BODY, "concept": c} for c in concepts])
        one_job(client, {"text2img": BODY})
        submit = []
        for _ in range(args.submits):
            t = time.perf_counter()
            r = client.post("/v1/jobs", json={"text2img": BODY})
            submit.append(time.perf_counter() - t)
            r.raise_for_status()
            client.post(f"/v1/jobs/{r.json()['id']}/cancel")
        single_job, single_sync = [], []
        for k in range(args.rounds):
            body = {**BODY, "seed": 1000 + k}
            single_job.append(one_job(client, {"text2img": body}))
            single_sync.append(sync_calls(client, [body]))
        batch_job, batch_sync = [], []
        for k in range(args.batches):
            batch_job.append(one_job(client, {"text2img": {**BODY, "seed": k}, "batch": {"concepts": concepts}}))
            batch_sync.append(sync_calls(client, [{**BODY, "seed": k, "concept": c} for c in concepts]))
    overhead = Table(f"Job submit: POST /v1/jobs answered 202, {args.submits} jobs (each canceled at once)",
                     ["p50 (ms)", "p99 (ms)", "max (ms)"])  # fmt: skip
    overhead.add(f"{percentile(submit, 50) * 1000:.1f}", f"{percentile(submit, 99) * 1000:.1f}", f"{max(submit) * 1000:.1f}")
    latency = Table("A job against the synchronous route, same app, tiny SDXL 64x64, 2 steps (seconds, end to end)",
                    ["what", "runs", "p50 (s)", "p95 (s)", "job - sync, p50 (s)"])  # fmt: skip
    latency.add("1 image: job (submit, poll every 20 ms, PNG)", len(single_job), f"{percentile(single_job, 50):.3f}",
                f"{percentile(single_job, 95):.3f}", f"{percentile(single_job, 50) - percentile(single_sync, 50):+.3f}")  # fmt: skip
    latency.add("1 image: POST /v1/text2img", len(single_sync), f"{percentile(single_sync, 50):.3f}",
                f"{percentile(single_sync, 95):.3f}", "")  # fmt: skip
    latency.add("7 weekday concepts: one batch job (and its 7 PNGs)", len(batch_job), f"{percentile(batch_job, 50):.3f}",
                f"{percentile(batch_job, 95):.3f}", f"{percentile(batch_job, 50) - percentile(batch_sync, 50):+.3f}")  # fmt: skip
    latency.add("7 weekday concepts: 7 synchronous calls in a row", len(batch_sync), f"{percentile(batch_sync, 50):.3f}",
                f"{percentile(batch_sync, 95):.3f}", "")  # fmt: skip
    latency.notes.append("one Ray instance on this machine; Redis on 127.0.0.1 (append-only file, fsync every second)")
    section = render_section("Jobs against the synchronous routes", [overhead, latency], command=command_line(),
                             wall_s=time.perf_counter() - wall, host=machine())  # fmt: skip
    print(section)
    if not args.no_write:
        append_report(section)


if __name__ == "__main__":
    main()
