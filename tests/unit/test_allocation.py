"""The ingress's arm choice against the real Recorder class and a real SQLite store (no Ray): fixed splits
hash users, a Thompson experiment burns in on the split, then moves new users to the better arm while old
users keep theirs, every replica reads the same weights within an epoch, and a store that does not answer
never blocks a request."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from deployments.allocation import Allocator
from deployments.recorder import Recorder
from deskgen.ab import pick_arm
from deskgen.experiments.records import Experiment, Exposure, Feedback, Policy

pytestmark = pytest.mark.unit

MIXES = {"a": {"dalle": 1.0}, "b": {"ott": 1.0}}


def experiment(allocation: str, **policy: Any) -> Experiment:
    return Experiment(split={"a": 0.5, "b": 0.5}, salt="alloc-test", mixes=MIXES,
                      policy=Policy(allocation=allocation, floors={"a": 0.05, "b": 0.05}, **policy))  # type: ignore[arg-type]  # fmt: skip


@pytest.fixture()
def recorder(tmp_path: Path) -> Any:
    return Recorder.func_or_class(f"sqlite:///{tmp_path / 'e.db'}")


def caller(recorder: Any, calls: list[str]) -> Any:
    async def call(name: str, args: tuple[Any, ...]) -> Any:
        calls.append(name)
        return await getattr(recorder, name)(*args)

    return call


def test_a_fixed_split_hashes_users_without_asking_the_store(recorder: Any) -> None:
    calls: list[str] = []
    allocator = Allocator(caller(recorder, calls))
    exp = experiment("fixed")
    arms = asyncio.run(_arms(allocator, exp, [f"u{i}" for i in range(20)]))
    assert arms == [pick_arm(exp.split, f"u{i}", exp.salt) for i in range(20)]
    assert calls == []


async def _arms(allocator: Allocator, exp: Experiment, users: list[str]) -> list[str]:
    return [await allocator.arm(exp, u) for u in users]


def test_thompson_burns_in_then_moves_new_users_and_keeps_old_ones(recorder: Any) -> None:
    exp = experiment("thompson", burn_in_users=5, update_every_s=1.0)
    calls: list[str] = []

    async def scenario() -> None:
        replica, other = Allocator(caller(recorder, calls)), Allocator(caller(recorder, calls))
        first = {f"early-{i}": await replica.arm(exp, f"early-{i}") for i in range(30)}
        assert (replica.current() or {})["phase"] == "burn_in"
        assert set(first.values()) == {"a", "b"}
        # What the users did: b's images are liked, a's are not.
        batch = [Exposure(image_id=f"img-{u}", experiment_id=exp.id, user_id=u, arm=arm, mix_id=arm, mix_source="ab",
                          outcome="ok", status=200) for u, arm in first.items()]  # fmt: skip
        await recorder.record_exposures([exp], batch)
        for u, arm in first.items():
            if arm == "b":
                recorder.store.record_feedback(Feedback(f"img-{u}", "like", user_id=u))
        await asyncio.sleep(1.05)  # the next epoch
        await replica.weights(exp)  # starts the background refresh; the request does not wait
        while replica.current() is None or replica.current()["phase"] != "thompson":  # type: ignore[index]
            await asyncio.sleep(0.01)
        weights = await replica.weights(exp)
        assert weights["b"] > 0.9 and weights["a"] >= 0.05 - 1e-12
        # A second replica (a fresh one, or one restarted) reads the same stored weights for this epoch.
        if int(time.time() // 1.0) == replica.current()["epoch"]:  # type: ignore[index]
            assert await other.weights(exp) == weights
        late = [await replica.arm(exp, f"late-{i}") for i in range(40)]
        assert late.count("b") >= 30, late
        for u, arm in first.items():  # sticky: through this replica's cache and through the store
            assert await replica.arm(exp, u) == arm
            assert await Allocator(caller(recorder, calls)).arm(exp, u) == arm

    asyncio.run(scenario())


def test_a_store_that_does_not_answer_never_blocks_a_request(recorder: Any) -> None:
    exp = experiment("thompson", burn_in_users=5, update_every_s=1.0)

    async def down(name: str, args: tuple[Any, ...]) -> Any:
        raise TimeoutError("the experiment store did not answer")

    async def scenario() -> None:
        allocator = Allocator(down)
        arm = await allocator.arm(exp, "someone")
        assert arm == pick_arm({"a": 0.5, "b": 0.5}, "someone", exp.salt)  # the split's proposal
        assert allocator.current() is None
        assert await allocator.arm(exp, None) in ("a", "b")

    asyncio.run(scenario())
