"""The experiment loop through the real app: exposures recorded at delivery (PNG, JSON, SSE) and on errors,
feedback (idempotent, 404, 409), the report's exact counts, a ``serve deploy`` starting a new experiment, and
a SIGKILLed Recorder replica under load losing nothing.

Every scenario runs twice: on the serve tier's SQLite store (marker ``serve``) and on a real PostgreSQL 15
server started for the module (marker ``postgres``; the app is redeployed with its URL and restored after).
"""

from __future__ import annotations

import copy
import os
import queue
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from scipy.stats import chisquare
from sqlalchemy import select

from deployments.ingress_models import IngressConfig
from deskgen.ab import pick_arm
from deskgen.experiments.schema import exposures, feedback
from deskgen.experiments.stats import difference, ratio_estimate, sequential_difference
from deskgen.experiments.store import make_engine

from .conftest import APP, deploy, deployment
from .helpers import assert_error, generate, parse_sse, text2img

SPLIT = {"dalle_ott": 0.5, "ott_3d": 0.5}


@pytest.fixture(
    scope="module",
    params=[pytest.param("sqlite", marks=pytest.mark.serve), pytest.param("postgres", marks=pytest.mark.postgres)],
)
def experiment_app(request: pytest.FixtureRequest, serve_app: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The session's app on the serve tier's SQLite store, or redeployed onto a fresh PostgreSQL server."""
    if request.param == "sqlite":
        yield serve_app
        return
    from deskgen.tools.postgres import running_postgres

    with running_postgres() as url:
        config = copy.deepcopy(serve_app["config"])
        (app,) = config["applications"]
        app["args"]["experiments_db"] = url
        deploy(config)
        try:
            assert recorder_info()["dialect"] == "postgresql"
            yield serve_app | {"config": config, "experiments_db": url}
        finally:
            deploy(serve_app["config"])


def recorder_info(timeout_s: float = 120) -> dict[str, Any]:
    """The Recorder replica's dialect and pid, waiting while it is (re)starting."""
    from ray import serve

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return serve.get_deployment_handle("Recorder", APP).info.remote().result(timeout_s=10)  # type: ignore[no-any-return]
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def ingress_config(config: dict[str, Any]) -> IngressConfig:
    return IngressConfig.model_validate(deployment(config, "Ingress")["user_config"])


def redeploy_with(config: dict[str, Any], client: httpx.Client, **user_config: Any) -> dict[str, Any]:
    """``serve deploy`` of ``config`` with Ingress ``user_config`` changes; waits until the ingress runs it."""
    config = copy.deepcopy(config)
    deployment(config, "Ingress")["user_config"].update(user_config)
    deploy(config)
    wait_for_experiment(client, ingress_config(config).experiment.id)
    return config


def wait_for_experiment(client: httpx.Client, experiment_id: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while (r := client.get("/v1/experiments")).status_code != 200 or r.json()["current"] != experiment_id:
        assert time.monotonic() < deadline, f"the ingress never ran experiment {experiment_id}: {r.text}"
        time.sleep(0.3)


def delivered(client: httpx.Client, kind: str, user: str) -> tuple[str, str]:
    """One image for ``user`` as PNG, JSON or SSE; returns (image id, arm) as the answer reports them."""
    if kind == "png":
        r = text2img(client, user_id=user)
        assert r.status_code == 200, r.text
        return r.headers["x-request-id"], r.headers["x-deskgen-ab-arm"]
    if kind == "json":
        r = text2img(client, user_id=user, accept="application/json")
        assert r.status_code == 200, r.text
        return r.json()["request_id"], r.json()["mix"]["arm"]
    r = text2img(client, user_id=user, accept="text/event-stream")
    assert r.status_code == 200, r.text
    name, done = parse_sse(r.text)[-1]
    assert name == "done", r.text
    return done["request_id"], done["mix"]["arm"]


def post_feedback(client: httpx.Client, deadline_s: float = 120, **body: Any) -> httpx.Response:
    """POST /v1/feedback, retrying 503s (the store restarting) as a client following Retry-After would."""
    deadline = time.monotonic() + deadline_s
    while True:
        r = client.post("/v1/feedback", json=body)
        if r.status_code != 503 or time.monotonic() > deadline:
            return r
        assert "retry-after" in r.headers
        time.sleep(0.2)


def test_the_report_counts_every_user_image_and_event_exactly(
    experiment_app: dict[str, Any], client: httpx.Client, not_a_desk: bytes
) -> None:
    base = experiment_app["config"]
    before = ingress_config(base).experiment.id
    config = redeploy_with(base, client, ab_split=SPLIT, ab_salt=f"loop-{uuid.uuid4().hex[:8]}")
    experiment_id = ingress_config(config).experiment.id
    assert experiment_id != before  # a new split/salt is a new experiment
    try:
        # Eight users, four per arm: the split's hash of the salt and the user id decides (deskgen.ab), so the
        # users are picked with it (eight random ones would all land in one arm 1 time in 128).
        salt, tag = ingress_config(config).ab_salt, uuid.uuid4().hex[:6]
        candidates = (f"user-{tag}-{i}" for i in range(1000))
        by_arm: dict[str, list[str]] = {arm: [] for arm in SPLIT}
        for candidate in candidates:
            chosen = by_arm[pick_arm(SPLIT, candidate, salt)]
            if len(chosen) < 4:
                chosen.append(candidate)
            if all(len(v) == 4 for v in by_arm.values()):
                break
        users = [u for pair in zip(*by_arm.values(), strict=True) for u in pair]
        arm_of: dict[str, str] = {}
        images: dict[str, list[str]] = {u: [] for u in users}
        for user in users:
            for kind in ("png", "json", "sse"):
                image_id, arm = delivered(client, kind, user)
                assert arm_of.setdefault(user, arm) == arm  # sticky per user
                images[user].append(image_id)
        assert set(arm_of.values()) == set(SPLIT), arm_of  # both arms drawn (fixed by the salt)

        # A refused photo is an exposure with its outcome (a guardrail), not a delivered image.
        refused = generate(client, not_a_desk, user_id=users[0])
        assert_error(refused, 422, "not_a_desk_setup", "image")

        expected: dict[str, dict[str, int]] = {arm: {"users": 0, "exposures": 0, "like": 0, "download": 0, "select": 0}
                                               for arm in SPLIT}  # fmt: skip
        sent_events: dict[tuple[str, int], list[str]] = {}
        for i, user in enumerate(users):
            arm = arm_of[user]
            expected[arm]["users"] += 1
            expected[arm]["exposures"] += len(images[user])
            for j, image_id in enumerate(images[user]):
                # Users differ (user i likes i % 4 of their 3 images), so the intervals are not degenerate.
                events = (["like"] if j < i % 4 else []) + (["download"] if j == 0 and i % 3 == 0 else []) + (
                    ["select"] if i % 2 == 0 and j == 1 else [])  # fmt: skip
                sent_events[(user, j)] = events
                for event in events:
                    first = post_feedback(client, image_id=image_id, event=event, user_id=user)
                    assert first.status_code == 201, first.text
                    again = post_feedback(client, image_id=image_id, event=event, user_id=user)  # a retry
                    assert again.status_code == 200 and again.json()["duplicate"] is True, again.text
                    expected[arm][event] += 1

        # The refusals a client can meet.
        assert_error(post_feedback(client, image_id="never-made", event="like"), 404, "unknown_image", "image_id")
        assert_error(post_feedback(client, image_id=refused.headers["x-request-id"], event="like"),
                     404, "unknown_image", "image_id")  # fmt: skip
        assert_error(post_feedback(client, image_id=images[users[0]][0], event="like", user_id=users[1]),
                     409, "user_mismatch", "user_id")  # fmt: skip
        assert_error(post_feedback(client, image_id=images[users[0]][0], event="love"), 400, "invalid_parameter", "event")

        report = client.get(f"/v1/experiments/{experiment_id}")
        assert report.status_code == 200, report.text
        body = report.json()
        assert body["experiment_id"] == experiment_id and body["control"] == "dalle_ott"
        arms = {a["arm"]: a for a in body["arms"]}
        for arm, want in expected.items():
            got = arms[arm]
            assert (got["users"], got["exposures"]) == (want["users"], want["exposures"]), got
            for event in ("like", "download", "select"):
                assert got["rates"][event]["rate"] == pytest.approx(want[event] / want["exposures"]), (arm, event, got)
            assert got["rates"]["dislike"]["rate"] == 0
            refusals = 1 if arm == arm_of[users[0]] else 0
            assert got["guardrails"]["requests"] == want["exposures"] + refusals
            assert got["guardrails"]["gate_rejection_rate"] == pytest.approx(refusals / (want["exposures"] + refusals))
            assert got["guardrails"]["error_rate"] == 0
        # The statistics, recomputed from exactly what this test sent (per user: 3 images and its events).
        policy = ingress_config(config).ab_policy
        per_user: dict[str, dict[str, list[float]]] = {arm: {e: [] for e in ("like", "download", "select", "n")} for arm in SPLIT}
        for user in users:
            sent = per_user[arm_of[user]]
            sent["n"].append(float(len(images[user])))
            for event in ("like", "download", "select"):
                sent[event].append(float(sum(1 for i in range(len(images[user])) if sent_events[(user, i)].count(event))))
        control = "dalle_ott"
        for event in ("like", "download", "select"):
            want_rates = {arm: ratio_estimate(per_user[arm][event], per_user[arm]["n"]) for arm in SPLIT}
            for arm, est in want_rates.items():
                got = arms[arm]["rates"][event]
                assert (got["ci_low"], got["ci_high"], got["se"]) == (
                    pytest.approx(est.ci_low, abs=1e-9), pytest.approx(est.ci_high, abs=1e-9), pytest.approx(est.se, abs=1e-9))
            fixed = difference(want_rates[control], want_rates["ott_3d"])
            always = sequential_difference(want_rates[control], want_rates["ott_3d"], alpha=policy.alpha, tau=policy.mde)
            got_fixed = arms["ott_3d"]["vs_control"][event]
            got_always = arms["ott_3d"]["vs_control_sequential"][event]
            for got, want in ((got_fixed, fixed), (got_always, always)):
                for key in ("estimate", "ci_low", "ci_high", "p_value"):
                    w = getattr(want, key)
                    assert got[key] == (None if w != w else pytest.approx(w, abs=1e-9)), (event, key, got, want)
        observed = [expected[arm]["users"] for arm in SPLIT]
        chi = chisquare(observed, [len(users) * SPLIT[arm] / sum(SPLIT.values()) for arm in SPLIT])
        assert body["sample_ratio"]["p_value"] == pytest.approx(float(chi.pvalue), abs=1e-12)
        assert body["decision"]["verdict"] in ("winner", "no_difference", "keep_running")
        assert body["decision"]["metric"] == policy.primary_metric and body["policy"]["alpha"] == policy.alpha

        def f(x: float | None) -> str:
            return "nan" if x is None else f"{x:.3f}"

        for a in body["arms"]:
            like, vs = a["rates"]["like"], (a["vs_control"] or {}).get("like")
            print(f"\n[report] {experiment_id} {a['arm']}: users {a['users']}, images {a['exposures']}, like "
                  f"{f(like['rate'])} [{f(like['ci_low'])}, {f(like['ci_high'])}]"
                  + (f", vs control {f(vs['estimate'])} [{f(vs['ci_low'])}, {f(vs['ci_high'])}] p={f(vs['p_value'])}" if vs else "")
                  + f", guardrails {a['guardrails']}")  # fmt: skip
        print(f"[report] sample ratio p={f(body['sample_ratio']['p_value'])} alarm={body['sample_ratio']['alarm']}")

        page = client.get(f"/v1/experiments/{experiment_id}", headers={"Accept": "text/html"})
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "<svg" in page.text and all(arm in page.text for arm in SPLIT)

        listed = client.get("/v1/experiments").json()
        (entry,) = [e for e in listed["experiments"] if e["id"] == experiment_id]
        assert entry["exposures"] == sum(len(v) for v in images.values()) + 1 and entry["users"] == len(users)
    finally:
        deploy(base)
        wait_for_experiment(client, before)
    # The old experiment stays reportable, with the same numbers.
    again = client.get(f"/v1/experiments/{experiment_id}")
    assert again.status_code == 200 and again.json()["arms"] == body["arms"]
    assert_error(client.get("/v1/experiments/exp-000000000000"), 404, "unknown_experiment", "experiment_id")


def test_a_killed_recorder_loses_no_exposure_and_no_answered_feedback(
    experiment_app: dict[str, Any], client: httpx.Client
) -> None:
    """Two clients generate without pause while a third posts feedback for each image (retrying 503s);
    the Recorder replica is SIGKILLed mid-load. Every delivered image must have its exposure stored and
    every feedback answered 2xx must be stored, including the images delivered while no Recorder ran."""
    pid = recorder_info()["pid"]
    url = experiment_app["url"]
    images: list[tuple[str, str, float]] = []  # (image id, user, delivered at): answered 200
    acknowledged: list[str] = []  # feedback answered 2xx
    to_rate: queue.Queue[tuple[str, str]] = queue.Queue()
    feedback_503 = 0
    unexpected: list[str] = []
    generating, rating = threading.Event(), threading.Event()
    generating.set()
    rating.set()

    def generate_images(n: int) -> None:
        with httpx.Client(base_url=url, timeout=120) as c:
            i = 0
            while generating.is_set():
                user = f"kill-{n}-{i % 3}"
                i += 1
                r = text2img(c, user_id=user)
                if r.status_code == 200:
                    images.append((r.headers["x-request-id"], user, time.monotonic()))
                    to_rate.put((r.headers["x-request-id"], user))
                elif r.status_code == 503:
                    time.sleep(0.2)
                else:
                    unexpected.append(r.text)

    def post_feedback_for_each() -> None:
        nonlocal feedback_503
        with httpx.Client(base_url=url, timeout=120) as c:
            while rating.is_set() or not to_rate.empty():
                try:
                    image_id, user = to_rate.get(timeout=0.2)
                except queue.Empty:
                    continue
                while (fb := c.post("/v1/feedback", json={"image_id": image_id, "event": "like", "user_id": user})).status_code == 503:
                    feedback_503 += 1
                    time.sleep(0.2)
                (acknowledged if fb.status_code in (200, 201) else unexpected).append(image_id if fb.is_success else fb.text)

    threads = [threading.Thread(target=generate_images, args=(n,)) for n in range(2)]
    threads.append(threading.Thread(target=post_feedback_for_each))
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + 300
        while len(acknowledged) < 4:
            assert time.monotonic() < deadline and not unexpected, unexpected[:3]
            time.sleep(0.1)
        killed_at = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        new_pid = recorder_info()["pid"]  # answers once Serve has replaced the replica
        back_at = time.monotonic()
        assert new_pid != pid
        while sum(1 for _, _, t in images if t > back_at) < 4:  # and the load goes on through it
            assert time.monotonic() < deadline and not unexpected, unexpected[:3]
            time.sleep(0.1)
    finally:
        generating.clear()
        for t in threads[:2]:
            t.join(timeout=180)
        rating.clear()
        threads[2].join(timeout=300)
    assert not unexpected, unexpected[:3]
    during_outage = [image for image, _, t in images if killed_at < t < back_at]
    # The traffic met the outage: images were delivered while no Recorder could store their exposures.
    assert during_outage, "no image was delivered while the Recorder was down: the kill was not under load"
    assert client.get("/v1/experiments").status_code == 200  # flushes this ingress's buffer
    buffer = client.get("/readyz").json()["exposures"]
    assert buffer["pending"] == 0 and buffer["refused"] == 0, buffer

    engine = make_engine(experiment_app["experiments_db"])
    with engine.connect() as c:
        stored = {r.image_id for r in c.execute(select(exposures.c.image_id).where(exposures.c.outcome == "ok"))}
        liked = {r.image_id for r in c.execute(select(feedback.c.image_id).where(feedback.c.event == "like"))}
    engine.dispose()
    delivered_ids = {image for image, _, _ in images}
    print(f"\n[kill] {len(images)} images delivered ({len(during_outage)} while the Recorder was down for "
          f"{back_at - killed_at:.1f} s, pid {pid} -> {new_pid}); {len(acknowledged)} feedback answered 2xx, "
          f"{feedback_503} feedback 503s; stored: {len(delivered_ids & stored)} exposures, "
          f"{len(set(acknowledged) & liked)} feedback")  # fmt: skip
    assert delivered_ids <= stored, delivered_ids - stored
    assert set(acknowledged) <= liked, set(acknowledged) - liked


def test_a_killed_ingress_loses_no_delivered_exposure(experiment_app: dict[str, Any], client: httpx.Client) -> None:
    """Two clients generate while the Ingress replica is SIGKILLed: every image a client got whole has its
    exposure in the store, because an image leaves only once its exposure is committed
    (``exposure_commit_wait_s``; ``python -m bench.ingress_kill`` measures the loss without the wait)."""
    from bench.ingress_kill import kill_under_load

    run = kill_under_load(experiment_app["url"], experiment_app["experiments_db"], clients=2, before=4, after=4)
    print(f"\n[ingress kill] {len(run.delivered)} images delivered, {run.failed} requests without an image, ingress "
          f"pid {run.pids[0]} -> {run.pids[1]} in {run.outage_s:.1f} s; delivered without an exposure: {len(run.lost)}")  # fmt: skip
    assert run.pids[0] != run.pids[1]
    assert len(run.delivered) >= 8
    assert run.lost == [], run.lost
    assert client.get("/readyz").status_code == 200
