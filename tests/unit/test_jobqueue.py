"""The ingress's job headers and ids (deployments/jobqueue.py, deployments/routes/jobs.py), the claims of
a job on a real Redis (deskgen/jobs/store.py), the jobs' settings into Ray Serve's task processor config,
and the client's side: the job body, and which failures a request with an Idempotency-Key may retry."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from deployments.jobqueue import MAX_CANCEL_AFTER_S, MAX_WAIT_S, parse_cancel_after, parse_prefer_wait
from deployments.routes.jobs import check_job_id
from deskgen.errors import InvalidParameter, UnknownJob
from deskgen.jobs.settings import JobsSettings
from deskgen.jobs.store import JobStore, new_job_id
from deskgen.tools.redis import running_redis
from deskgen_client.errors import error_from_body
from deskgen_client.jobs import job_body
from deskgen_client.retry import RetryPolicy, retryable

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(("header", "seconds"), [("90", 90), ("90s", 90), ("5m", 300), ("1h30m", 5400),
                                                 ("2.5", 2.5), (" 1m30s ", 90), ("1H", 3600)])  # fmt: skip
def test_cancel_after_durations(header: str, seconds: float) -> None:
    assert parse_cancel_after(header) == seconds
    assert parse_cancel_after(None) is None


@pytest.mark.parametrize("header", ["", "soon", "-5", "0", "0s", "5 m", "1d", "1h1h", f"{MAX_CANCEL_AFTER_S + 1}"])
def test_bad_cancel_after_names_the_header(header: str) -> None:
    with pytest.raises(InvalidParameter) as caught:
        parse_cancel_after(header)
    assert caught.value.field == "Cancel-After"


def test_prefer_wait() -> None:
    assert parse_prefer_wait(None) is None
    assert parse_prefer_wait("wait=10") == 10
    assert parse_prefer_wait("respond-async, wait=5") == 5
    assert parse_prefer_wait("WAIT = 7") == 7
    assert parse_prefer_wait("wait=100000") == MAX_WAIT_S  # capped, as RFC 7240 lets a server do
    assert parse_prefer_wait("respond-async") is None
    for bad in ("wait=abc", "wait=-1", "return=minimal", "wait=1.5"):
        with pytest.raises(InvalidParameter) as caught:
            parse_prefer_wait(bad)
        assert caught.value.field == "Prefer"


def test_job_ids() -> None:
    job = new_job_id()
    assert check_job_id(job) == job
    for bad in ("job_", "job_" + "g" * 24, "x" * 28, job + "0", "../job_" + "0" * 21):
        with pytest.raises(UnknownJob):
            check_job_id(bad)


@pytest.fixture()
def store(tmp_path: Path) -> Iterator[JobStore]:
    import redis

    with running_redis(tmp_path / "redis") as url:
        yield JobStore(redis.Redis.from_url(url), retention_s=60, max_queued=3)


def test_claims_leases_and_attempts(store: JobStore) -> None:
    job = store.create({"text2img": {"prompt": "a desk"}}, owner=None)
    assert store.claim(job, "a", 0.5) == "run"
    assert store.get(job).status == "running" and store.get(job).attempts == 1 and store.get(job).position is None
    assert store.claim(job, "b", 0.5) == "busy"  # a's lease is live
    assert store.renew(job, "a", 0.5) and not store.renew(job, "b", 0.5)
    time.sleep(0.6)
    assert store.claim(job, "b", 5) == "run"  # a's lease lapsed: b takes over
    assert store.get(job).attempts == 2 and not store.renew(job, "a", 5)
    store.release(job, "b")
    assert store.claim(job, "c", 5) == "run"  # released: taken at once
    assert store.finish(job, "succeeded")
    assert store.claim(job, "d", 5) == "done"
    canceled = store.create({"text2img": {"prompt": "a desk"}}, owner=None)
    store.cancel(canceled)
    assert store.claim(canceled, "a", 5) == "done" and store.claim(new_job_id(), "a", 5) == "done"
    unqueued = store.create({"text2img": {"prompt": "a desk"}}, owner=None)
    store.finish_unqueued(unqueued, {"code": "jobs_unavailable", "message": "not queued"})
    assert store.get(unqueued).status == "failed" and store.get(unqueued).error["code"] == "jobs_unavailable"


def test_settings_make_serves_task_processor_config() -> None:
    settings = JobsSettings(redis_url="redis://127.0.0.1:6391/0", redelivery_s=17, max_retries=2)
    config = settings.task_processor_config()
    assert config.queue_name == "deskgen-jobs" and config.max_retries == 2
    assert config.failed_task_queue_name == "deskgen-jobs-failed"
    assert config.adapter_config.broker_url == config.adapter_config.backend_url == "redis://127.0.0.1:6391/0"
    assert config.adapter_config.broker_transport_options == {"visibility_timeout": 17}
    with pytest.raises(ValueError, match="queue_name"):
        JobsSettings(queue_name="a queue")


def test_the_clients_job_body_is_checked_before_it_is_sent(tmp_path: Path) -> None:
    body = job_body(text2img={"prompt": "a desk"}, generate=None, photo=None, batch={"seeds": [1, 2]},
                    webhook="https://example.com/h", webhook_events=["start", "completed"])  # fmt: skip
    assert body == {"text2img": {"prompt": "a desk"}, "batch": {"seeds": [1, 2]}, "webhook": "https://example.com/h",
                    "webhook_events": ["start", "completed"]}  # fmt: skip
    photo = tmp_path / "desk.jpg"
    photo.write_bytes(b"\xff\xd8\xff fake jpeg")
    assert job_body(text2img=None, generate={"mix": "ott_3d"}, photo=photo, batch=None, webhook=None,
                    webhook_events=[])["generate"] == {"mix": "ott_3d", "image_b64": "/9j/IGZha2UganBlZw=="}  # fmt: skip
    with pytest.raises(ValueError, match="photo"):
        job_body(text2img=None, generate={}, photo=None, batch=None, webhook=None, webhook_events=[])
    with pytest.raises(ValueError, match="exactly one"):
        job_body(text2img={"prompt": "a"}, generate=None, photo=photo, batch=None, webhook=None, webhook_events=[])


def test_an_idempotent_request_may_retry_what_may_have_run() -> None:
    def error(status: int, code: str) -> object:
        return error_from_body(status, {"error": {"code": code, "message": "m"}}, headers={})

    from deskgen_client.errors import DeskgenConnectionError

    sent = DeskgenConnectionError("reset", sent=True, code="connection_error")
    cases = [(error(500, "http_500"), False, True), (error(502, "http_502"), False, True),
             (error(409, "idempotency_conflict"), False, True), (error(409, "user_mismatch"), False, False),
             (error(504, "timeout"), False, False), (error(422, "not_a_desk_setup"), False, False),
             (error(503, "overloaded"), True, True), (sent, False, True)]  # fmt: skip
    for err, plain, keyed in cases:
        assert retryable(err, idempotent=False) is plain, err  # type: ignore[arg-type]
        assert retryable(err, idempotent=True) is keyed, err  # type: ignore[arg-type]
    policy = RetryPolicy(max_retries=2, backoff_s=0.1)
    assert policy.delay(0, error(500, "http_500")) is None  # type: ignore[arg-type]
    assert policy.delay(0, error(500, "http_500"), idempotent=True) is not None  # type: ignore[arg-type]
    assert policy.delay(2, error(500, "http_500"), idempotent=True) is None  # type: ignore[arg-type]


def test_the_clients_job_stream_reads_events_and_where_to_resume() -> None:
    from deskgen_client.jobs import JobStream

    stream = JobStream()
    lines = ["id: 1-0", "event: queued", 'data: {"status": "queued"}', "", ": keep-alive", "",
             "id: 2-0", "event: succeeded", 'data: {"images": 1}', ""]  # fmt: skip
    events = [e for e in (stream.feed(line) for line in lines) if e is not None]
    assert [(e.name, e.data, e.id, e.final) for e in events] == [
        ("queued", {"status": "queued"}, "1-0", False), ("succeeded", {"images": 1}, "2-0", True)]
    assert stream.after == "2-0"
    stream.restart()  # a new connection: a half-read event of the old one is dropped, the resume point kept
    assert stream.feed("event: progress") is None and stream.after == "2-0"
    # The server's `error` event (its job store lost mid-stream) ends the stream instead of a reconnect loop.
    error = [e for e in (stream.feed(line) for line in ["event: error", 'data: {"error": {}}', ""]) if e is not None]
    assert [(e.name, e.final) for e in error] == [("error", True)]


def test_a_reused_key_is_its_own_error_class_and_an_unreachable_redis_is_503() -> None:
    import asyncio

    from deployments.http_errors import status_of
    from deployments.jobqueue import JobQueue
    from deskgen.errors import JobsUnavailable
    from deskgen.tools.redis import free_port
    from deskgen_client import IdempotencyKeyReused, NotADesk

    assert isinstance(error_from_body(422, {"error": {"code": "idempotency_key_reused", "message": "m"}}), IdempotencyKeyReused)
    assert isinstance(error_from_body(422, {"error": {"code": "not_a_desk_setup", "message": "m"}}), NotADesk)
    queue = JobQueue(JobsSettings(redis_url=f"redis://127.0.0.1:{free_port()}/0"))  # nothing listens there
    with pytest.raises(JobsUnavailable) as caught:
        asyncio.run(queue.call(queue.store.create, {"text2img": {"prompt": "a desk"}}, owner=None))
    assert status_of(caught.value) == 503 and "Redis" in caught.value.message
