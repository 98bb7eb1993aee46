"""The experiment store as a Ray Serve deployment of its own (CPU), so the ingress never waits on a database:
the ingress buffers exposures and sends them here in batches; feedback is written here before the ingress
answers it; the report routes read here.

The database is one URL (``experiments_db`` in serve_config.yaml ``args``): SQLite in WAL mode by default
(one replica: one writer), PostgreSQL for a cluster (replicas may scale out, the database serialises).
Every write is idempotent, so a batch retried after a lost answer or a replica restart never double counts.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

from ray import serve

from deployments import metrics
from deployments.logs import stamp_library_logs
from deskgen.experiments.records import Experiment, Exposure, Feedback
from deskgen.experiments.store import ExperimentStore

log = logging.getLogger("ray.serve")


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=32)
class Recorder:
    def __init__(self, database_url: str) -> None:
        stamp_library_logs()
        self.store = ExperimentStore.open(database_url)
        self.dialect = self.store.engine.dialect.name
        #: Experiments known to be stored, so a batch does not re-insert its experiment every time.
        self._stored: set[str] = set()
        log.info("experiment store: %s", self.store.engine.url.render_as_string(hide_password=True))

    async def record_exposures(self, experiments: list[Experiment], batch: list[Exposure]) -> int:
        """Store ``experiments`` (if new) and ``batch`` in the database; returns once committed."""
        return await asyncio.to_thread(self._record_exposures, experiments, batch)

    def _record_exposures(self, experiments: list[Experiment], batch: list[Exposure]) -> int:
        for experiment in experiments:
            if experiment.id not in self._stored:
                self.store.ensure_experiment(experiment)
                self._stored.add(experiment.id)
        return self.store.record_exposures(batch)

    async def record_feedback(self, fb: Feedback) -> bool:
        """Store ``fb``; ``False`` when it was already stored. Raises UnknownImage / FeedbackConflict."""
        receipt = await asyncio.to_thread(self.store.record_feedback, fb)
        if receipt.new:
            metrics.feedback(receipt.experiment_id, receipt.arm, fb.event)
        return receipt.new

    async def experiments(self) -> list[dict[str, Any]]:
        return await asyncio.to_thread(self.store.summaries)

    async def report(self, experiment_id: str) -> dict[str, Any] | None:
        from deskgen.experiments.report import build_report

        report = await asyncio.to_thread(build_report, self.store, experiment_id)
        return None if report is None else report.public()

    async def ping(self) -> str:
        return "ok"

    async def info(self) -> dict[str, Any]:
        return {"dialect": self.dialect, "pid": os.getpid()}
