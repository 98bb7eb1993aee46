"""A/B experiments of LoRA mixes.

- :mod:`~deskgen.experiments.records`: the typed records (experiment, exposure, feedback);
- :mod:`~deskgen.experiments.schema` + ``migrations/``: the tables and their Alembic migrations;
- :mod:`~deskgen.experiments.store`: idempotent writes and per-user totals on SQLite (WAL) or PostgreSQL;
- :mod:`~deskgen.experiments.buffer`: the ingress's exposure buffer (no database on a request's path);
- :mod:`~deskgen.experiments.stats` and :mod:`~deskgen.experiments.report`: the report, the user as the unit;
- :mod:`~deskgen.experiments.page`: the report as an HTML page with a chart.

The writer is the ``Recorder`` deployment (``deployments/recorder.py``); the ingress records exposures at
delivery and serves ``POST /v1/feedback`` and ``GET /v1/experiments[/{id}]``.
"""
