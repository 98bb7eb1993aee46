"""DynamicBatcher: batches form when the model is free, from what queued meanwhile."""

from __future__ import annotations

import asyncio

import pytest

from deskgen.batching import DynamicBatcher

pytestmark = pytest.mark.unit


class SlowModel:
    """Doubles its inputs; each batch takes ``seconds``; records the batches it saw."""

    def __init__(self, seconds: float = 0.05, fail_on: int | None = None) -> None:
        self.seconds = seconds
        self.fail_on = fail_on
        self.batches: list[list[int]] = []

    async def __call__(self, items: list[int]) -> list[int]:
        self.batches.append(list(items))
        await asyncio.sleep(self.seconds)
        if self.fail_on is not None and self.fail_on in items:
            raise ValueError(f"bad item {self.fail_on}")
        return [2 * i for i in items]


def test_requests_arriving_during_a_batch_form_the_next_batch() -> None:
    async def scenario() -> tuple[list[int], list[list[int]]]:
        model = SlowModel(seconds=0.1)
        batcher = DynamicBatcher(model, max_batch_size=8, max_wait_s=0.0)
        first = asyncio.create_task(batcher.submit(0))
        await asyncio.sleep(0.02)  # the first batch is running now
        later = []
        for i in range(1, 8):  # arrive one by one, 5 ms apart, while it runs
            later.append(asyncio.create_task(batcher.submit(i)))
            await asyncio.sleep(0.005)
        results = await asyncio.gather(first, *later)
        return results, model.batches

    results, batches = asyncio.run(scenario())
    assert results == [0, 2, 4, 6, 8, 10, 12, 14]
    assert batches == [[0], [1, 2, 3, 4, 5, 6, 7]]


def test_an_idle_model_waits_briefly_to_fill_a_batch_and_caps_its_size() -> None:
    async def scenario() -> list[list[int]]:
        model = SlowModel(seconds=0.01)
        batcher = DynamicBatcher(model, max_batch_size=4, max_wait_s=0.05)
        tasks = []
        for i in range(10):
            tasks.append(asyncio.create_task(batcher.submit(i)))
            await asyncio.sleep(0.001)
        assert await asyncio.gather(*tasks) == [2 * i for i in range(10)]
        return model.batches

    assert asyncio.run(scenario()) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_a_failing_batch_fails_its_callers_only() -> None:
    async def scenario() -> tuple[list[object], list[list[int]]]:
        model = SlowModel(seconds=0.01, fail_on=1)
        batcher = DynamicBatcher(model, max_batch_size=2, max_wait_s=0.02)
        tasks = [asyncio.create_task(batcher.submit(i)) for i in range(4)]
        return await asyncio.gather(*tasks, return_exceptions=True), model.batches

    results, batches = asyncio.run(scenario())
    assert batches == [[0, 1], [2, 3]]
    assert [type(r) for r in results[:2]] == [ValueError, ValueError] and "bad item 1" in str(results[0])
    assert results[2:] == [4, 6]


def test_cancelled_callers_are_left_out_and_bad_settings_refused() -> None:
    async def scenario() -> list[list[int]]:
        model = SlowModel(seconds=0.05)
        batcher = DynamicBatcher(model, max_batch_size=8, max_wait_s=0.0)
        first = asyncio.create_task(batcher.submit(0))
        await asyncio.sleep(0.01)
        gone = asyncio.create_task(batcher.submit(1))
        kept = asyncio.create_task(batcher.submit(2))
        await asyncio.sleep(0.005)
        gone.cancel()
        assert await first == 0 and await kept == 4
        return model.batches

    assert asyncio.run(scenario()) == [[0], [2]]
    with pytest.raises(ValueError, match="max_batch_size must be >= 1 but is 0"):
        DynamicBatcher(SlowModel(), max_batch_size=0)
    with pytest.raises(ValueError, match="max_wait_s must be >= 0"):
        DynamicBatcher(SlowModel(), max_wait_s=-1)


def test_batch_sizes_keep_a_bounded_window_and_exact_totals() -> None:
    from deskgen.batching import BATCH_WINDOW

    async def scenario() -> DynamicBatcher[int, int]:
        batcher: DynamicBatcher[int, int] = DynamicBatcher(SlowModel(seconds=0.0), max_batch_size=1, max_wait_s=0.0)
        for i in range(BATCH_WINDOW + 10):  # one at a time: one batch each
            assert await batcher.submit(i) == 2 * i
        return batcher

    batcher = asyncio.run(scenario())
    assert len(batcher.batch_sizes) == BATCH_WINDOW  # a long-lived replica does not grow without bound
    assert (batcher.batches_total, batcher.items_total) == (BATCH_WINDOW + 10, BATCH_WINDOW + 10)
