"""Which Generator replica a request goes to: the mix-aware router (Serve's RequestRouter API).

Serve's default router for multiplexed deployments sends a request to a replica that has its model id
cached, else to one with the fewest models, choosing by queue length among two random candidates. For
LoRA mixes that has two costs. A hot mix stays on the one replica that holds it while others idle
(or keep switching between mixes), and a switch is paid whenever a request lands on a replica whose
*active* mix (the one fused in its weights) is another, even when a replica with that mix active is idle.

:class:`MixAwareRouter` ranks the replicas for a request's mix:

1. replicas whose active mix is the request's (the replica's ``record_routing_stats``, corrected by what
   this router sent it since: the last mix routed to a replica is the one it holds once its queue drains);
2. replicas that have the mix cached (loaded, not active);
3. the rest, idle ones first (in a rank of their own), then the least wanted active mix and the fewest
   cached mixes.

Serve tries the ranks in order. Within a rank it takes, of the replicas whose queue length it has cached
(fresh for 10 s), the shortest that accepts, and probes the others only when none of those accepts: an
idle replica that this router has not sent to lately loses to a busy one it has. A busy replica is never
asked to switch while an idle one holds the mix: an idle holder is ranked before every busy one, and while
the mix is not hot only its holders are offered for a second (:data:`HOLDER_WAIT_S`). A mix is hot when
every holder is busy and the mix's *own* requests on its holders (this router's, running or waiting) reach
``spill_queue`` per holder: then (after :data:`SPILL_GRACE_S`, so that a request that just finished is not
counted) the idle replicas are offered first, in a rank of their own (so Serve probes the ones it has no
count of instead of taking a busy holder it has one of), then the holders, so a second replica takes the mix;
once the mix's requests there fall below the threshold, they go back to its holders and the second
replica is free for other mixes (it keeps the mix cached). With ``spill_queue`` 0 (the default) every
holder busy is enough, whatever mix keeps it busy; with 1 or more a mix whose holders are busy with *other*
mixes waits for a holder rather than have an idle replica load it: fewer cache misses, but the colder
A/B arm waits longer than the hot one (BENCHMARKS.md "Generator routing, simulated"; a miss costs little
once a replica drops unused adapters only at its next load). A replica that must switch is the one whose
active mix this router has seen wanted least lately.

Ray-free logic (:func:`rank`) is unit-tested; the router class adapts it to Serve's replica objects.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ray.serve.request_router import FIFOMixin, MultiplexMixin, PendingRequest, RequestRouter, RunningReplica

from deployments import metrics

log = logging.getLogger("ray.serve")

#: A mix's own requests per holder (running or waiting) from which idle replicas take it too; 0: as soon as
#: every holder is busy (serve_config.yaml says why).
DEFAULT_SPILL_QUEUE = 0
#: How fast the router forgets which mixes are wanted: their request counts halve every this many requests.
DEMAND_HALF_LIFE = 50
#: How long a request of a mix that is not hot waits for the mix's holders before another replica may
#: take it (Serve's own multiplexed router waits 1-2 s, RAY_SERVE_MULTIPLEXED_MODEL_ID_MATCHING_TIMEOUT_S).
HOLDER_WAIT_S = 1.0
#: How long a request of a hot mix waits before an idle replica may take it. The router counts a request until
#: Serve runs its done-callback on the router's event loop, a moment after the caller got its answer: a caller
#: that sends its next request at once (a handle in a loop) would find its holder busy with the request that
#: just finished, and its mix would spill to an idle replica that must load it. The router holds such a
#: request on its own event loop, ranking it again every :data:`RECHECK_S`, so a done-callback that lands
#: in the meantime is seen at once (and a real spill costs the grace, not Serve's 25 ms retry backoff).
SPILL_GRACE_S = 0.02
#: How often a request held within the spill grace is ranked again.
RECHECK_S = 0.001
#: What ``record_routing_stats`` of a Generator replica reports under this key: its active (fused) mix.
ACTIVE_MIX = "active_mix"
#: ... and under this key its requests running or waiting.
INFLIGHT = "inflight"


@dataclass(frozen=True)
class ReplicaView:
    """What the router knows of a replica when it ranks a request: its id, its active mix (None: none yet),
    the mixes it has cached, its queue as this router counts it (requests sent and not finished, or Serve's
    last probe; None: not known yet) and as the replica last reported it (``reported``: the most requests
    it had in flight at once over its last stats period, which reaches the router a period or two late),
    and ``mix_queue``: the requests of the ranked request's mix that this router sent there and that have
    not finished."""

    id: Any
    active: str | None
    cached: frozenset[str]
    queue: int | None
    reported: int | None = None
    mix_queue: int = 0

    @property
    def idle(self) -> bool:
        """Nothing in flight: by this router's count, or, where it has none (Serve's count of a replica
        expires 10 s after it last heard of it), by the replica's own last report."""
        return self.queue == 0 or (self.queue is None and not self.reported)

    def at_least(self, n: int) -> bool:
        """Both counts (where known) say ``n`` or more: a request that just finished is still counted by the
        router until its done-callback runs, and the report lags; a replica is busy only if both agree."""
        return self.queue is not None and self.queue >= n and (self.reported is None or self.reported >= n)


def idle_first(replicas: Sequence[ReplicaView]) -> list[list[ReplicaView]]:
    """``replicas`` in two ranks, the idle ones first, each in the order given (an empty rank left out)."""
    return [g for g in ([r for r in replicas if r.idle], [r for r in replicas if not r.idle]) if g]


def rank(replicas: Sequence[ReplicaView], mix: str, spill_queue: int, demand: Mapping[str, float] | None = None,
         waited_s: float = 0.0, grace_s: float = SPILL_GRACE_S) -> list[list[ReplicaView]]:  # fmt: skip
    """The replicas in the order to try them for a request of ``mix``: a list of ranks, best first; Serve
    takes the shortest accepting queue within the first rank that has one (preferring the queues it has
    cached), and backs off before asking again (``waited_s``: how long the request has waited to be
    routed; ``grace_s``: :data:`SPILL_GRACE_S`).

    ``demand``: recent requests per mix; a replica that must switch is taken from those whose active mix is
    wanted least (so a hot mix keeps its replicas), then with the fewest cached mixes. While the mix's
    holders are not hot, only they are offered for :data:`HOLDER_WAIT_S`: a holder that is busy or slow to
    answer Serve's queue probe is waited for (as Serve's own router does) rather than another replica made
    to switch."""
    demand = demand or {}
    active = [r for r in replicas if r.active == mix]
    cached = [r for r in replicas if r.active != mix and mix in r.cached]
    others = sorted((r for r in replicas if r.active != mix and mix not in r.cached),
                    key=lambda r: (demand.get(r.active or "", 0.0), len(r.cached)))  # fmt: skip
    holders = active + cached
    if not holders:
        # Idle replicas first, in a rank of their own (see below: Serve would take a busy one it has a count of).
        return idle_first(others)
    if any(r.idle for r in holders):
        # An idle replica that holds the mix, active first: no busy replica is made to switch.
        return idle_first(holders)
    if all(r.at_least(1) for r in holders) and sum(r.mix_queue for r in holders) >= spill_queue * len(holders):
        # A hot mix: every holder busy, and the mix's own requests on them at the threshold; a replica that
        # is idle takes the mix too: one whose queue is 0, or not known to this router (Serve probes it)
        # while the replica's own last report had nothing in flight.
        idle_others = [r for r in others if r.idle]
        if idle_others and waited_s < grace_s:
            # Hot by the counts, and a replica without the mix would take it: ask again once the counts are
            # surely current (:data:`SPILL_GRACE_S`). With no such replica nothing spills and nothing waits.
            return []
        # The idle replicas in a rank of their own: in one rank with the holders, Serve would take a holder
        # whose queue it has cached (busy, but accepting) over an idle replica whose queue it would have to
        # probe. A probe that fails, or finds the replica busy after all, falls through to the holders.
        return [r for r in (idle_others, holders, [r for r in others if r not in idle_others]) if r]
    if waited_s < HOLDER_WAIT_S:
        return [r for r in (active, cached) if r]
    return [r for r in (active, cached, others) if r]


async def settle(ranking: Callable[[], list[list[ReplicaView]]], mix: str,
                 recheck_s: float = RECHECK_S) -> tuple[list[list[ReplicaView]], str | None]:  # fmt: skip
    """Rank a request, holding it while :func:`rank` asks for a moment (an empty ranking: hot by counts that a
    done-callback may be about to lower): ``ranking`` is called again every ``recheck_s`` on the router's
    event loop (the first time at once, after the callbacks already queued there), where Serve's callbacks
    run meanwhile, until it offers replicas. Returns the ranks and what the hold came to: None (not held),
    ``"stayed"`` (a holder took it after all: the counts were late) or ``"spilled"`` (the grace passed with
    every holder busy; the first rank offers replicas without the mix)."""
    ranks = ranking()
    if ranks:
        return ranks, None
    delay = 0.0  # first let the callbacks already queued on the loop run, then every recheck_s
    while not ranks:
        await asyncio.sleep(delay)
        delay = recheck_s
        ranks = ranking()
    spilled = any(r.active != mix and mix not in r.cached for r in ranks[0])
    return ranks, "spilled" if spilled else "stayed"


class Demand(dict[str, float]):
    """Requests per mix routed lately: every request adds 1 to its mix, and every count halves every
    ``half_life`` requests (a mix's count is dropped once under 0.01)."""

    def __init__(self, half_life: int = DEMAND_HALF_LIFE) -> None:
        super().__init__()
        self.decay = 0.5 ** (1.0 / max(int(half_life), 1))

    def add(self, mix: str) -> None:
        for known in list(self):
            self[known] *= self.decay
            if self[known] < 0.01:
                del self[known]
        self[mix] = self.get(mix, 0.0) + 1.0


def router_settings(spill_queue: Any = DEFAULT_SPILL_QUEUE, spill_grace_s: Any = SPILL_GRACE_S) -> tuple[int, float]:
    """The router's ``request_router_kwargs``, checked: a ValueError names the field and its rule."""
    if isinstance(spill_queue, bool) or not isinstance(spill_queue, int) or spill_queue < 0:
        raise ValueError(f"request_router_kwargs.spill_queue must be a whole number, 0 or more, but is {spill_queue!r}.")
    if isinstance(spill_grace_s, bool) or not isinstance(spill_grace_s, (int, float)) or not 0 <= spill_grace_s <= HOLDER_WAIT_S:
        raise ValueError(f"request_router_kwargs.spill_grace_s must be seconds within [0, {HOLDER_WAIT_S}] but is "
                         f"{spill_grace_s!r}.")  # fmt: skip
    return spill_queue, float(spill_grace_s)


class MixAwareRouter(FIFOMixin, MultiplexMixin, RequestRouter):
    """Routes Generator requests by their mix (the multiplexed model id): see the module's docstring.
    ``request_router_kwargs``: ``spill_queue`` (default :data:`DEFAULT_SPILL_QUEUE`), ``spill_grace_s`` (default
    :data:`SPILL_GRACE_S`; 0 lets a hot mix spill at once, with the race that grace closes).

    Serve builds the router lazily in each caller's process, after the deploy has succeeded, so a bad value
    cannot fail the deploy, and raising here would fail every request routed: a bad value is logged as an
    error naming the field and the defaults are used (the unit tier checks serve_config.yaml's values)."""

    def initialize_state(self, spill_queue: Any = DEFAULT_SPILL_QUEUE, demand_half_life: int = DEMAND_HALF_LIFE,
                         spill_grace_s: Any = SPILL_GRACE_S, **_: Any) -> None:  # fmt: skip
        try:
            self.spill_queue, self.spill_grace_s = router_settings(spill_queue, spill_grace_s)
        except ValueError as exc:
            self.spill_queue, self.spill_grace_s = router_settings()
            log.error("%s The mix-aware router uses its defaults: spill_queue %d, spill_grace_s %g.", exc,
                      self.spill_queue, self.spill_grace_s)  # fmt: skip
        #: The mix this router last sent to each replica: what it will hold once its queue drains.
        self.sent: dict[Any, str] = {}
        #: Requests routed and not finished, by Serve's internal request id: (replica, mix) ...
        self.routed: dict[str, tuple[Any, str]] = {}
        #: ... and their count per (replica, mix).
        self.mix_inflight: collections.Counter[tuple[Any, str]] = collections.Counter()
        self.demand = Demand(demand_half_life)

    def view(self, replica: RunningReplica, mix: str) -> ReplicaView:
        stats = replica.routing_stats or {}
        active = self.sent.get(replica.replica_id, stats.get(ACTIVE_MIX))
        queue = self._replica_queue_len_cache.get(replica.replica_id)
        reported = stats.get(INFLIGHT)
        return ReplicaView(replica.replica_id, active, frozenset(replica.multiplexed_model_ids), queue,
                           int(reported) if reported is not None else None,
                           self.mix_inflight[(replica.replica_id, mix)])  # fmt: skip

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        if pending_request is None:
            return [candidate_replicas]
        # Every rank was offered: when none accepts, back off before the next round (as Serve's routers do)
        # instead of spinning on the event loop.
        pending_request.routing_context.should_backoff = True
        mix = pending_request.metadata.multiplexed_model_id
        if not mix:
            return [candidate_replicas]
        by_id = {r.replica_id: r for r in candidate_replicas}

        def ranking() -> list[list[ReplicaView]]:
            return rank([self.view(r, mix) for r in candidate_replicas], mix, self.spill_queue, self.demand,
                        time.time() - pending_request.created_at, self.spill_grace_s)  # fmt: skip

        held_at = time.perf_counter()
        ranks, held = await settle(ranking, mix)
        if held is not None:
            metrics.router_held(held, time.perf_counter() - held_at)
        return [[by_id[v.id] for v in group] for group in ranks]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: Any, result: Any) -> None:
        mix = pending_request.metadata.multiplexed_model_id
        if mix:
            self.sent[replica_id] = mix
            self.routed[pending_request.metadata.internal_request_id] = (replica_id, mix)
            self.mix_inflight[(replica_id, mix)] += 1
            self.demand.add(mix)

    def on_request_completed(self, replica_id: Any, internal_request_id: str) -> None:
        """Serve calls this once for every request sent to a replica, routed or rejected, however it ended."""
        super().on_request_completed(replica_id, internal_request_id)
        found = self.routed.pop(internal_request_id, None)
        if found is not None:
            self.mix_inflight[found] -= 1
            if self.mix_inflight[found] <= 0:
                del self.mix_inflight[found]

    def on_replica_actor_died(self, replica_id: Any) -> None:
        self.sent.pop(replica_id, None)
        for request_id, (replica, _) in list(self.routed.items()):
            if replica == replica_id:
                self.on_request_completed(replica, request_id)
        super().on_replica_actor_died(replica_id)
