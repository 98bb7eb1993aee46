"""The experiment tables (SQLAlchemy Core). The migrations under ``migrations/`` create exactly these; a
unit test compares the migrated database with this metadata, so the two cannot drift."""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Table,
)

metadata = MetaData()

#: An experiment is an A/B split plus its salt and the catalogue of mixes it draws from; its id is a hash
#: of the three, so changing any of them with ``serve deploy`` starts a new experiment.
experiments = Table(
    "experiments",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("split", JSON, nullable=False),
    Column("salt", String(200), nullable=False),
    Column("mixes", JSON, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

#: One row per answered request that delivered (or refused) an image: the image id is the request id.
exposures = Table(
    "exposures",
    metadata,
    Column("image_id", String(64), primary_key=True),
    Column("experiment_id", String(32), ForeignKey("experiments.id"), nullable=False, index=True),
    Column("user_id", String(200), nullable=True, index=True),
    Column("arm", String(100), nullable=True),
    Column("mix_id", String(300), nullable=False),
    Column("mix_source", String(16), nullable=False),
    Column("style", String(200), nullable=True),
    Column("seed", BigInteger, nullable=True),
    Column("timings", JSON, nullable=False),
    Column("outcome", String(32), nullable=False),
    Column("status", Integer, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("concept", String(64), nullable=True),
    Column("found_fraction", Float, nullable=True),
)

#: What a user did with an image; one row per (image, event): a retried post does not count twice.
feedback = Table(
    "feedback",
    metadata,
    Column("image_id", String(64), ForeignKey("exposures.image_id"), primary_key=True),
    Column("event", String(16), primary_key=True),
    Column("value", Float, nullable=True),
    Column("user_id", String(200), nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
)
