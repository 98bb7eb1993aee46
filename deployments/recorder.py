"""The experiment store as a Ray Serve deployment of its own (CPU), so the ingress never waits on a database:
the ingress buffers exposures and sends them here in batches; feedback is written here before the ingress
answers it; the report routes read here.

The database is one URL (``experiments_db`` in serve_config.yaml ``args``): SQLite in WAL mode by default
(one replica: one writer), PostgreSQL for a cluster (replicas may scale out, the database serialises).
Every write is idempotent, so a batch retried after a lost answer or a replica restart never double counts.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import time
from typing import Any

from ray import serve

from deployments import metrics
from deployments.logs import stamp_library_logs
from deskgen.experiments.records import Experiment, Exposure, Feedback, Sender
from deskgen.experiments.store import ExperimentStore

log = logging.getLogger("ray.serve")


def epoch_seed(experiment_id: str, epoch: int) -> int:
    """The Monte-Carlo seed of an epoch's weights: the same on every replica (and after a restart)."""
    return int.from_bytes(hashlib.sha256(f"{experiment_id}:{epoch}".encode()).digest()[:8], "big")


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=32)
class Recorder:
    def __init__(self, database_url: str) -> None:
        stamp_library_logs()
        self.store = ExperimentStore.open(database_url)
        self.dialect = self.store.engine.dialect.name
        #: Experiments (with their policy) known to be stored, so a batch does not re-insert them every time.
        self._stored: set[tuple[str, str]] = set()
        log.info("experiment store: %s", self.store.engine.url.render_as_string(hide_password=True))

    async def record_exposures(self, experiments: list[Experiment], batch: list[Exposure]) -> int:
        """Store ``experiments`` (if new) and ``batch`` in the database; returns once committed."""
        return await asyncio.to_thread(self._record_exposures, experiments, batch)

    def _record_exposures(self, experiments: list[Experiment], batch: list[Exposure]) -> int:
        for experiment in experiments:
            self._ensure(experiment)
        return self.store.record_exposures(batch)

    def _ensure(self, experiment: Experiment) -> None:
        key = (experiment.id, json.dumps(experiment.policy.public(), sort_keys=True))
        if key not in self._stored:
            self.store.ensure_experiment(experiment)
            self._stored.add(key)

    async def record_feedback(self, fb: Feedback, sender: Sender | None = None) -> bool:
        """Store ``fb``; ``False`` when it was already stored. Raises UnknownImage / FeedbackConflict /
        FeedbackForbidden."""
        receipt = await asyncio.to_thread(self.store.record_feedback, fb, sender)
        if receipt.new:
            metrics.feedback(receipt.experiment_id, receipt.arm, fb.event)
        return receipt.new

    async def experiments(self) -> list[dict[str, Any]]:
        return await asyncio.to_thread(self.store.summaries)

    async def report(self, experiment_id: str, current: Experiment | None = None) -> dict[str, Any] | None:
        """The report of ``experiment_id``; ``current`` (the live config's experiment) brings its policy up
        to date first."""
        from deskgen.experiments.report import build_report

        if current is not None and current.id == experiment_id:
            await asyncio.to_thread(self._ensure, current)
        report = await asyncio.to_thread(build_report, self.store, experiment_id)
        return None if report is None else report.public()

    # -- bandit allocation ----------------------------------------------------------------------------

    async def allocation(self, experiment: Experiment) -> dict[str, Any]:
        """The weights of ``experiment`` for the current cadence epoch (``floor(now / update_every_s)``):
        computed from the store by the first replica to ask, then the same stored row for everyone."""
        return await asyncio.to_thread(self._allocation, experiment)

    def _allocation(self, experiment: Experiment) -> dict[str, Any]:
        from deskgen.experiments.bandit import allocate

        policy = experiment.policy
        epoch = int(time.time() // policy.update_every_s)
        stored = self.store.allocation(experiment.id, epoch)
        if stored is not None:
            return stored
        self._ensure(experiment)
        evidence = {arm: e for arm, e in self.store.evidence(experiment.id, policy.primary_metric).items()
                    if arm in experiment.split}  # fmt: skip
        allocation = allocate(
            policy.allocation, evidence, experiment.split,
            burn_in_users=policy.burn_in_users, floors=policy.floors, seed=epoch_seed(experiment.id, epoch),
        )  # fmt: skip
        stored = self.store.store_allocation(experiment.id, epoch, allocation.phase, allocation.weights,
                                             allocation.p_best, allocation.users)  # fmt: skip
        if stored["weights"] == allocation.weights:
            log.info("experiment %s epoch %d: %s weights %s (p_best %s)", experiment.id, epoch, allocation.phase,
                     {a: round(w, 3) for a, w in allocation.weights.items()},
                     {a: round(p, 3) for a, p in allocation.p_best.items()})  # fmt: skip
        return stored

    async def assign(self, experiment: Experiment, user_id: str, arm: str, weights: dict[str, float]) -> str:
        """The user's arm in a bandit experiment: the first one stored for them, else ``arm`` (stored now)."""
        return await asyncio.to_thread(self._assign, experiment, user_id, arm, weights)

    def _assign(self, experiment: Experiment, user_id: str, arm: str, weights: dict[str, float]) -> str:
        self._ensure(experiment)
        return self.store.assign(experiment.id, user_id, arm, weights)

    async def ping(self) -> str:
        return "ok"

    async def info(self) -> dict[str, Any]:
        return {"dialect": self.dialect, "pid": os.getpid()}
