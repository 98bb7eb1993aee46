"""What an ingress replica SIGKILLed under load loses: delivered images without an exposure in the store.

    python -m bench.ingress_kill [--kills 5] [--clients 3] [--no-write]

Clients generate tiny images (``/v1/text2img``, each with a user id) in closed loops while the Ingress
replica's process is SIGKILLed, ``--kills`` times, each once Serve has replaced the previous one and images
flow again. An image counts as *delivered* when its client got the whole 200 answer; it is *lost* when the
store has no ``ok`` exposure with its id after the run. Two settings of the Ingress ``user_config``, same
load, same run:

- ``exposure_commit_wait_s: 0`` — the behaviour before this setting existed: the answer leaves at once and
  the exposure waits in the replica's buffer for the next flush (``exposure_flush_s``, 50 ms);
- ``exposure_commit_wait_s: 2`` (the default) — the answer leaves once its exposure is committed (at most
  2 s; past that, i.e. while the store is down, it leaves anyway and the exposure stays buffered).

The serve tier runs one kill of the same scenario (:func:`kill_under_load`) and asserts nothing is lost.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass, field

import httpx

log = logging.getLogger("bench.ingress_kill")

APP = "deskgen"


@dataclass
class KillRun:
    """One kill: what the clients got and what the store kept."""

    delivered: list[str] = field(default_factory=list)
    #: Requests that got no image: Serve's 500 for requests in flight, connection errors, 503s.
    failed: int = 0
    outage_s: float = 0.0
    pids: tuple[int, int] = (0, 0)
    lost: list[str] = field(default_factory=list)
    #: Keyed runs: logical requests that got their image after at least one failed attempt.
    recovered: int = 0
    #: Keyed runs: logical requests whose final answer named another image id than the one they sent.
    mismatched: list[str] = field(default_factory=list)


def ingress_pid(timeout_s: float = 120) -> int:
    """The pid of the (single) Ingress replica, asked through a handle; waits while Serve replaces it."""
    from ray import serve

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            info = serve.get_deployment_handle("Ingress", APP).info.remote().result(timeout_s=5)
            return int(info["pid"])
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)


def stored_ok(experiments_db: str) -> set[str]:
    from sqlalchemy import select

    from deskgen.experiments.schema import exposures
    from deskgen.experiments.store import make_engine

    engine = make_engine(experiments_db)
    with engine.connect() as c:
        ids = {r.image_id for r in c.execute(select(exposures.c.image_id).where(exposures.c.outcome == "ok"))}
    engine.dispose()
    return ids


def kill_under_load(url: str, experiments_db: str, *, clients: int = 2, before: int = 4, after: int = 4,
                    timeout_s: float = 300, keyed: bool = False) -> KillRun:  # fmt: skip
    """Generate from ``clients`` threads; once ``before`` images were delivered, SIGKILL the Ingress
    replica; go on until ``after`` images were delivered by its successor; then count what the store lacks.

    ``keyed``: every logical request carries an ``Idempotency-Key`` and its own ``X-Request-Id`` (the image
    id) and is retried with both until it gets its image, as the client library does: a request in flight
    at the kill (Serve's plain-text 500, a reset) is retried, not counted as failed; ``failed`` then counts
    the failed attempts and ``recovered`` the requests that needed a retry."""
    run = KillRun()
    lock = threading.Lock()
    going = threading.Event()
    going.set()
    back_at = [float("inf")]
    after_back = [0]

    def generate_keyed(n: int) -> None:
        with httpx.Client(base_url=url, timeout=120) as c:
            i = 0
            while going.is_set():
                i += 1
                image_id, failures = f"keyed-{n}-{i}-{time.time_ns()}", 0
                headers = {"Idempotency-Key": f'"{image_id}"', "X-Request-Id": image_id, "Accept": "application/json"}
                body = {"prompt": "a tidy desk setup", "steps": 1, "width": 64, "height": 64, "user_id": f"k{n}-{i % 5}"}
                while True:
                    try:
                        r = c.post("/v1/text2img", json=body, headers=headers)
                        if r.status_code == 200:
                            break
                    except httpx.HTTPError:
                        pass
                    failures += 1
                    time.sleep(0.2)
                with lock:
                    run.failed += failures
                    run.recovered += failures > 0
                    answered = r.json()["request_id"]
                    if answered != image_id:
                        run.mismatched.append(f"{image_id} -> {answered}")
                    run.delivered.append(answered)
                    if time.monotonic() > back_at[0]:
                        after_back[0] += 1

    def generate(n: int) -> None:
        with httpx.Client(base_url=url, timeout=120) as c:
            i = 0
            while going.is_set():
                i += 1
                try:
                    r = c.post("/v1/text2img", json={"prompt": "a tidy desk setup", "steps": 1, "width": 64, "height": 64,
                                                         "user_id": f"k{n}-{i % 5}"})
                except httpx.HTTPError:
                    with lock:
                        run.failed += 1
                    time.sleep(0.1)
                    continue
                with lock:
                    if r.status_code == 200 and r.headers.get("content-type") == "image/png":
                        run.delivered.append(r.headers["x-request-id"])
                        if time.monotonic() > back_at[0]:
                            after_back[0] += 1
                    else:
                        run.failed += 1
                if r.status_code != 200:
                    time.sleep(0.1)

    threads = [threading.Thread(target=generate_keyed if keyed else generate, args=(n,), daemon=True)
               for n in range(clients)]  # fmt: skip
    pid = ingress_pid()
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + timeout_s
        while len(run.delivered) < before:
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {len(run.delivered)} images before the kill")
            time.sleep(0.05)
        killed_at = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        new_pid = ingress_pid()
        while new_pid == pid:
            time.sleep(0.3)
            new_pid = ingress_pid()
        with httpx.Client(base_url=url, timeout=10) as c:
            while True:
                try:
                    if c.get("/healthz").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError("the ingress never came back")
                time.sleep(0.2)
        back_at[0] = time.monotonic()
        run.outage_s, run.pids = back_at[0] - killed_at, (pid, new_pid)
        while after_back[0] < after:
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {after_back[0]} images after the ingress came back")
            time.sleep(0.05)
    finally:
        going.clear()
        for t in threads:
            t.join(timeout=180)
    with httpx.Client(base_url=url, timeout=60) as c:
        c.get("/v1/experiments")  # the surviving replica's buffer is flushed before the store is read
    stored = stored_ok(experiments_db)
    run.lost = [i for i in run.delivered if i not in stored]
    return run


def main(argv: list[str] | None = None) -> None:
    from bench.common import Table, append_report, command_line, machine, render_section
    from bench.cpu import ServeApp, bench_serve_config, free_port
    from deskgen.paths import models_dir
    from deskgen.serve_config import deployment_config

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=5, help="kills per setting (default 5)")
    parser.add_argument("--clients", type=int, default=3, help="clients generating in closed loops (default 3)")
    parser.add_argument("--no-write", action="store_true", help="print the table, do not append it to BENCHMARKS.md")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    started = time.perf_counter()
    tiny = models_dir()
    base = bench_serve_config(free_port(), tiny, tiny / "classifier" / "desk_gate.keras")
    table = Table(
        f"Ingress SIGKILLed under load: {args.kills} kills per setting, {args.clients} clients generating tiny "
        "images (64 px, 1 step) in closed loops, one replica per stage, SQLite store",
        ["exposure_commit_wait_s", "images delivered", "delivered without exposure (lost)", "lost per kill",
         "requests without an image", "outage per kill, p50 (s)", "image latency p50 (ms)"],
    )  # fmt: skip
    with ServeApp(base) as app:
        db = base["applications"][0]["args"]["experiments_db"]
        for wait in (0.0, 2.0):
            config = copy.deepcopy(base)
            deployment_config(config, "Ingress")["user_config"]["exposure_commit_wait_s"] = wait
            from ray.serve._private.api import serve_start
            from ray.serve.schema import ServeDeploySchema

            serve_start(http_options=config["http_options"]).deploy_apps(ServeDeploySchema.model_validate(config))
            time.sleep(5)  # reconfigure reaches the replica
            runs = [kill_under_load(app.url, db, clients=args.clients, before=6, after=6) for _ in range(args.kills)]
            for k, r in enumerate(runs):
                log.info("wait %.1f s, kill %d: %d delivered, %d lost, %d failed, outage %.1f s, pids %s",
                         wait, k, len(r.delivered), len(r.lost), r.failed, r.outage_s, r.pids)  # fmt: skip
            delivered = sum(len(r.delivered) for r in runs)
            lost = sum(len(r.lost) for r in runs)
            outages = sorted(r.outage_s for r in runs)
            latency = _latency_p50(app.url)
            table.add(f"{wait:g}", delivered, lost, f"{lost / len(runs):.2f}", sum(r.failed for r in runs),
                      f"{outages[len(outages) // 2]:.1f}", f"{latency * 1000:.0f}")  # fmt: skip
    table.notes.append(
        "lost = images whose client got the whole 200 answer but whose exposure the store never got: with no wait "
        "they are the exposures that sat in the killed replica's buffer (at most one flush window, 50 ms, of "
        "traffic); with the wait an image leaves only after its exposure is committed."
    )
    section = render_section("Ingress kill: exposures lost", [table], command=command_line(),
                             wall_s=time.perf_counter() - started, host=machine())  # fmt: skip
    print(section)
    if not args.no_write:
        append_report(section)


def _latency_p50(url: str, n: int = 20) -> float:
    """Sequential tiny generations' p50 latency under the current setting (what the wait adds)."""
    times = []
    with httpx.Client(base_url=url, timeout=120) as c:
        for i in range(n):
            t = time.perf_counter()
            r = c.post("/v1/text2img", json={"prompt": "a tidy desk setup", "steps": 1, "width": 64, "height": 64,
                                                     "user_id": f"lat-{i}"})
            if r.status_code == 200:
                times.append(time.perf_counter() - t)
    times.sort()
    return times[len(times) // 2] if times else float("nan")


if __name__ == "__main__":
    main()
