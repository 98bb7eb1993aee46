"""A/B experiments of LoRA mixes.

- :mod:`~deskgen.experiments.records`: the typed records (experiment, exposure, feedback);
- :mod:`~deskgen.experiments.schema` + ``migrations/``: the tables and their Alembic migrations;
- :mod:`~deskgen.experiments.store`: idempotent writes and per-user totals on SQLite (WAL) or PostgreSQL;
- :mod:`~deskgen.experiments.stats`: the report's statistics, the user as the unit.

Still to come (issue 9): the writer deployment with its buffer, exposures recorded by the ingress at
delivery, ``POST /v1/feedback``, the report routes and page, and the PostgreSQL tier.
"""
