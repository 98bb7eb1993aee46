"""Jobs (issue 25) through the real app: POST /v1/jobs queued on Redis, run by the JobConsumer deployment
(Ray Serve's task consumer) through the Ingress's own generation pipeline; status, events, images, cancel,
Cancel-After, Prefer: wait, Idempotency-Key (jobs and the synchronous routes), signed webhooks to a real
receiver on 127.0.0.1 (the tier's config allows it), and the faults: a receiver that is down, a full queue,
a SIGKILLed consumer replica, a Redis restart."""

from __future__ import annotations

import io
import json
import os
import signal
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from deskgen.jobs.settings import JobsSettings
from deskgen.serve_config import app_args, load_serve_config
from deskgen_client.webhooks import verify
from tests.unit.test_webhook_delivery import Receiver

from .conftest import APP, WEBHOOK_SECRET, generator_info
from .helpers import assert_error, door, refused_job_image, text2img

pytestmark = pytest.mark.serve

SMALL = {"prompt": "a tidy desk setup", "steps": 2, "width": 64, "height": 64, "mix": "ott_3d", "locate": False}


@pytest.fixture()
def receiver() -> Iterator[Receiver]:
    r = Receiver([])
    yield r
    r.close()


def submit(client: httpx.Client, body: dict[str, Any], headers: dict[str, str] | None = None) -> httpx.Response:
    return client.post("/v1/jobs", json=body, headers=headers or {})


def wait_job(client: httpx.Client, job_id: str, timeout_s: float = 120, until: tuple[str, ...] = ("succeeded", "failed", "canceled")) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in until:
            return job  # type: ignore[no-any-return]
        assert time.monotonic() < deadline, job
        time.sleep(0.1)


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def events_of(text: str) -> list[tuple[str, str, dict[str, Any]]]:
    out = []
    for block in text.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if not line.startswith(":"))
        if "event" in fields:
            out.append((fields["id"], fields["event"], json.loads(fields["data"])))
    return out


def test_a_job_makes_the_synchronous_routes_image_and_posts_signed_webhooks(client: httpx.Client, receiver: Receiver) -> None:
    before = generator_info()["generations"]
    submitted = time.monotonic()
    r = submit(client, {"text2img": {**SMALL, "seed": 31}, "webhook": receiver.url,
                        "webhook_events": ["start", "progress", "completed"]})  # fmt: skip
    assert r.status_code == 202, r.text
    job = r.json()
    assert r.headers["location"] == f"/v1/jobs/{job['id']}" and job["status"] in ("queued", "running")
    done = wait_job(client, job["id"])
    assert done["status"] == "succeeded", done
    (image,) = done["images"]
    assert image["image_id"] == f"{job['id']}-0" and image["result"]["seed"] == 31 and "image_b64" not in image["result"]
    assert image["result"]["mix"]["name"] == "ott_3d" and done["attempts"] == 1 and done["expires_at"] > done["created_at"]
    png = client.get(image["url"])
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    # The same request on the synchronous route: the same pipeline, so the same pixels.
    sync = text2img(client, **{**SMALL, "seed": 31})
    assert sync.status_code == 200
    assert np.array_equal(pixels(png.content), pixels(sync.content))
    assert generator_info()["generations"] - before == 2
    # The webhooks: start, progress (the first step's, then at most one per progress_every_s) and
    # completed, in order, signed with the app's secret; deliveries recorded on the job.
    deadline = time.monotonic() + 30
    while not any(b'"job.completed"' in body for _, body in receiver.received):
        assert time.monotonic() < deadline, receiver.received
        time.sleep(0.1)
    elapsed = time.monotonic() - submitted
    kinds = [verify(WEBHOOK_SECRET, body, headers) for headers, body in receiver.received]
    types = [k["type"] for k in kinds]
    progress = [k["data"] for k in kinds if k["type"] == "job.progress"]
    assert types == ["job.start"] + ["job.progress"] * len(progress) + ["job.completed"], types
    every_s = app_args(load_serve_config())["jobs"].get("progress_every_s", JobsSettings().progress_every_s)
    assert 1 <= len(progress) <= 1 + elapsed / every_s, (progress, elapsed)
    assert progress[0] == {"id": job["id"], "image": 0, "images": 1, "step": 1, "steps": SMALL["steps"]}
    assert [p["step"] for p in progress] == sorted({p["step"] for p in progress})
    assert kinds[-1]["data"]["status"] == "succeeded" and kinds[-1]["data"]["images"][0]["url"] == image["url"]
    final = client.get(f"/v1/jobs/{job['id']}").json()
    assert [d["event"] for d in final["deliveries"]] == types
    assert all(d["delivered"] for d in final["deliveries"]) and not final["webhook_failed"]
    # The image is an exposure of the experiment like a synchronous one: feedback on it is accepted.
    fb = client.post("/v1/feedback", json={"image_id": image["image_id"], "event": "like"})
    assert fb.status_code == 201, fb.text


def test_a_batch_with_prefer_wait_and_its_event_stream(client: httpx.Client) -> None:
    r = submit(client, {"text2img": SMALL, "batch": {"seeds": [1, 2, 3]}}, {"Prefer": "wait=60"})
    assert r.status_code == 200, r.text  # finished within the wait
    assert r.headers["preference-applied"] == "wait=60"
    job = r.json()
    assert job["status"] == "succeeded" and [i["result"]["seed"] for i in job["images"]] == [1, 2, 3]
    assert len({i["image_id"] for i in job["images"]}) == 3
    stream = client.get(f"/v1/jobs/{job['id']}/events")
    assert stream.status_code == 200 and stream.headers["content-type"].startswith("text/event-stream")
    events = events_of(stream.text)
    names = [name for _, name, _ in events]
    assert names[:2] == ["queued", "started"] and names[-1] == "succeeded"
    assert names.count("image") == 3 and names.count("progress") == 3 * 2
    # Resuming after an event id gives what came after it.
    resumed = events_of(client.get(f"/v1/jobs/{job['id']}/events", headers={"Last-Event-ID": events[-2][0]}).text)
    assert [name for _, name, _ in resumed] == ["succeeded"]
    # A weekday-concepts batch is checked at submit like the synchronous route checks a concept.
    bad = submit(client, {"text2img": SMALL, "batch": {"concepts": ["productive-monday", "no-such-concept"]}})
    assert_error(bad, 404, "unknown_concept")


def test_idempotency_keys_replay_the_first_answer(client: httpx.Client, desk_photo: bytes) -> None:
    key = str(uuid.uuid4())
    before = generator_info()["generations"]
    first = text2img(client, accept="application/json", headers={"Idempotency-Key": f'"{key}"'}, **{**SMALL, "seed": 5})
    again = text2img(client, accept="application/json", headers={"Idempotency-Key": f'"{key}"'}, **{**SMALL, "seed": 5})
    assert first.status_code == again.status_code == 200
    assert again.content == first.content and again.headers["idempotent-replayed"] == "true"
    assert again.headers["x-deskgen-seed"] == "5" and "idempotent-replayed" not in first.headers
    assert generator_info()["generations"] - before == 1  # no second generation
    reused = text2img(client, headers={"Idempotency-Key": f'"{key}"'}, **{**SMALL, "seed": 6})
    assert_error(reused, 422, "idempotency_key_reused", "Idempotency-Key")
    assert_error(text2img(client, headers={"Idempotency-Key": '"bad key"'}, **SMALL), 400, "invalid_parameter", "Idempotency-Key")
    assert_error(text2img(client, accept="text/event-stream", headers={"Idempotency-Key": '"k-sse"'}, **SMALL),
                 400, "invalid_parameter", "Idempotency-Key")  # fmt: skip
    # A multipart /v1/generate with a key: the photo's body is the fingerprint; the replay is the same image.
    photo_key = {"Idempotency-Key": str(uuid.uuid4()), "Accept": "application/json"}
    form = {"steps": "1", "width": "64", "height": "64", "locate": "false", "seed": "3"}
    files = {"image": ("desk.jpg", desk_photo, "image/jpeg")}
    before = generator_info()["generations"]
    one = client.post("/v1/generate", files=files, data=form, headers=photo_key)
    two = client.post("/v1/generate", files=files, data=form, headers=photo_key)
    assert one.status_code == 200, one.text
    assert two.json()["request_id"] == one.json()["request_id"] and two.headers["idempotent-replayed"] == "true"
    assert generator_info()["generations"] - before == 1
    # Jobs: a retried submit is the same job.
    job_key = {"Idempotency-Key": str(uuid.uuid4())}
    a = submit(client, {"text2img": SMALL}, job_key)
    b = submit(client, {"text2img": SMALL}, job_key)
    assert a.status_code == b.status_code == 202 and a.json()["id"] == b.json()["id"]
    assert wait_job(client, a.json()["id"])["status"] == "succeeded"


def test_bad_job_requests_are_4xx_naming_the_field(client: httpx.Client) -> None:
    assert_error(client.get("/v1/jobs/job_000000000000000000000000"), 404, "unknown_job", "id")
    assert_error(client.get("/v1/jobs/nonsense"), 404, "unknown_job", "id")
    assert_error(client.post("/v1/jobs/job_000000000000000000000000/cancel"), 404, "unknown_job", "id")
    assert_error(submit(client, {"text2img": SMALL, "webhook": "ftp://example.com/x"}), 400, "invalid_parameter", "webhook")
    assert_error(submit(client, {"text2img": SMALL, "webhook": "http://10.1.2.3/hook"}), 400, "invalid_parameter",
                 "webhook", "allow-list")  # fmt: skip
    assert_error(submit(client, {"text2img": SMALL, "batch": {"seeds": list(range(17))}}), 400, "invalid_parameter")
    assert_error(submit(client, {"text2img": SMALL}, {"Cancel-After": "soon"}), 400, "invalid_parameter", "Cancel-After")
    assert_error(submit(client, {"text2img": SMALL}, {"Prefer": "wait=abc"}), 400, "invalid_parameter", "Prefer")
    assert_error(submit(client, {"text2img": {**SMALL, "steps": 100000}}), 400, "invalid_parameter", "steps")
    assert_error(submit(client, {"text2img": {**SMALL, "mix": "nope"}}), 404, "unknown_mix", "mix")
    assert_error(submit(client, {"generate": {"image_b64": "!!!"}}), 400, "invalid_parameter", "generate.image_b64")
    assert_error(submit(client, {}), 400, "invalid_parameter")
    job = submit(client, {"text2img": SMALL}, {"Prefer": "wait=30"}).json()
    assert_error(client.get(f"/v1/jobs/{job['id']}/images/7"), 404, "unknown_job", "index")
    assert_error(client.get(f"/v1/jobs/{job['id']}/images/x"), 400, "invalid_parameter", "index")


def test_cancel_and_cancel_after_stop_a_running_job_at_a_step(client: httpx.Client) -> None:
    long = {**SMALL, "steps": 60}
    job = submit(client, {"text2img": long}).json()
    running = wait_job(client, job["id"], until=("running",))
    deadline = time.monotonic() + 60
    while not (running.get("progress") or {}).get("step"):
        assert time.monotonic() < deadline
        running = client.get(f"/v1/jobs/{job['id']}").json()
    canceled = client.post(f"/v1/jobs/{job['id']}/cancel")
    assert canceled.status_code == 200
    done = wait_job(client, job["id"])
    assert done["status"] == "canceled" and done["images"] == []
    assert done["progress"]["step"] < 60  # stopped at a step, not run to the end
    late = submit(client, {"text2img": long}, {"Cancel-After": "1s"}).json()
    assert late["cancel_after"] == pytest.approx(late["created_at"] + 1, abs=0.01)
    assert wait_job(client, late["id"])["status"] == "canceled"


def test_a_full_queue_answers_503_with_retry_after(client: httpx.Client, serve_app: dict[str, Any]) -> None:
    bound = serve_app["config"]["applications"][0]["args"]["jobs"]["max_queued"]
    busy = {"text2img": {**SMALL, "steps": 80}, "batch": {"seeds": list(range(16))}}
    ids = []
    try:
        # The consumer's 4 threads take 4 long jobs; the next `bound` wait in the queue; one more is refused.
        for _ in range(4):
            ids.append(submit(client, busy).json()["id"])
        for job_id in ids:
            wait_job(client, job_id, until=("running",))
        queued = [submit(client, busy) for _ in range(bound)]
        assert [r.status_code for r in queued] == [202] * bound
        ids += [r.json()["id"] for r in queued]
        assert sorted(r.json()["position"] for r in queued) == list(range(bound))
        full = submit(client, busy)
        assert_error(full, 503, "queue_full")
        assert int(full.headers["retry-after"]) >= 1
    finally:
        for job_id in ids:
            client.post(f"/v1/jobs/{job_id}/cancel")
    for job_id in ids:
        assert wait_job(client, job_id)["status"] == "canceled"


def test_a_receiver_that_is_down_gets_retries_then_the_job_is_webhook_failed(client: httpx.Client) -> None:
    down = Receiver([503] * 10)  # answers every attempt with 503
    try:
        job = submit(client, {"text2img": SMALL, "webhook": down.url}).json()
        done = wait_job(client, job["id"])
        deadline = time.monotonic() + 30
        while not done["webhook_failed"]:
            assert time.monotonic() < deadline, done
            time.sleep(0.2)
            done = client.get(f"/v1/jobs/{job['id']}").json()
        (delivery,) = done["deliveries"]
        assert delivery["event"] == "job.completed" and not delivery["delivered"]
        assert [a["status"] for a in delivery["attempts"]] == [503, 503, 503]  # the tier's 3 attempts
        assert len(down.received) == 3
        assert done["status"] == "succeeded" and client.get(done["images"][0]["url"]).status_code == 200
    finally:
        down.close()


def consumer_pid(timeout_s: float = 120) -> int:
    """The JobConsumer replica's pid, asked through a handle (waits while Serve replaces it)."""
    from ray import serve

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return int(serve.get_deployment_handle("JobConsumer", APP).info.remote().result(timeout_s=5)["pid"])
        except Exception:
            assert time.monotonic() < deadline
            time.sleep(0.3)


def test_a_killed_consumer_has_its_job_redelivered_and_finished_once(client: httpx.Client, serve_app: dict[str, Any]) -> None:
    pid = consumer_pid()
    job = submit(client, {"text2img": {**SMALL, "steps": 40}, "batch": {"seeds": [1, 2, 3]}}).json()
    deadline = time.monotonic() + 60
    while True:  # kill it once it has made one image and is making the next
        record = client.get(f"/v1/jobs/{job['id']}").json()
        if len(record["images"]) >= 1 and record["status"] == "running":
            break
        assert time.monotonic() < deadline and record["status"] != "succeeded", record
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    done = wait_job(client, job["id"], timeout_s=240)
    assert done["status"] == "succeeded", done
    assert done["attempts"] == 2  # redelivered once
    assert [i["index"] for i in done["images"]] == [0, 1, 2] and [i["result"]["seed"] for i in done["images"]] == [1, 2, 3]
    names = [name for _, name, _ in events_of(client.get(f"/v1/jobs/{job['id']}/events").text)]
    assert names.count("started") == 2 and names.count("succeeded") == 1
    assert consumer_pid() != pid
    from bench.ingress_kill import stored_ok

    client.get("/v1/experiments")  # flushes the ingress's exposures
    stored = stored_ok(serve_app["experiments_db"])
    assert {i["image_id"] for i in done["images"]} <= stored


def test_queued_jobs_survive_a_redis_restart(client: httpx.Client, serve_app: dict[str, Any]) -> None:
    import redis as redis_lib

    from deskgen.tools.redis import start, stop

    url, folder = serve_app["redis_url"], serve_app["redis_dir"]
    busy = {"text2img": {**SMALL, "steps": 60}, "batch": {"seeds": list(range(16))}}
    blockers = [submit(client, busy).json()["id"] for _ in range(4)]
    for job_id in blockers:
        wait_job(client, job_id, until=("running",))
    waiting = [submit(client, {"text2img": {**SMALL, "seed": s}}).json()["id"] for s in (71, 72)]
    assert all(client.get(f"/v1/jobs/{j}").json()["status"] == "queued" for j in waiting)
    t0 = time.monotonic()
    stop(folder)  # SHUTDOWN: the append-only file is flushed
    assert start(folder) == url
    assert redis_lib.Redis.from_url(url).ping()
    print(f"\n[redis restart] back after {time.monotonic() - t0:.1f} s")
    for job_id in blockers:
        assert client.post(f"/v1/jobs/{job_id}/cancel").status_code == 200
    for job_id in waiting:
        assert wait_job(client, job_id, timeout_s=240)["status"] == "succeeded"
    for job_id in blockers:
        assert wait_job(client, job_id, timeout_s=120)["status"] == "canceled"
    print(f"[redis restart] queued jobs succeeded and running ones canceled {time.monotonic() - t0:.1f} s after the stop")
    # The running jobs waited for Redis and went on: no job was retried or redelivered for the restart.
    assert all(client.get(f"/v1/jobs/{j}").json()["attempts"] == 1 for j in blockers + waiting)


def test_a_job_image_at_a_full_generator_ends_busy_without_a_failure(client: httpx.Client, serve_app: dict[str, Any]) -> None:
    """The consumer's call for one image while three long generations fill the generator (1 running + 2
    queued at the Ingress's router): the Ingress sends it again after each of its ``router_retry_s`` pauses
    (so the answer takes at least their sum), then ends the stream with ``busy`` (the consumer waits and asks
    again), not with an exception that Serve would log as a failed request."""
    pauses = door(client)["router_retry_s"]
    assert pauses, "the tier's Ingress retries refused generations (serve_config.yaml)"
    refused_in = refused_job_image(client, serve_app["url"], APP)
    assert refused_in >= sum(pauses), (refused_in, pauses)
    print(f"\n[jobs] a job image at a full generator: busy after {refused_in * 1000:.0f} ms (pauses {pauses})")


def test_the_app_names_the_consumer_deployment(serve_app: dict[str, Any]) -> None:
    from ray import serve

    status = serve.status().applications[APP].deployments
    assert "JobConsumer" in status and status["JobConsumer"].status == "HEALTHY"


def test_requests_in_flight_at_an_ingress_kill_retried_with_their_key_get_one_image_and_exposure(
    serve_app: dict[str, Any], client: httpx.Client
) -> None:
    """Two clients generate with an Idempotency-Key (and their own image id) per request while the Ingress
    replica is SIGKILLed, retrying each request until it gets its image, as the client library does: every
    request ends with its own image id and exactly one `ok` exposure; the attempts cut by the kill (Serve's
    plain-text 500, resets) and the 409s while a dead replica's key was held are retries, not failures."""
    from bench.ingress_kill import kill_under_load

    run = kill_under_load(serve_app["url"], serve_app["experiments_db"], clients=2, before=4, after=4, keyed=True)
    print(f"\n[keyed ingress kill] {len(run.delivered)} requests, {run.recovered} needed a retry "
          f"({run.failed} failed attempts), outage {run.outage_s:.1f} s; lost {len(run.lost)}")  # fmt: skip
    assert run.pids[0] != run.pids[1]
    assert run.mismatched == [] and len(set(run.delivered)) == len(run.delivered) >= 8
    assert run.lost == [], run.lost
    from sqlalchemy import func, select

    from deskgen.experiments.schema import exposures
    from deskgen.experiments.store import make_engine

    engine = make_engine(serve_app["experiments_db"])
    with engine.connect() as c:
        rows = c.execute(select(exposures.c.image_id, func.count()).where(exposures.c.image_id.like("keyed-%"))
                         .group_by(exposures.c.image_id)).all()  # fmt: skip
    engine.dispose()
    assert {image_id for image_id, _ in rows} == set(run.delivered)  # no exposure of an attempt that was retried
    assert all(count == 1 for _, count in rows)
