"""Experiment storage: SQLAlchemy 2 over SQLite (the embedded default, in WAL mode) or PostgreSQL, chosen
by one URL; the schema comes from versioned Alembic migrations (:func:`migrate`).

Writes are idempotent so that a retry after a lost answer never double counts: an exposure is keyed by
its image id, feedback by (image id, event). Feedback for an image that was never exposed is refused
(:class:`~deskgen.errors.UnknownImage`, 404), and so is feedback whose user is not the exposure's
(:class:`~deskgen.errors.FeedbackConflict`, 409).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event, func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url

from deskgen.errors import FeedbackConflict, FeedbackForbidden, UnknownImage
from deskgen.experiments.records import Experiment, Exposure, Feedback, Policy, Sender, now
from deskgen.experiments.schema import allocations, assignments, experiments, exposures, feedback
from deskgen.paths import resolve

MIGRATIONS = Path(__file__).resolve().parent / "migrations"


def database_url(url: str) -> str:
    """``url`` with a relative SQLite path made absolute against the project root (a Ray worker's cwd is
    its own) and the file's folder created."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        path = resolve(parsed.database)
        path.parent.mkdir(parents=True, exist_ok=True)
        return parsed.set(database=str(path)).render_as_string(hide_password=False)
    return url


def make_engine(url: str) -> Engine:
    """An engine for ``url``. SQLite runs in WAL mode with full fsync: readers never block the writer,
    and an answered write survives a killed process."""
    engine = create_engine(database_url(url), pool_pre_ping=True)
    if engine.dialect.name == "sqlite":

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=FULL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA busy_timeout=5000")
            cursor.close()

    return engine


def migrate(engine: Engine, revision: str = "head") -> None:
    """Bring the schema to ``revision`` with the migrations in :data:`MIGRATIONS`."""
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, revision)


def _allocation_row(row: Any) -> dict[str, Any]:
    return {"epoch": int(row.epoch), "phase": row.phase, "weights": dict(row.weights), "p_best": dict(row.p_best),
            "users": dict(row.users), "computed_at": row.computed_at.isoformat()}  # fmt: skip


def _insert(connection: Connection, table: Any) -> Any:
    """An INSERT that skips rows whose key exists (both dialects we support spell it the same). Its result
    keeps the row count: psycopg resets a closed cursor's to -1, and SQLAlchemy closes the cursor of an
    INSERT without RETURNING before we read it."""
    dialect = postgresql if connection.dialect.name == "postgresql" else sqlite
    return dialect.insert(table).execution_options(preserve_rowcount=True)


@dataclass(frozen=True)
class UserTotals:
    """One user's exposures in an arm and the events among them (for the ratio metrics)."""

    arm: str
    user_id: str
    exposures: int
    events: dict[str, int]


#: The concept label of requests made without a concept preset.
NO_CONCEPT = "none"


@dataclass(frozen=True)
class ConceptTotals:
    """Delivered images of one arm made with one concept preset, their feedback and product location."""

    arm: str
    concept: str
    exposures: int
    events: dict[str, int]
    located: int
    mean_found_fraction: float


@dataclass(frozen=True)
class FeedbackReceipt:
    """What storing a feedback event did: ``new`` is False for a retry of one already stored."""

    new: bool
    experiment_id: str
    arm: str | None


class ExperimentStore:
    """Reads and writes experiments, exposures and feedback through one engine."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    @classmethod
    def open(cls, url: str) -> ExperimentStore:
        engine = make_engine(url)
        migrate(engine)
        return cls(engine)

    def ensure_experiment(self, experiment: Experiment) -> str:
        """Store ``experiment`` if new; its policy (not part of its id) is updated to the one given."""
        policy = experiment.policy.public()
        with self.engine.begin() as c:
            row = {"id": experiment.id, "split": experiment.split, "salt": experiment.salt,
                   "mixes": experiment.mixes, "created_at": now(), "policy": policy}  # fmt: skip
            c.execute(_insert(c, experiments).values(row).on_conflict_do_nothing(index_elements=["id"]))
            c.execute(experiments.update().where(experiments.c.id == experiment.id).values(policy=policy))
        return experiment.id

    def record_exposures(self, batch: Sequence[Exposure]) -> int:
        """Insert ``batch`` in one transaction; rows already there (a retry) are skipped. Returns how many
        were new."""
        if not batch:
            return 0
        with self.engine.begin() as c:
            result = c.execute(
                _insert(c, exposures).values([e.row() for e in batch]).on_conflict_do_nothing(index_elements=["image_id"])
            )
        return int(result.rowcount or 0)

    def record_feedback(self, fb: Feedback, sender: Sender | None = None) -> FeedbackReceipt:
        """Store ``fb``; the receipt says whether it is new (not a retry of a stored (image, event)) and
        which experiment arm the image belongs to.

        Who may rate an image: with API keys required (``sender.keys_required``), only the key that
        generated it (an image made while the API was open has no key and any key may rate it); an image
        delivered to a user id needs that user id (403 without one, 409 with another)."""
        sender = sender or Sender()
        with self.engine.begin() as c:
            owner = c.execute(
                select(exposures.c.user_id, exposures.c.experiment_id, exposures.c.arm, exposures.c.api_key)
                .where(exposures.c.image_id == fb.image_id, exposures.c.outcome == "ok")
            ).first()
            if owner is None:  # never answered, or answered with an error and no image
                raise UnknownImage(f"`image_id`: no image {fb.image_id!r} was delivered.", field="image_id")
            if sender.keys_required and owner.api_key is not None and owner.api_key != sender.api_key:
                raise FeedbackForbidden(
                    f"`image_id`: image {fb.image_id!r} was generated with another API key; feedback for an "
                    "image is accepted only with the API key that generated it.",
                    field="image_id",
                )
            if fb.user_id is None and owner.user_id is not None:
                raise FeedbackForbidden(
                    f"`user_id`: image {fb.image_id!r} was delivered to a user; feedback for it needs that "
                    "user's `user_id`.",
                    field="user_id",
                )
            if fb.user_id is not None and fb.user_id != owner.user_id:
                raise FeedbackConflict(
                    f"`user_id`: image {fb.image_id!r} was delivered to another user, not {fb.user_id!r}.",
                    field="user_id",
                )
            row = {"image_id": fb.image_id, "event": fb.event, "value": fb.value, "user_id": fb.user_id,
                   "created_at": fb.created_at}  # fmt: skip
            result = c.execute(
                _insert(c, feedback).values(row).on_conflict_do_nothing(index_elements=["image_id", "event"])
            )
        return FeedbackReceipt(bool(result.rowcount), owner.experiment_id, owner.arm)

    def liked_image_ids(self, experiment_id: str, arm: str, events: Sequence[str]) -> list[str]:
        """Delivered images of ``arm`` in ``experiment_id`` with feedback of any of ``events`` (oldest first,
        each once): what a style LoRA learns from (``python -m deskgen.train_lora --liked``)."""
        with self.engine.connect() as c:
            rows = c.execute(
                select(exposures.c.image_id, func.min(exposures.c.created_at).label("at"))
                .join(feedback, feedback.c.image_id == exposures.c.image_id)
                .where(exposures.c.experiment_id == experiment_id, exposures.c.arm == arm,
                       exposures.c.outcome == "ok", feedback.c.event.in_(list(events)))
                .group_by(exposures.c.image_id)
                .order_by("at", exposures.c.image_id)
            ).all()
        return [row.image_id for row in rows]

    def experiment(self, experiment_id: str) -> Experiment | None:
        with self.engine.connect() as c:
            row = c.execute(select(experiments).where(experiments.c.id == experiment_id)).first()
        if row is None:
            return None
        return Experiment(split=dict(row.split), salt=row.salt, mixes=dict(row.mixes), policy=Policy.of(row.policy))

    # -- allocation (bandits) -------------------------------------------------------------------------

    def allocation(self, experiment_id: str, epoch: int) -> dict[str, Any] | None:
        """The weights stored for ``epoch`` (``None``: not computed yet)."""
        with self.engine.connect() as c:
            row = c.execute(
                select(allocations).where(allocations.c.experiment_id == experiment_id, allocations.c.epoch == epoch)
            ).first()
        return None if row is None else _allocation_row(row)

    def store_allocation(self, experiment_id: str, epoch: int, phase: str, weights: dict[str, float],
                         p_best: dict[str, float], users: dict[str, int]) -> dict[str, Any]:  # fmt: skip
        """Store the weights of ``epoch`` unless some replica stored them first; returns the stored row (the
        first writer's), so every replica uses the same weights within an epoch."""
        row = {"experiment_id": experiment_id, "epoch": epoch, "phase": phase, "weights": weights,
               "p_best": p_best, "users": users, "computed_at": now()}  # fmt: skip
        with self.engine.begin() as c:
            c.execute(_insert(c, allocations).values(row).on_conflict_do_nothing(index_elements=["experiment_id", "epoch"]))
        stored = self.allocation(experiment_id, epoch)
        assert stored is not None
        return stored

    def allocation_history(self, experiment_id: str) -> list[dict[str, Any]]:
        """Every stored epoch's weights, oldest first."""
        with self.engine.connect() as c:
            rows = c.execute(
                select(allocations).where(allocations.c.experiment_id == experiment_id).order_by(allocations.c.epoch)
            ).all()
        return [_allocation_row(r) for r in rows]

    def assign(self, experiment_id: str, user_id: str, arm: str, weights: dict[str, float]) -> str:
        """The user's arm: the one first stored for them in this experiment, else ``arm`` (drawn with
        ``weights``), stored now. Concurrent first requests of one user agree: the first insert wins."""
        row = {"experiment_id": experiment_id, "user_id": user_id, "arm": arm, "weights": weights,
               "assigned_at": now()}  # fmt: skip
        with self.engine.begin() as c:
            c.execute(_insert(c, assignments).values(row).on_conflict_do_nothing(index_elements=["experiment_id", "user_id"]))
            stored = c.execute(
                select(assignments.c.arm)
                .where(assignments.c.experiment_id == experiment_id, assignments.c.user_id == user_id)
            ).scalar_one()  # fmt: skip
        return str(stored)

    def assignment_weights(self, experiment_id: str) -> dict[str, dict[str, float]]:
        """User id -> the weights their arm was drawn with (bandit experiments)."""
        with self.engine.connect() as c:
            rows = c.execute(
                select(assignments.c.user_id, assignments.c.weights).where(assignments.c.experiment_id == experiment_id)
            ).all()
        return {r.user_id: dict(r.weights) for r in rows}

    def experiment_ids(self) -> list[str]:
        with self.engine.connect() as c:
            return [r.id for r in c.execute(select(experiments.c.id).order_by(experiments.c.created_at))]

    def summaries(self) -> list[dict[str, Any]]:
        """Every experiment, oldest first: its definition, when it started, its exposures and users."""
        counts = (
            select(exposures.c.experiment_id, func.count().label("exposures"),
                   func.count(func.distinct(exposures.c.user_id)).label("users"))
            .group_by(exposures.c.experiment_id)
            .subquery()
        )  # fmt: skip
        with self.engine.connect() as c:
            rows = c.execute(
                select(experiments, counts.c.exposures, counts.c.users)
                .join(counts, counts.c.experiment_id == experiments.c.id, isouter=True)
                .order_by(experiments.c.created_at)
            ).all()
        return [
            {"id": r.id, "split": dict(r.split), "salt": r.salt, "mixes": dict(r.mixes),
             "created_at": r.created_at.isoformat(), "exposures": int(r.exposures or 0), "users": int(r.users or 0)}
            for r in rows
        ]  # fmt: skip

    def user_totals(self, experiment_id: str) -> list[UserTotals]:
        """Per arm and user: delivered images (outcome ``ok``) and feedback events on them that came at or
        after the user's first exposure in this experiment. Users without a user id are not in the ratio
        metrics (they cannot be followed); their exposures still count in the guardrails."""
        delivered = exposures.c.outcome == "ok"
        with self.engine.connect() as c:
            first = (
                select(exposures.c.user_id, func.min(exposures.c.created_at).label("first_at"))
                .where(exposures.c.experiment_id == experiment_id, exposures.c.user_id.is_not(None))
                .group_by(exposures.c.user_id)
                .subquery()
            )
            shown = c.execute(
                select(exposures.c.arm, exposures.c.user_id, func.count().label("n"))
                .where(exposures.c.experiment_id == experiment_id, delivered, exposures.c.user_id.is_not(None),
                       exposures.c.arm.is_not(None))
                .group_by(exposures.c.arm, exposures.c.user_id)
            ).all()
            events = c.execute(
                select(exposures.c.arm, exposures.c.user_id, feedback.c.event, func.count().label("n"))
                .join(feedback, feedback.c.image_id == exposures.c.image_id)
                .join(first, first.c.user_id == exposures.c.user_id)
                .where(exposures.c.experiment_id == experiment_id, delivered, feedback.c.created_at >= first.c.first_at)
                .group_by(exposures.c.arm, exposures.c.user_id, feedback.c.event)
            ).all()
        counts: dict[tuple[str, str], dict[str, int]] = {}
        for arm, user, name, n in events:
            counts.setdefault((arm, user), {})[name] = int(n)
        return [UserTotals(arm, user, int(n), counts.get((arm, user), {})) for arm, user, n in shown]

    def evidence(self, experiment_id: str, metric: str) -> dict[str, Any]:
        """Per arm, the users' totals of one event (``metric``) and of delivered images: what a bandit
        allocates on (deskgen.experiments.bandit.ArmEvidence)."""
        from deskgen.experiments.bandit import ArmEvidence

        per_arm: dict[str, tuple[list[float], list[float]]] = {}
        for totals in self.user_totals(experiment_id):
            events, shown = per_arm.setdefault(totals.arm, ([], []))
            events.append(float(totals.events.get(metric, 0)))
            shown.append(float(totals.exposures))
        return {arm: ArmEvidence(events=events, exposures=shown) for arm, (events, shown) in per_arm.items()}

    def outcomes(self, experiment_id: str) -> Iterable[Any]:
        """Every exposure's arm, outcome, status, timings and found fraction (for the guardrails)."""
        with self.engine.connect() as c:
            return c.execute(
                select(exposures.c.arm, exposures.c.outcome, exposures.c.status, exposures.c.timings,
                       exposures.c.found_fraction)
                .where(exposures.c.experiment_id == experiment_id)
            ).all()  # fmt: skip

    def concept_totals(self, experiment_id: str) -> list[ConceptTotals]:
        """Per arm and concept preset (``none`` for requests without one): delivered images, the feedback
        events on them, and how many were located with their mean found fraction."""
        delivered = (exposures.c.experiment_id == experiment_id, exposures.c.outcome == "ok", exposures.c.arm.is_not(None))
        concept = func.coalesce(exposures.c.concept, NO_CONCEPT)
        with self.engine.connect() as c:
            shown = c.execute(
                select(exposures.c.arm, concept.label("concept"), func.count().label("n"),
                       func.count(exposures.c.found_fraction).label("located"),
                       func.avg(exposures.c.found_fraction).label("found"))
                .where(*delivered)
                .group_by(exposures.c.arm, concept)
            ).all()
            events = c.execute(
                select(exposures.c.arm, concept.label("concept"), feedback.c.event, func.count().label("n"))
                .join(feedback, feedback.c.image_id == exposures.c.image_id)
                .where(*delivered)
                .group_by(exposures.c.arm, concept, feedback.c.event)
            ).all()  # fmt: skip
        counts: dict[tuple[str, str], dict[str, int]] = {}
        for arm, name, event_name, n in events:
            counts.setdefault((arm, name), {})[event_name] = int(n)
        return [
            ConceptTotals(arm, name, int(n), counts.get((arm, name), {}), int(located),
                          float(found) if found is not None else float("nan"))
            for arm, name, n, located, found in shown
        ]  # fmt: skip
