"""The ingress's exposure buffer against a real store (SQLite file) behind a sink that can be made to fail:
nothing settled is lost, retries do not double count, a full buffer refuses before work starts."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from deployments.http_errors import status_of
from deskgen.errors import RecorderBacklog
from deskgen.experiments.buffer import ExposureBuffer
from deskgen.experiments.records import Experiment, Exposure
from deskgen.experiments.store import ExperimentStore

pytestmark = pytest.mark.unit

EXPERIMENT = Experiment(split={"a": 1.0, "b": 1.0}, salt="s", mixes={"a": {"dalle": 1.0}, "b": {"ott": 1.0}})


class FlakyStore:
    """A sink that writes to a real store, but fails its first ``failures`` calls — after writing, half the
    time, the way a lost answer looks to the caller."""

    def __init__(self, store: ExperimentStore, failures: int) -> None:
        self.store = store
        self.failures = failures
        self.calls = 0

    async def __call__(self, experiments: list[Experiment], batch: list[Exposure]) -> None:
        self.calls += 1
        if self.calls <= self.failures and self.calls % 2:
            raise ConnectionError("store down")
        for e in experiments:
            self.store.ensure_experiment(e)
        self.store.record_exposures(batch)
        if self.calls <= self.failures:
            raise TimeoutError("the answer was lost")


def exposures_in(store: ExperimentStore) -> int:
    return sum(s["exposures"] for s in store.summaries())


def settle(buffer: ExposureBuffer, image_id: str, arm: str = "a") -> None:
    r = buffer.reserve(EXPERIMENT, image_id=image_id, user_id="u-" + image_id, arm=arm, mix_id=arm, mix_source="ab")
    r.timings["total_s"] = 0.5
    r.settle("ok", 200, seed=7)
    r.settle("timeout", 504)  # a second outcome is ignored: the first is what the client got


def test_settled_exposures_survive_failed_and_lost_writes(tmp_path: Path) -> None:
    store = ExperimentStore.open(f"sqlite:///{tmp_path / 'e.db'}")
    sink = FlakyStore(store, failures=4)

    async def scenario() -> ExposureBuffer:
        buffer = ExposureBuffer(sink, capacity=100, flush_interval_s=0.001, batch_size=3, max_backoff_s=0.01)
        for i in range(10):
            settle(buffer, f"img-{i}", arm="ab"[i % 2])
        while buffer.stats.pending:
            await asyncio.sleep(0.005)
        return buffer

    buffer = asyncio.run(scenario())
    assert exposures_in(store) == 10  # every settled exposure stored exactly once
    assert buffer.stats.written == 10 and buffer.stats.failed_flushes == 4
    assert "lost" in (buffer.stats.last_error or "") or "down" in (buffer.stats.last_error or "")
    (summary,) = store.summaries()
    assert summary["id"] == EXPERIMENT.id and summary["users"] == 10
    rows = [tuple(r) for r in store.outcomes(EXPERIMENT.id)]
    assert sorted(r[1] for r in rows) == ["ok"] * 10  # the first outcome, not the later "timeout"


def test_a_full_buffer_refuses_new_requests_until_it_drains(tmp_path: Path) -> None:
    store = ExperimentStore.open(f"sqlite:///{tmp_path / 'e.db'}")
    sink = FlakyStore(store, failures=10**9)  # the store stays down

    async def scenario() -> None:
        buffer = ExposureBuffer(sink, capacity=3, flush_interval_s=0.001, max_backoff_s=0.01)
        for i in range(3):
            settle(buffer, f"img-{i}")
        with pytest.raises(RecorderBacklog) as refused:
            buffer.reserve(EXPERIMENT, image_id="img-x", user_id=None, arm="a", mix_id="a", mix_source="ab")
        assert status_of(refused.value) == 503 and buffer.stats.refused == 1
        assert buffer.stats.pending == 3  # nothing dropped while down
        sink.failures = 0  # the store is back
        assert await buffer.flush() == 3
        settle(buffer, "img-x")  # admitted again
        await buffer.close(timeout_s=5)

    asyncio.run(scenario())
    assert exposures_in(store) == 4


def test_close_hands_over_what_is_left(tmp_path: Path) -> None:
    store = ExperimentStore.open(f"sqlite:///{tmp_path / 'e.db'}")

    async def scenario() -> None:
        buffer = ExposureBuffer(FlakyStore(store, failures=1), capacity=10, flush_interval_s=60)
        settle(buffer, "img-1")
        await buffer.close(timeout_s=5)  # the first write fails, the retry inside close succeeds

    asyncio.run(scenario())
    assert exposures_in(store) == 1


def test_a_route_can_wait_until_its_exposure_is_committed(tmp_path: Path) -> None:
    """What delivery waits for: the exposure is in the store when ``committed`` says so; while the store is
    down the wait ends at its bound, and the exposure stays buffered (and is written later)."""
    store = ExperimentStore.open(f"sqlite:///{tmp_path / 'e.db'}")
    up = [True]

    async def sink(experiments: list[Experiment], batch: list[Exposure]) -> None:
        if not up[0]:
            raise ConnectionError("store down")
        for e in experiments:
            store.ensure_experiment(e)
        store.record_exposures(batch)

    async def scenario() -> None:
        buffer = ExposureBuffer(sink, capacity=100, flush_interval_s=0.01)
        r = buffer.reserve(EXPERIMENT, image_id="img-1", user_id="u", arm="a", mix_id="a", mix_source="ab")
        r.settle("ok", 200)
        assert await r.committed(5.0) is True
        assert exposures_in(store) == 1
        up[0] = False  # the store goes down
        down = buffer.reserve(EXPERIMENT, image_id="img-2", user_id="u", arm="a", mix_id="a", mix_source="ab")
        down.settle("ok", 200)
        assert await down.committed(0.2) is False
        assert buffer.stats.pending == 1 and exposures_in(store) == 1
        up[0] = True  # back: the buffered exposure is written, and a late waiter sees it
        assert await down.committed(10.0) is True
        assert exposures_in(store) == 2
        await buffer.close(timeout_s=1.0)

    asyncio.run(scenario())
