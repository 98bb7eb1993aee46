"""The job runner (deskgen/jobs/runner.py) with a real tiny SDXL generator, a real Redis, a real image
store and a real webhook receiver on 127.0.0.1: a batch runs image by image with progress, a cancel stops
a running generation at its next step, a redelivered job finishes once, webhooks follow the filter and a
receiver that is down marks the job webhook_failed while its results stay readable.

(The service's generate function calls the Ingress deployment's pipeline; here it calls DeskGenerator
directly: what is tested is the runner's own logic, on a real generator.)"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from deskgen.generator import DeskGenerator
from deskgen.imagestore import ImageStore
from deskgen.jobs.runner import JobRunner, expand
from deskgen.jobs.store import JobStore
from deskgen.mixes import Mix
from deskgen.pngmeta import read_png_metadata
from deskgen.tools.redis import free_port, running_redis
from deskgen.tools.tiny_sdxl import one_torch_thread
from deskgen_client.protocol.jobs import JobRequest
from deskgen_client.webhooks import new_secret, verify
from tests.unit.generator_common import PARAMS, settings_for
from tests.unit.test_webhook_delivery import Receiver

pytestmark = pytest.mark.unit

SECRET = new_secret()


@pytest.fixture(scope="module")
def generator(tiny_models: Path) -> Iterator[DeskGenerator]:
    with one_torch_thread():
        yield DeskGenerator.from_pretrained(settings_for(tiny_models))


@pytest.fixture()
def jobs(tmp_path: Path) -> Iterator[JobStore]:
    import redis

    with running_redis(tmp_path / "redis") as url:
        yield JobStore(redis.Redis.from_url(url), retention_s=600, max_queued=10)


def generate_with(generator: DeskGenerator, calls: list[str]) -> Callable[..., tuple[dict[str, Any], bytes]]:
    def generate(kind: str, body: dict[str, Any], image_id: str, on_step: Callable[[int, int], None], **_: Any) -> tuple[dict[str, Any], bytes]:
        calls.append(image_id)
        params = dataclasses.replace(PARAMS, prompt=body["prompt"], seed=body.get("seed", 0), steps=body.get("steps", 2))
        result = generator.generate(params, Mix.from_weights({}), on_step=on_step)
        return {"seed": params.seed, "prompt": params.prompt}, result.png()

    return generate


def runner(jobs: JobStore, tmp_path: Path, generate: Any, **kw: Any) -> JobRunner:
    images = ImageStore(tmp_path / "images", max_bytes=10**8, retention_s=3600)
    return JobRunner(jobs, images, generate, secret_for=lambda owner: SECRET, allow=["127.0.0.1"], **kw)


def test_a_batch_runs_image_by_image_with_progress_and_a_webhook(
    generator: DeskGenerator, jobs: JobStore, tmp_path: Path
) -> None:
    receiver = Receiver([])
    try:
        request = JobRequest.model_validate({"text2img": {"prompt": "a desk", "steps": 2}, "batch": {"seeds": [1, 2, 3]},
                                             "webhook": receiver.url, "webhook_events": ["start", "completed"]})  # fmt: skip
        assert [body["seed"] for _, body in expand(request)] == [1, 2, 3]
        job = jobs.create(request.model_dump(exclude_none=True), owner="backend",
                          webhook={"url": receiver.url, "events": request.webhook_events})  # fmt: skip
        calls: list[str] = []
        run = runner(jobs, tmp_path, generate_with(generator, calls))
        assert run.run(job) == "succeeded"
        record = jobs.get(job)
        assert [r["image_id"] for r in record.results] == [f"{job}-0", f"{job}-1", f"{job}-2"]
        assert [r["result"]["seed"] for r in record.results] == [1, 2, 3]
        png = run.images.get(f"{job}-2")
        assert png is not None and read_png_metadata(png)["seed"] == 3
        names = [name for _, name, _ in jobs.events(job)]
        assert names[:2] == ["queued", "started"] and names[-1] == "succeeded"
        assert names.count("image") == 3 and names.count("progress") == 3 * 2  # two steps per image
        # The webhook: start and completed, signed; progress was not asked for.
        types = [verify(SECRET, body, headers)["type"] for headers, body in receiver.received]
        assert types == ["job.start", "job.completed"]
        assert [d["delivered"] for d in jobs.get(job).deliveries] == [True, True]
        # Redelivered after it finished: nothing runs again.
        assert run.run(job) == "succeeded" and len(calls) == 3
    finally:
        receiver.close()


def test_a_redelivered_job_skips_the_images_it_made_and_finishes_once(
    generator: DeskGenerator, jobs: JobStore, tmp_path: Path
) -> None:
    request = JobRequest.model_validate({"text2img": {"prompt": "a desk"}, "batch": {"seeds": [5, 6]}})
    job = jobs.create(request.model_dump(exclude_none=True), owner=None)
    calls: list[str] = []
    generate = generate_with(generator, calls)

    def dies_after_the_first_image(kind: str, body: dict[str, Any], image_id: str, on_step: Any, **_: Any) -> Any:
        if image_id.endswith("-1"):
            raise SystemExit("the consumer replica is killed")  # not a DeskgenError: the job stays running
        return generate(kind, body, image_id, on_step)

    with pytest.raises(SystemExit):
        runner(jobs, tmp_path, dies_after_the_first_image, lease_s=1.0).run(job)
    assert jobs.get(job).status == "running" and len(jobs.get(job).results) == 1
    # The redelivery finds the dead runner's claim, waits for its lease (1 s) to lapse, and takes over.
    assert jobs.claim(job, "someone-else", 1.0) == "busy"
    assert runner(jobs, tmp_path, generate, poll_s=0.1).run(job) == "succeeded"
    assert calls == [f"{job}-0", f"{job}-1"]  # image 0 was not made twice
    assert [r["index"] for r in jobs.get(job).results] == [0, 1]
    assert jobs.get(job).attempts == 2


def test_a_copy_delivered_while_the_first_runs_waits_for_it_and_runs_nothing(
    generator: DeskGenerator, jobs: JobStore, tmp_path: Path
) -> None:
    import threading

    request = JobRequest.model_validate({"text2img": {"prompt": "a desk", "steps": 3}})
    job = jobs.create(request.model_dump(exclude_none=True), owner=None)
    calls: list[str] = []
    generate = generate_with(generator, calls)
    started, go_on = threading.Event(), threading.Event()

    def slow(kind: str, body: dict[str, Any], image_id: str, on_step: Any, **_: Any) -> Any:
        started.set()
        go_on.wait(30)
        return generate(kind, body, image_id, on_step)

    first: list[str] = []
    thread = threading.Thread(target=lambda: first.append(runner(jobs, tmp_path, slow, lease_s=3.0).run(job)))
    thread.start()
    assert started.wait(30)
    copy: list[str] = []
    second = threading.Thread(target=lambda: copy.append(runner(jobs, tmp_path, generate, poll_s=0.1).run(job)))
    second.start()
    second.join(4.0)  # longer than the lease: the first runner's heartbeat keeps it
    assert second.is_alive() and calls == []
    go_on.set()
    thread.join(60)
    second.join(60)
    assert first == ["succeeded"] and copy == ["succeeded"] and len(calls) == 1
    assert jobs.get(job).attempts == 1


def test_the_services_faults_are_retried_then_fail_the_job_and_the_requests_fail_it_at_once(
    jobs: JobStore, tmp_path: Path
) -> None:
    from deskgen.errors import NotADeskSetup

    request = JobRequest.model_validate({"text2img": {"prompt": "a desk"}})
    job = jobs.create(request.model_dump(exclude_none=True), owner=None)

    def replica_died(*_: Any, **__: Any) -> Any:
        raise ConnectionError("the ingress replica died")

    for attempt in (1, 2):
        with pytest.raises(ConnectionError):
            runner(jobs, tmp_path, replica_died, max_attempts=3).run(job)
        assert (jobs.get(job).status, jobs.get(job).attempts) == ("running", attempt)
    assert runner(jobs, tmp_path, replica_died, max_attempts=3).run(job) == "failed"  # the third: final
    record = jobs.get(job)
    assert record.error == {"index": 0, "code": "internal", "message": "internal error: ConnectionError"}
    names = [name for _, name, _ in jobs.events(job)]
    assert names.count("retrying") == 2 and names[-1] == "failed"

    other = jobs.create(request.model_dump(exclude_none=True), owner=None)

    def not_a_desk(*_: Any, **__: Any) -> Any:
        raise NotADeskSetup("`image` does not look like a desk setup", field="image", score=0.1, threshold=0.5)

    assert runner(jobs, tmp_path, not_a_desk).run(other) == "failed"
    assert jobs.get(other).attempts == 1 and jobs.get(other).error["code"] == "not_a_desk_setup"


def test_cancel_stops_a_running_generation_at_its_next_step(
    generator: DeskGenerator, jobs: JobStore, tmp_path: Path
) -> None:
    request = JobRequest.model_validate({"text2img": {"prompt": "a desk", "steps": 5}})
    job = jobs.create(request.model_dump(exclude_none=True), owner=None)
    calls: list[str] = []
    generate = generate_with(generator, calls)
    steps_seen: list[int] = []

    def cancel_at_step_2(kind: str, body: dict[str, Any], image_id: str, on_step: Any, **_: Any) -> Any:
        def watched(step: int, steps: int) -> None:
            steps_seen.append(step)
            if step == 2:
                jobs.cancel(job)  # as POST /v1/jobs/{id}/cancel would, from another process
            on_step(step, steps)

        return generate(kind, body, image_id, watched)

    assert runner(jobs, tmp_path, cancel_at_step_2).run(job) == "canceled"
    assert steps_seen == [1, 2]  # stopped at the step it was canceled in, not 5
    record = jobs.get(job)
    assert (record.status, record.results) == ("canceled", [])


def test_a_receiver_that_is_down_fails_the_webhook_not_the_job(
    generator: DeskGenerator, jobs: JobStore, tmp_path: Path
) -> None:
    url = f"http://127.0.0.1:{free_port()}/hooks"
    request = JobRequest.model_validate({"text2img": {"prompt": "a desk"}, "webhook": url})
    job = jobs.create(request.model_dump(exclude_none=True), owner="backend", webhook={"url": url, "events": ["completed"]})

    def quick(*args: Any, **kw: Any) -> Any:
        from deskgen.jobs.webhooks import deliver

        return deliver(*args, **kw, max_attempts=3, base_delay_s=0.01)

    assert runner(jobs, tmp_path, generate_with(generator, []), deliver_fn=quick).run(job) == "succeeded"
    record = jobs.get(job)
    assert record.webhook_failed and len(record.results) == 1
    assert [len(d["attempts"]) for d in record.deliveries] == [3]
