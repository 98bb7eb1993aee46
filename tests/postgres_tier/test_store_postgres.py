"""The experiment store on a real PostgreSQL 15 server: the migrations, idempotent writes (also under
concurrent retries), 404/409, per-user totals, and the same report as SQLite gives for the same writes.

The SQLite tests' scenarios are reused as they are (called with a PostgreSQL store) where they only need a
store; each test gets a fresh database (``pg_url``)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from deskgen.experiments.records import Experiment, Exposure, Feedback, now
from deskgen.experiments.report import build_report
from deskgen.experiments.store import ExperimentStore, make_engine, migrate
from tests.unit import test_experiment_store as sqlite_store_tests
from tests.unit.test_experiment_store import EXPERIMENT, exposure

pytestmark = pytest.mark.postgres


@pytest.fixture()
def store(pg_url: str) -> Iterator[ExperimentStore]:
    s = ExperimentStore.open(pg_url)
    s.ensure_experiment(EXPERIMENT)
    yield s
    s.engine.dispose()


def test_the_migrations_create_exactly_the_schema_the_code_uses(pg_url: str) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext
    from alembic.script import ScriptDirectory

    from deskgen.experiments.schema import metadata
    from deskgen.experiments.store import MIGRATIONS

    engine = make_engine(pg_url)
    try:
        assert engine.dialect.name == "postgresql" and engine.dialect.driver == "psycopg"
        migrate(engine)
        with engine.connect() as c:
            assert c.exec_driver_sql("SHOW server_version_num").scalar_one() >= "150000"
            assert compare_metadata(MigrationContext.configure(c), metadata) == []
            head = ScriptDirectory(str(MIGRATIONS)).get_current_head()
            assert c.exec_driver_sql("SELECT version_num FROM alembic_version").scalars().all() == [head]
        migrate(engine)  # idempotent: already at head
    finally:
        engine.dispose()


def test_writes_are_idempotent_and_survive_a_new_engine(store: ExperimentStore, pg_url: str) -> None:
    assert store.ensure_experiment(EXPERIMENT) == EXPERIMENT.id  # again: no second row
    batch = [exposure("img-1", "alice", timings={"total_s": 1.25}), exposure("img-2", "bob", arm="ott_3d")]
    assert store.record_exposures(batch) == 2
    assert store.record_exposures(batch) == 0  # a retried batch
    assert store.record_exposures([*batch, exposure("img-3", "alice")]) == 1  # a batch with one new row
    assert store.record_exposures([]) == 0
    assert store.record_feedback(Feedback("img-1", "like", user_id="alice")).new is True
    assert store.record_feedback(Feedback("img-1", "like", user_id="alice")).new is False  # a retried post
    assert store.record_feedback(Feedback("img-1", "download", user_id="alice")).new is True
    reopened = ExperimentStore.open(pg_url)
    try:
        totals = {(t.arm, t.user_id): (t.exposures, t.events) for t in reopened.user_totals(EXPERIMENT.id)}
        assert totals == {("dalle_ott", "alice"): (2, {"like": 1, "download": 1}), ("ott_3d", "bob"): (1, {})}
        assert reopened.experiment_ids() == [EXPERIMENT.id]
        assert reopened.experiment(EXPERIMENT.id) == EXPERIMENT  # JSON columns round-trip, key order kept
        assert list(reopened.experiment(EXPERIMENT.id).split) == list(EXPERIMENT.split)  # type: ignore[union-attr]
        assert reopened.experiment("exp-000000000000") is None
        timings = {arm: t for arm, _, _, t, _ in reopened.outcomes(EXPERIMENT.id) if t}
        assert timings == {"dalle_ott": {"total_s": 1.25}}
        with reopened.engine.connect() as c:
            stamp = c.exec_driver_sql("SELECT created_at FROM exposures WHERE image_id = 'img-1'").scalar_one()
        assert stamp.utcoffset() == timedelta(0) and stamp == batch[0].created_at  # timestamptz, exact
    finally:
        reopened.engine.dispose()


def test_concurrent_retries_count_once(store: ExperimentStore) -> None:
    """Retries racing on separate connections: ON CONFLICT DO NOTHING lets exactly one insert win, and no
    retry fails with a unique violation."""
    batch = [exposure(f"img-{i}", f"user-{i % 3}") for i in range(20)]
    with ThreadPoolExecutor(max_workers=4) as pool:
        inserted = list(pool.map(lambda _: store.record_exposures(batch), range(8)))
        stored = list(pool.map(lambda _: store.record_feedback(Feedback("img-0", "like", user_id="user-0")).new, range(8)))
    assert sum(inserted) == 20 and stored.count(True) == 1
    totals = {t.user_id: (t.exposures, t.events) for t in store.user_totals(EXPERIMENT.id)}
    assert totals == {"user-0": (7, {"like": 1}), "user-1": (7, {}), "user-2": (6, {})}


def test_feedback_for_an_unknown_image_or_another_user_is_refused(store: ExperimentStore) -> None:
    sqlite_store_tests.test_feedback_for_an_unknown_image_or_another_user_is_refused(store)
    # A refused post wrote nothing, and the transaction it ran in did not poison the next one.
    assert store.record_feedback(Feedback("img-1", "like", user_id="alice")).new is True
    assert {t.user_id: t.events for t in store.user_totals(EXPERIMENT.id)} == {"alice": {"like": 1}}


def test_user_totals_count_delivered_images_and_feedback_after_the_first_exposure(store: ExperimentStore) -> None:
    sqlite_store_tests.test_user_totals_count_delivered_images_and_feedback_after_the_first_exposure(store)


def test_only_the_generating_key_and_the_delivered_user_may_rate_an_image(store: ExperimentStore) -> None:
    sqlite_store_tests.test_only_the_generating_key_and_the_delivered_user_may_rate_an_image(store)


def test_allocations_keep_the_first_writer_per_epoch_and_assignments_the_first_arm(store: ExperimentStore) -> None:
    sqlite_store_tests.test_allocations_keep_the_first_writer_per_epoch_and_assignments_the_first_arm(store)


def test_a_policy_change_keeps_the_experiment_and_updates_its_policy(store: ExperimentStore) -> None:
    sqlite_store_tests.test_a_policy_change_keeps_the_experiment_and_updates_its_policy(store)


def test_racing_first_requests_of_a_user_agree_on_one_arm_and_one_epoch_on_one_weight_set(store: ExperimentStore) -> None:
    """Replicas (threads on their own connections) assign a new user and store an epoch's weights at once:
    the first insert wins and every caller gets what it stored."""
    arms = ["dalle_ott", "ott_3d"] * 8
    with ThreadPoolExecutor(max_workers=8) as pool:
        got = list(pool.map(lambda arm: store.assign(EXPERIMENT.id, "racer", arm, {arm: 1.0}), arms))
        weights = list(pool.map(lambda i: store.store_allocation(EXPERIMENT.id, 42, "thompson", {"dalle_ott": i / 16, "ott_3d": 1 - i / 16},
                                                                 {}, {})["weights"], range(16)))  # fmt: skip
    assert len(set(got)) == 1 and store.assignment_weights(EXPERIMENT.id) == {"racer": {got[0]: 1.0}}
    assert all(w == weights[0] for w in weights)


def _scenario(seed: int) -> tuple[list[Exposure], list[Feedback]]:
    """Two arms of users with 1..6 images each, likes and downloads (some retried, some stamped before the
    user's first exposure), anonymous exposures, gate rejections and timeouts."""
    rng = np.random.default_rng(seed)
    t0 = now()
    exposures: list[Exposure] = []
    feedback: list[Feedback] = []
    for arm, like_p in (("dalle_ott", 0.3), ("ott_3d", 0.6)):
        for u in range(15):
            user = f"{arm}-u{u}"
            for i in range(int(rng.integers(1, 7))):
                image, at = f"{user}-i{i}", t0 + timedelta(seconds=10 * i + u)
                timings = {"total_s": float(rng.uniform(0.5, 2.0)), "generate_s": float(rng.uniform(0.3, 1.5))}
                exposures.append(exposure(image, user, arm=arm, timings=timings, created_at=at))
                if rng.random() < like_p:
                    feedback += [Feedback(image, "like", user_id=user, created_at=at + timedelta(seconds=2))] * 2
                if rng.random() < 0.2:
                    feedback.append(Feedback(image, "download", user_id=user, created_at=at - timedelta(hours=1)))  # skewed clock
                if i == 0 and rng.random() < 0.5:
                    feedback.append(Feedback(image, "select", user_id=user, value=float(i), created_at=at + timedelta(seconds=1)))
        exposures.append(exposure(f"{arm}-anon", None, arm=arm, timings={"total_s": 9.0}))
        exposures.append(exposure(f"{arm}-rejected", f"{arm}-u0", arm=arm, outcome="not_a_desk_setup"))
        exposures.append(Exposure(f"{arm}-timeout", EXPERIMENT.id, f"{arm}-u1", arm, arm, "ab", "timeout", 504))
    return exposures, feedback


def _assert_same(a: Any, b: Any, where: str = "report") -> None:
    """Equal structure and values; floats equal to 1e-12 (the stores return users in no fixed order, so
    sums over users may differ in the last bit)."""
    if isinstance(a, float) and isinstance(b, float):
        assert math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-15), f"{where}: {a} != {b}"
    elif isinstance(a, dict) and isinstance(b, dict):
        assert list(a) == list(b), f"{where}: keys {list(a)} != {list(b)}"
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list) and isinstance(b, list):
        assert len(a) == len(b), f"{where}: {len(a)} items != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert type(a) is type(b) and a == b, f"{where}: {a!r} != {b!r}"


def test_the_report_is_the_same_on_postgresql_as_on_sqlite(store: ExperimentStore, tmp_path: Path) -> None:
    lite = ExperimentStore.open(f"sqlite:///{tmp_path / 'experiments.db'}")
    try:
        lite.ensure_experiment(EXPERIMENT)
        empty = build_report(lite, EXPERIMENT.id), build_report(store, EXPERIMENT.id)
        assert empty[0] is not None and empty[1] is not None
        _assert_same(empty[0].public(), empty[1].public())
        exposures, feedback = _scenario(seed=11)
        for s in (lite, store):
            assert s.record_exposures(exposures[:40]) == 40 and s.record_exposures(exposures) == len(exposures) - 40
            assert sum(s.record_feedback(fb).new for fb in feedback) == len(set((f.image_id, f.event) for f in feedback))
        on_sqlite, on_postgres = build_report(lite, EXPERIMENT.id), build_report(store, EXPERIMENT.id)
        assert on_sqlite is not None and on_postgres is not None
        assert sum(a.users for a in on_postgres.arms) == 30
        assert any(a.rates["like"].events for a in on_postgres.arms)
        _assert_same(on_sqlite.public(), on_postgres.public())
        assert build_report(store, "exp-000000000000") is None
        other = Experiment({"a": 0.5, "b": 0.5}, "s2", {"a": {}, "b": {}})
        store.ensure_experiment(other)
        assert store.experiment_ids() == [EXPERIMENT.id, other.id]
    finally:
        lite.engine.dispose()
