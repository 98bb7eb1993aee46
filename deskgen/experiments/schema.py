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
    #: How it decides and allocates (deskgen.experiments.records.Policy); the live config's, updated by a
    #: ``serve deploy`` that changes only the policy (that does not start a new experiment).
    Column("policy", JSON, nullable=True),
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
    #: The name of the API key that asked for the image (None: the API was open): only it may rate the image.
    Column("api_key", String(100), nullable=True),
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

#: A bandit's weights, one row per experiment and cadence epoch (``floor(unix time / update_every_s)``): the
#: first replica to ask in an epoch computes them, every other replica reads the same row, and the rows are
#: the weights' history.
allocations = Table(
    "allocations",
    metadata,
    Column("experiment_id", String(32), ForeignKey("experiments.id"), primary_key=True),
    Column("epoch", BigInteger, primary_key=True),
    Column("phase", String(16), nullable=False),
    Column("weights", JSON, nullable=False),
    Column("p_best", JSON, nullable=False),
    Column("users", JSON, nullable=False),
    Column("computed_at", DateTime(timezone=True), nullable=False),
)

#: A user's first arm in a bandit experiment and the weights it was drawn with: the user keeps that arm,
#: and the sample-ratio test expects ``sum(weights)`` users per arm.
assignments = Table(
    "assignments",
    metadata,
    Column("experiment_id", String(32), ForeignKey("experiments.id"), primary_key=True),
    Column("user_id", String(200), primary_key=True),
    Column("arm", String(100), nullable=False),
    Column("weights", JSON, nullable=False),
    Column("assigned_at", DateTime(timezone=True), nullable=False),
)
