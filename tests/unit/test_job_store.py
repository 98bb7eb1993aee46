"""Job records on a real Redis (deskgen/jobs/store.py): positions, atomic transitions, cancellation of a
queued and of a running job, Cancel-After, events in order, the queue bound, retention, a restart."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from deployments.http_errors import status_of
from deskgen.errors import JobQueueFull, UnknownJob
from deskgen.jobs.store import JobStore
from deskgen.tools.redis import running_redis

pytestmark = pytest.mark.unit


@pytest.fixture()
def store(tmp_path: Path) -> Iterator[JobStore]:
    import redis

    with running_redis(tmp_path / "redis") as url:
        yield JobStore(redis.Redis.from_url(url), retention_s=60, max_queued=3)


def test_positions_transitions_and_results(store: JobStore) -> None:
    a, b, c = (store.create({"text2img": {"prompt": f"desk {k}"}}, owner="backend") for k in range(3))
    assert [store.get(j).position for j in (a, b, c)] == [0, 1, 2]
    with pytest.raises(JobQueueFull) as full:
        store.create({}, owner=None)
    assert status_of(full.value) == 503
    assert store.claim(a, "r1", 30) == "run" and store.get(a).status == "running" and store.get(b).position == 0
    assert store.claim(a, "r1", 30) == "run"  # its runner, again (after waiting Redis out)
    store.progress(a, {"image": 0, "step": 3, "steps": 30})
    store.add_result(a, 0, {"image_id": f"{a}-0"})
    store.add_result(a, 0, {"image_id": f"{a}-0"})  # made again after a redelivery: still one result
    assert store.finish(a, "succeeded")
    record = store.get(a)
    assert (record.status, record.results, record.progress) == ("succeeded", [{"image_id": f"{a}-0", "index": 0}],
                                                               {"image": 0, "step": 3, "steps": 30})  # fmt: skip
    assert store.claim(a, "r2", 30) == "done"  # finished: never runs again
    assert 0 < store.redis.ttl(store.key(a)) <= 60
    with pytest.raises(UnknownJob) as unknown:
        store.get("job_nope")
    assert status_of(unknown.value) == 404


def test_cancel_a_queued_job_at_once_and_a_running_one_at_its_next_step(store: JobStore) -> None:
    queued = store.create({}, owner=None)
    assert store.cancel(queued) == "canceled" and store.claim(queued, "r", 30) == "done"
    running = store.create({}, owner=None)
    store.claim(running, "r", 30)
    assert not store.canceled(running)
    assert store.cancel(running) == "running" and store.canceled(running)
    late = store.create({}, owner=None, cancel_after_s=0.5)
    store.claim(late, "r", 30)
    assert not store.canceled(late)
    time.sleep(0.6)
    assert store.canceled(late)  # past its Cancel-After deadline


def test_events_come_in_order_and_survive_a_redis_restart(tmp_path: Path) -> None:
    import redis

    folder = tmp_path / "redis"
    with running_redis(folder) as url:
        store = JobStore(redis.Redis.from_url(url))
        job = store.create({"text2img": {}}, owner="backend")
        store.event(job, "started", {"status": "running"})
        store.event(job, "progress", {"step": 1})
    with running_redis(folder) as url:
        store = JobStore(redis.Redis.from_url(url))
        assert store.get(job).position == 0  # the queue survived
        events = store.events(job)
        assert [name for _, name, _ in events] == ["queued", "started", "progress"]
        last = events[-1][0]
        assert store.events(job, after=last, block_ms=100) == []
        store.event(job, "completed", {})
        assert [name for _, name, _ in store.events(job, after=last)] == ["completed"]
