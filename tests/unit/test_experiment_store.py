"""The experiment store on a real SQLite file (WAL): migrations, idempotent writes, 404/409, per-user totals."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from deployments.http_errors import status_of
from deskgen.errors import FeedbackConflict, FeedbackForbidden, UnknownImage
from deskgen.experiments.records import Experiment, Exposure, Feedback, Policy, Sender, now
from deskgen.experiments.store import ExperimentStore, make_engine, migrate

pytestmark = pytest.mark.unit

EXPERIMENT = Experiment(split={"dalle_ott": 0.7, "ott_3d": 0.3}, salt="deskgen-ab-v1",
                        mixes={"dalle_ott": {"dalle": 0.7, "ott": 0.5}, "ott_3d": {"ott": 0.7, "3d": 0.5}})  # fmt: skip


@pytest.fixture()
def store(tmp_path: Path) -> ExperimentStore:
    s = ExperimentStore.open(f"sqlite:///{tmp_path / 'experiments.db'}")
    s.ensure_experiment(EXPERIMENT)
    return s


def exposure(image_id: str, user: str | None, arm: str = "dalle_ott", outcome: str = "ok", **kw: object) -> Exposure:
    return Exposure(image_id=image_id, experiment_id=EXPERIMENT.id, user_id=user, arm=arm, mix_id=arm,
                    mix_source="ab", outcome=outcome, status=200 if outcome == "ok" else 422, **kw)  # type: ignore[arg-type]  # fmt: skip


def test_the_migrations_create_exactly_the_schema_the_code_uses(tmp_path: Path) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from deskgen.experiments.schema import metadata

    engine = make_engine(f"sqlite:///{tmp_path / 'x.db'}")
    migrate(engine)
    with engine.connect() as c:
        assert c.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert compare_metadata(MigrationContext.configure(c), metadata) == []
    migrate(engine)  # idempotent: already at head


def test_an_experiment_is_its_split_salt_and_mixes() -> None:
    assert EXPERIMENT.id == Experiment(dict(EXPERIMENT.split), EXPERIMENT.salt, dict(EXPERIMENT.mixes)).id
    assert Experiment({"dalle_ott": 0.5, "ott_3d": 0.5}, EXPERIMENT.salt, EXPERIMENT.mixes).id != EXPERIMENT.id
    assert Experiment(EXPERIMENT.split, "v2", EXPERIMENT.mixes).id != EXPERIMENT.id
    assert Experiment(EXPERIMENT.split, EXPERIMENT.salt, {}).id != EXPERIMENT.id


def test_writes_are_idempotent_and_survive_a_new_engine(store: ExperimentStore, tmp_path: Path) -> None:
    batch = [exposure("img-1", "alice"), exposure("img-2", "bob", arm="ott_3d")]
    assert store.record_exposures(batch) == 2
    assert store.record_exposures(batch) == 0  # a retried batch
    receipt = store.record_feedback(Feedback("img-1", "like", user_id="alice"))
    assert (receipt.new, receipt.experiment_id, receipt.arm) == (True, EXPERIMENT.id, "dalle_ott")
    assert store.record_feedback(Feedback("img-1", "like", user_id="alice")).new is False  # a retried post
    assert store.record_feedback(Feedback("img-2", "download", user_id="bob")).new is True
    assert store.record_feedback(Feedback("img-1", "download", user_id="alice")).new is True
    reopened = ExperimentStore.open(f"sqlite:///{tmp_path / 'experiments.db'}")
    totals = {(t.arm, t.user_id): (t.exposures, t.events) for t in reopened.user_totals(EXPERIMENT.id)}
    assert totals == {("dalle_ott", "alice"): (1, {"like": 1, "download": 1}), ("ott_3d", "bob"): (1, {"download": 1})}
    assert reopened.experiment_ids() == [EXPERIMENT.id]


def test_feedback_for_an_unknown_image_or_another_user_is_refused(store: ExperimentStore) -> None:
    store.record_exposures([exposure("img-1", "alice"), exposure("img-anon", None),
                            exposure("img-422", "alice", outcome="not_a_desk_setup")])  # fmt: skip
    with pytest.raises(UnknownImage) as unknown:
        store.record_feedback(Feedback("img-404", "like"))
    assert (status_of(unknown.value), unknown.value.field) == (404, "image_id")
    with pytest.raises(UnknownImage):  # answered, but with an error and no image
        store.record_feedback(Feedback("img-422", "like", user_id="alice"))
    with pytest.raises(FeedbackConflict) as conflict:
        store.record_feedback(Feedback("img-1", "like", user_id="mallory"))
    assert (status_of(conflict.value), conflict.value.field) == (409, "user_id")
    with pytest.raises(FeedbackConflict):
        store.record_feedback(Feedback("img-anon", "like", user_id="mallory"))


def test_user_totals_count_delivered_images_and_feedback_after_the_first_exposure(store: ExperimentStore) -> None:
    t0 = now()
    store.record_exposures([
        exposure("a1", "alice", created_at=t0), exposure("a2", "alice", created_at=t0 + timedelta(seconds=1)),
        exposure("a3", "alice", outcome="not_a_desk_setup", created_at=t0 + timedelta(seconds=2)),
        exposure("b1", "bob", arm="ott_3d", created_at=t0), exposure("n1", None, created_at=t0),
    ])  # fmt: skip
    store.record_feedback(Feedback("a1", "like", user_id="alice", created_at=t0 + timedelta(seconds=5)))
    store.record_feedback(Feedback("a2", "like", user_id="alice", created_at=t0 + timedelta(seconds=6)))
    store.record_feedback(Feedback("a2", "select", user_id="alice", created_at=t0 + timedelta(seconds=6)))
    # Feedback stamped before bob's first exposure (a clock skew, a replayed event) does not count.
    store.record_feedback(Feedback("b1", "like", user_id="bob", created_at=t0 - timedelta(seconds=1)))
    totals = {(t.arm, t.user_id): (t.exposures, t.events) for t in store.user_totals(EXPERIMENT.id)}
    assert totals == {("dalle_ott", "alice"): (2, {"like": 2, "select": 1}), ("ott_3d", "bob"): (1, {})}
    outcomes = sorted((arm, outcome) for arm, outcome, _, _, _ in store.outcomes(EXPERIMENT.id))
    assert outcomes == [("dalle_ott", "not_a_desk_setup"), ("dalle_ott", "ok"), ("dalle_ott", "ok"),
                        ("dalle_ott", "ok"), ("ott_3d", "ok")]  # fmt: skip


def test_only_the_generating_key_and_the_delivered_user_may_rate_an_image(store: ExperimentStore) -> None:
    store.record_exposures([exposure("img-a", "alice", api_key="backend"), exposure("img-anon", None, api_key="backend"),
                            exposure("img-open", None)])  # fmt: skip
    keyed = Sender(api_key="backend", keys_required=True)
    other = Sender(api_key="partner", keys_required=True)
    with pytest.raises(FeedbackForbidden) as wrong_key:
        store.record_feedback(Feedback("img-a", "like", user_id="alice"), other)
    assert (status_of(wrong_key.value), wrong_key.value.field) == (403, "image_id")
    assert "only with the API key that generated it" in wrong_key.value.message
    with pytest.raises(FeedbackForbidden) as no_user:
        store.record_feedback(Feedback("img-a", "like"), keyed)
    assert (status_of(no_user.value), no_user.value.field) == (403, "user_id")
    with pytest.raises(FeedbackConflict):
        store.record_feedback(Feedback("img-a", "like", user_id="mallory"), keyed)
    assert store.record_feedback(Feedback("img-a", "like", user_id="alice"), keyed).new
    with pytest.raises(FeedbackForbidden):
        store.record_feedback(Feedback("img-anon", "like"), other)
    assert store.record_feedback(Feedback("img-anon", "like"), keyed).new
    # Made while the API was open (no key on the exposure), or keys not required now: the key does not decide.
    assert store.record_feedback(Feedback("img-open", "like"), other).new
    assert store.record_feedback(Feedback("img-anon", "select"), Sender(api_key=None, keys_required=False)).new


def test_allocations_keep_the_first_writer_per_epoch_and_assignments_the_first_arm(store: ExperimentStore) -> None:
    first = store.store_allocation(EXPERIMENT.id, 7, "thompson", {"dalle_ott": 0.9, "ott_3d": 0.1},
                                   {"dalle_ott": 0.99, "ott_3d": 0.01}, {"dalle_ott": 5, "ott_3d": 5})  # fmt: skip
    late = store.store_allocation(EXPERIMENT.id, 7, "thompson", {"dalle_ott": 0.2, "ott_3d": 0.8}, {}, {})
    assert late == first and first["weights"] == {"dalle_ott": 0.9, "ott_3d": 0.1}
    store.store_allocation(EXPERIMENT.id, 3, "burn_in", {"dalle_ott": 0.5, "ott_3d": 0.5}, {}, {})
    assert [h["epoch"] for h in store.allocation_history(EXPERIMENT.id)] == [3, 7]
    assert store.allocation(EXPERIMENT.id, 8) is None
    assert store.assign(EXPERIMENT.id, "alice", "ott_3d", {"dalle_ott": 0.1, "ott_3d": 0.9}) == "ott_3d"
    assert store.assign(EXPERIMENT.id, "alice", "dalle_ott", {"dalle_ott": 0.9, "ott_3d": 0.1}) == "ott_3d"  # sticky
    assert store.assignment_weights(EXPERIMENT.id) == {"alice": {"dalle_ott": 0.1, "ott_3d": 0.9}}


def test_a_policy_change_keeps_the_experiment_and_updates_its_policy(store: ExperimentStore) -> None:
    stricter = Experiment(EXPERIMENT.split, EXPERIMENT.salt, EXPERIMENT.mixes, policy=Policy(alpha=0.01, mde=0.05))
    assert stricter.id == EXPERIMENT.id
    store.ensure_experiment(stricter)
    stored = store.experiment(EXPERIMENT.id)
    assert stored is not None and stored.policy == stricter.policy
    # Under Thompson allocation the split is the burn-in's only: its shares are not the experiment.
    bandit = Experiment(EXPERIMENT.split, EXPERIMENT.salt, EXPERIMENT.mixes, policy=Policy(allocation="thompson"))
    moved = Experiment({"dalle_ott": 0.5, "ott_3d": 0.5}, EXPERIMENT.salt, EXPERIMENT.mixes, policy=Policy(allocation="thompson"))
    assert bandit.id == moved.id != EXPERIMENT.id
    assert Experiment(EXPERIMENT.split, "v2", EXPERIMENT.mixes, policy=Policy(allocation="thompson")).id != bandit.id
