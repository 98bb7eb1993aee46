"""Which arm of the experiment a request's user gets, in the ingress.

``fixed`` allocation needs no state: a hash of the salt and the user id against the split (sticky by
construction). ``thompson`` allocation moves the weights, so stickiness needs memory and the weights must
be the same on every ingress replica:

- the weights come from the Recorder, one stored row per cadence epoch (the first replica to ask in an
  epoch computes them; a restarted replica reads the same row). A replica fetches them once when it starts
  (or the experiment changes), then refreshes them in the background when an epoch ends, so a request
  never waits for them after the first;
- a user's first arm is stored (the Recorder's ``assign``: the first insert wins, so two replicas that see
  a new user at once agree) and cached here (LRU); the proposal is the user's hash against the current
  weights. If the store does not answer in time, the proposal is used for that request and not cached
  (the next request asks again). Users without a user id are drawn at random with the current weights.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

from deskgen.ab import pick_arm
from deskgen.experiments.records import Experiment

log = logging.getLogger("ray.serve")

#: Users whose arm a replica remembers (per replica; the store remembers all of them).
ASSIGNMENT_CACHE = 100_000

#: Calls the Recorder (bounded in time by the ingress); returns its answer or raises.
RecorderCall = Callable[[str, tuple[Any, ...]], Awaitable[Any]]


class Allocator:
    def __init__(self, call: RecorderCall) -> None:
        self.call = call
        self._experiment_id: str | None = None
        self._allocation: dict[str, Any] | None = None
        self._refreshing: asyncio.Task[None] | None = None
        self._assigned: OrderedDict[str, str] = OrderedDict()

    def current(self) -> dict[str, Any] | None:
        """The allocation in use (weights, p_best, phase, epoch), ``None`` before the first fetch."""
        return self._allocation

    async def arm(self, experiment: Experiment, user_id: str | None) -> str:
        if experiment.policy.allocation == "fixed":
            return pick_arm(experiment.split, user_id, experiment.salt)
        weights = await self.weights(experiment)
        if user_id is None:
            return pick_arm(weights, None, experiment.salt)
        known = self._assigned.get(user_id)
        if known is not None:
            self._assigned.move_to_end(user_id)
            return known
        proposal = pick_arm(weights, user_id, experiment.salt)
        try:
            arm = str(await self.call("assign", (experiment, user_id, proposal, weights)))
        except Exception as exc:
            log.warning("arm of user not stored (the experiment store did not answer: %r); using %s this time",
                        exc, proposal)  # fmt: skip
            return proposal
        self._assigned[user_id] = arm
        if len(self._assigned) > ASSIGNMENT_CACHE:
            self._assigned.popitem(last=False)
        return arm

    async def weights(self, experiment: Experiment) -> dict[str, float]:
        """This epoch's weights: fetched once per experiment (the split until then), refreshed in the
        background when the epoch ends."""
        if experiment.id != self._experiment_id:
            self._experiment_id, self._allocation = experiment.id, None
            self._assigned.clear()
            await self._refresh(experiment)
        elif self._allocation is None or self._epoch(experiment) != self._allocation["epoch"]:
            if self._refreshing is None or self._refreshing.done():
                self._refreshing = asyncio.get_running_loop().create_task(self._refresh(experiment))
        if self._allocation is None:
            total = sum(experiment.split.values())
            return {arm: share / total for arm, share in experiment.split.items()}
        return dict(self._allocation["weights"])

    @staticmethod
    def _epoch(experiment: Experiment) -> int:
        return int(time.time() // experiment.policy.update_every_s)

    async def _refresh(self, experiment: Experiment) -> None:
        try:
            allocation = await self.call("allocation", (experiment,))
        except Exception as exc:
            log.warning("bandit weights not refreshed (the experiment store did not answer: %r)", exc)
            return
        if experiment.id == self._experiment_id:
            self._allocation = dict(allocation)
