"""Generator routing where each replica has its own device, simulated: Serve's default router vs the mix-aware one.

    python -m bench.router_sim                       # GPU-like: 1.8 s per image, 50 ms switch, 0.35 s per adapter
    python -m bench.router_sim --hot 0.5 --utilizations 0.7,0.85
    python -m bench.router_sim --cores 2 --image-s 0.33 --switch-s 0.013 --adapter-load-s 1 --no-write

``bench.router`` runs the real app, but its replicas share this machine's two cores: a replica that idles adds
no capacity there, so it cannot show what routing does where every replica has a GPU of its own. This seeded
discrete-event simulation can, as a model. ``--replicas`` replicas, each running one generation at a time and
holding up to ``--max-ongoing`` requests (2, as serve_config.yaml), with a least-recently-used cache of
``--cache`` mixes (4, the Generator's ``generator_cache.mixes``) over shared adapters, as ``GeneratorReplica``: a
miss loads only the adapters not loaded (``--adapter-load-s`` each), an eviction drops those no remaining mix
uses but for the most recently used, up to ``--keep-adapters`` loaded in all (the Generator's
``generator_cache.keep_adapters``; 0: every one, what deskgen did before 2026-12-06). A request then pays ``--switch-s`` if its mix is not the active one, then ``--image-s``
(times a lognormal jitter); ``--evict-first`` drops the evicted mix's adapters before the incoming mix loads
(what deskgen did before the fix of ``GeneratorReplica.release``). With ``--cores`` the replicas share that many cores instead (each busy replica runs
at min(1, cores / busy replicas) of its speed), as bench.router's do; bench.router's "Costs on the replicas"
note gives the timings measured there (a generation, a switch, an adapter file read) for this model's inputs. Requests arrive as a Poisson process at
``--utilizations`` shares of the capacity, their mixes drawn as bench.router draws them (Zipf over the 7
named mixes and 3 ad-hoc ones) or with ``--hot`` of them on the control arm.

The mix-aware router decides with its own code (:func:`deployments.routing.rank` and
:class:`~deployments.routing.Demand`), fed what the real router sees (each replica's queue, the mix it last
sent there, the replica's cached mixes, each mix's own requests in flight). Serve's default router is a model of
ray 2.60's ``PowerOfTwoChoicesRequestRouter`` with ``MultiplexMixin.apply_multiplex_routing``: replicas that
have the mix cached first; on the next try, or when none has it, those with the fewest cached mixes; after the
matching timeout (uniform 1-2 s) those once more, then all; two random candidates per try, the shorter queue
that accepts. Both routers retry as Serve's routing loop does: a second try at once, then after 25 ms doubling
to 500 ms (``_choose_replicas_with_backoff``); a request the mix-aware router holds within its spill grace is
ranked again every millisecond instead. Not modelled: probe round-trips, the lag of the replicas'
reports, the ingress and the proxy, and anything a miss costs beyond its adapter loads. Reported per router:
waits (arrival to the first denoising step: routing, the replica's queue, the loads and the switch), switches,
mix misses and adapter loads per 100 requests, the p95 latency and how far the A/B arms' p50 latencies differ.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import heapq
import math
import random
import time
from collections.abc import Callable, Sequence
from typing import Any

from bench.common import (
    Table,
    append_report,
    command_line,
    machine,
    parse_choices,
    percentile,
    render_section,
)
from bench.router import ADHOC, ARMS, NAMED, zipf_weights
from deployments.generator import DEFAULT_CACHE, kept_adapters
from deployments.routing import RECHECK_S, Demand, ReplicaView, rank
from deskgen.mixes import NAMED_MIXES, parse_mix_spec

#: Serve's retry schedule (ray.serve constants RAY_SERVE_ROUTER_RETRY_*): the first backoff and its growth, the cap.
BACKOFF_S, BACKOFF_FACTOR, BACKOFF_MAX_S = 0.025, 2.0, 0.5
#: Serve's RAY_SERVE_MULTIPLEXED_MODEL_ID_MATCHING_TIMEOUT_S (each check draws uniformly from it to twice it).
MATCHING_TIMEOUT_S = 1.0


@dataclasses.dataclass(frozen=True)
class Timings:
    image_s: float
    switch_s: float
    adapter_load_s: float
    jitter: float  # sigma of the lognormal factor on each image's time


@dataclasses.dataclass
class Request:
    id: int
    mix: str
    arrived: float
    attempt: int = 0
    matching_started: float | None = None
    tried_first: bool = False
    tried_fewest: bool = False
    started: float | None = None  # first denoising step
    finished: float | None = None
    replica: int | None = None


def adapters_of(mix: str) -> frozenset[str]:
    """The adapter files a mix needs: a named mix's (deskgen.mixes.NAMED_MIXES) or an ad-hoc spec's."""
    return frozenset(NAMED_MIXES[mix] if mix in NAMED_MIXES else parse_mix_spec(mix))


class Replica:
    """One replica on its own device: a FIFO of requests (the running one first), an LRU cache of mixes and the
    adapters they use (as GeneratorReplica: a miss loads only the adapters not loaded yet; an eviction drops
    the adapters no remaining cached mix uses, but for the most recently used up to ``keep_adapters``)."""

    def __init__(self, index: int, cache_size: int, evict_first: bool = False,
                 keep_adapters: int = DEFAULT_CACHE.keep_adapters) -> None:  # fmt: skip
        self.index = index
        self.keep_adapters = keep_adapters
        #: Each adapter's last use (a request of a mix with it), as a count of requests prepared.
        self.last_used: dict[str, int] = {}
        self.uses = 0
        #: Drop the evicted mix's adapters before loading the incoming one (deskgen before the fix of
        #: GeneratorReplica.release: an adapter the two shared was dropped and loaded again at once).
        self.evict_first = evict_first
        self.cache: collections.OrderedDict[str, None] = collections.OrderedDict()
        self.cache_size = cache_size
        self.adapters: set[str] = set()
        self.active: str | None = None
        self.queue: collections.deque[Request] = collections.deque()
        #: What the replica is doing for its first request: "prepare" (load, switch), "image", or None (idle);
        #: the work left in it (seconds at full speed), the image's work to come, and a stamp for its events.
        self.phase: str | None = None
        self.remaining = 0.0
        self.image_work = 0.0
        self.version = 0
        self.switches = 0
        self.misses = 0
        self.adapter_loads = 0

    def prepare(self, mix: str, timings: Timings) -> float:
        """The seconds before the generation of ``mix`` starts (a load on a miss, a switch), and the state after."""
        seconds = 0.0
        self.uses += 1
        for name in adapters_of(mix):
            self.last_used[name] = self.uses
        if mix in self.cache:
            self.cache.move_to_end(mix)
        else:
            self.misses += 1
            while self.evict_first and len(self.cache) >= self.cache_size:
                self.cache.popitem(last=False)
                self.adapters = self.trimmed()
            missing = adapters_of(mix) - self.adapters
            self.adapter_loads += len(missing)
            seconds += timings.adapter_load_s * len(missing)
            self.adapters |= missing
            self.cache[mix] = None
            while len(self.cache) > self.cache_size:
                self.cache.popitem(last=False)
                self.adapters = self.trimmed()
        if self.active != mix:
            self.switches += 1
            seconds += timings.switch_s
            self.active = mix
        return seconds

    def trimmed(self) -> set[str]:
        """The adapters left after an eviction: the cached mixes' and those :func:`kept_adapters` keeps."""
        needed = set().union(*(adapters_of(m) for m in self.cache))
        return needed | kept_adapters(self.adapters - needed, needed, self.last_used, self.keep_adapters)


class Simulation:
    """One router over ``replicas`` replicas for one arrival sequence. ``policy(request, now)`` returns the
    ranks to try (lists of replica indices), in order; the shortest accepting queue of the first rank that has
    one takes the request (Serve's ``_select_from_candidate_replicas`` with every queue length known: Serve
    itself takes the shortest it has cached and probes the others only when none of those accepts)."""

    def __init__(self, replicas: int, max_ongoing: int, cache_size: int, timings: Timings, seed: int,
                 cores: float | None = None, evict_first: bool = False,
                 keep_adapters: int = DEFAULT_CACHE.keep_adapters) -> None:  # fmt: skip
        self.replicas = [Replica(i, cache_size, evict_first, keep_adapters) for i in range(replicas)]
        #: None: each replica has a device of its own. A number: the replicas share that many cores, each busy
        #: one working at min(1, cores / busy replicas) of its speed (bench.router's host: 2).
        self.cores = cores
        self.clock = 0.0
        self.max_ongoing = max_ongoing
        self.timings = timings
        self.rng = random.Random(seed)
        self.events: list[tuple[float, int, str, Any]] = []
        self.sequence = 0
        self.done: list[Request] = []
        #: The mix-aware router's state: the mix last sent to each replica, each mix's requests in flight there.
        self.sent: dict[int, str] = {}
        self.mix_inflight: collections.Counter[tuple[int, str]] = collections.Counter()
        self.demand = Demand()

    def at(self, when: float, kind: str, payload: Any) -> None:
        self.sequence += 1
        heapq.heappush(self.events, (when, self.sequence, kind, payload))

    # ---- the routers ----------------------------------------------------------------------------------------

    def mix_aware(self, spill_queue: int) -> Callable[[Request, float], list[list[int]]]:
        def policy(request: Request, now: float) -> list[list[int]]:
            ranks = rank(self.views(request.mix), request.mix, spill_queue, self.demand, now - request.arrived)
            return [[v.id for v in group] for group in ranks]

        return policy

    def views(self, mix: str) -> list[ReplicaView]:
        return [ReplicaView(r.index, self.sent.get(r.index, r.active), frozenset(r.cache), len(r.queue), len(r.queue),
                            self.mix_inflight[(r.index, mix)]) for r in self.replicas]  # fmt: skip

    def serve_default(self, request: Request, now: float) -> list[list[int]]:
        if request.matching_started is None:
            request.matching_started = now
        holders = [r.index for r in self.replicas if request.mix in r.cache]
        fewest = min(len(r.cache) for r in self.replicas)
        fewest_models = [r.index for r in self.replicas if len(r.cache) == fewest]
        if now - request.matching_started < self.rng.uniform(MATCHING_TIMEOUT_S, 2 * MATCHING_TIMEOUT_S):
            # (Serve also remembers mixes that fell back once; with every mix cached somewhere after warm-up,
            # that only matters for a mix no replica holds, which goes to the fewest models either way.)
            candidates = fewest_models if (not holders or request.tried_first) else holders
            request.tried_first = True
        elif not request.tried_fewest:
            candidates = fewest_models
            request.tried_fewest = True
        else:
            candidates = [r.index for r in self.replicas]
        if len(candidates) > 2:
            candidates = self.rng.sample(candidates, 2)
        elif len(candidates) == 2 and self.rng.getrandbits(1):
            candidates = candidates[::-1]
        return [candidates]

    # ---- the event loop -------------------------------------------------------------------------------------

    def route(self, request: Request, now: float, policy: Callable[[Request, float], list[list[int]]]) -> None:
        ranks = policy(request, now)
        if not ranks:
            # The mix-aware router holds the request on its event loop within the spill grace, ranking it
            # again every RECHECK_S (deployments.routing.settle): no retry of Serve's, no backoff.
            self.at(now + RECHECK_S, "route", request)
            return
        for group in ranks:
            accepting = [i for i in group if len(self.replicas[i].queue) < self.max_ongoing]
            if accepting:
                chosen = min(accepting, key=lambda i: len(self.replicas[i].queue))  # the first of the shortest
                self.send(request, self.replicas[chosen], now)
                return
        # Serve's routing loop: a second try at once, then backoffs of 25 ms doubling to 500 ms.
        delay = 0.0 if request.attempt == 0 else min(BACKOFF_S * BACKOFF_FACTOR ** min(request.attempt - 1, 16), BACKOFF_MAX_S)
        request.attempt += 1
        self.at(now + delay, "route", request)

    def send(self, request: Request, replica: Replica, now: float) -> None:
        request.replica = replica.index
        self.sent[replica.index] = request.mix
        self.mix_inflight[(replica.index, request.mix)] += 1
        self.demand.add(request.mix)
        replica.queue.append(request)
        if len(replica.queue) == 1:
            self.start(replica, now)

    def start(self, replica: Replica, now: float) -> None:
        request = replica.queue[0]
        self.advance(now)
        replica.phase, replica.remaining = "prepare", replica.prepare(request.mix, self.timings)
        replica.image_work = self.timings.image_s * math.exp(self.rng.gauss(0.0, self.timings.jitter))
        self.reschedule(now)

    def speed(self) -> float:
        busy = sum(r.phase is not None for r in self.replicas)
        return 1.0 if self.cores is None or busy <= self.cores else self.cores / busy

    def advance(self, now: float) -> None:
        """Every busy replica's progress since the last change, at the speed it had."""
        speed = self.speed()
        for r in self.replicas:
            if r.phase is not None:
                r.remaining -= (now - self.clock) * speed
        self.clock = now

    def reschedule(self, now: float) -> None:
        """When each busy replica ends its phase at the current speed (earlier events go stale)."""
        speed = self.speed()
        for r in self.replicas:
            if r.phase is not None:
                r.version += 1
                self.at(now + max(r.remaining, 0.0) / speed, "phase", (r, r.version))

    def end_phase(self, replica: Replica, now: float) -> None:
        self.advance(now)
        request = replica.queue[0]
        if replica.phase == "prepare":
            request.started = now
            replica.phase, replica.remaining = "image", replica.image_work
            self.reschedule(now)
            return
        replica.queue.popleft()
        replica.phase = None
        request.finished = now
        self.mix_inflight[(replica.index, request.mix)] -= 1
        self.done.append(request)
        if replica.queue:
            self.start(replica, now)
        else:
            self.reschedule(now)

    def run(self, arrivals: Sequence[tuple[float, str]], policy: Callable[[Request, float], list[list[int]]]) -> list[Request]:
        for i, (when, mix) in enumerate(arrivals):
            self.at(when, "route", Request(i, mix, when))
        while self.events:
            now, _, kind, payload = heapq.heappop(self.events)
            if kind == "route":
                self.route(payload, now, policy)
            else:  # "phase": a replica ends its load and switch, or its image (unless the event went stale)
                replica, version = payload
                if version == replica.version:
                    self.end_phase(replica, now)
        return self.done


def arrivals(n: int, rate: float, seed: int, zipf: float, hot: float | None) -> list[tuple[float, str]]:
    """``n`` Poisson arrivals at ``rate`` per second; mixes Zipf-distributed over the named then the ad-hoc ones,
    or, with ``hot``, that share of them on the control arm and the rest Zipf over the others."""
    rng = random.Random(seed)
    mixes = NAMED + ADHOC
    weights = zipf_weights(zipf)
    if hot is not None:
        control = mixes.index(ARMS[0])
        rest = sum(w for k, w in enumerate(weights) if k != control)
        weights = [hot if k == control else (1.0 - hot) * w / rest for k, w in enumerate(weights)]
    out, now = [], 0.0
    for mix in rng.choices(mixes, weights=weights, k=n):
        now += rng.expovariate(rate)
        out.append((now, mix))
    return out


def summarize(done: list[Request], replicas: list[Replica], warmup: int) -> dict[str, Any]:
    kept = [r for r in done if r.id >= warmup]
    waits = [r.started - r.arrived for r in kept if r.started is not None]
    latency: dict[str, list[float]] = collections.defaultdict(list)
    for r in kept:
        latency[r.mix].append(r.finished - r.arrived)  # type: ignore[operator]
    arms = [percentile(latency[a], 50) for a in ARMS]
    return {"requests": len(done), "switches": sum(r.switches for r in replicas), "misses": sum(r.misses for r in replicas),
            "adapter_loads": sum(r.adapter_loads for r in replicas),
            "wait_p50": percentile(waits, 50), "wait_p95": percentile(waits, 95), "wait_p99": percentile(waits, 99),
            "latency_p95": percentile([x for v in latency.values() for x in v], 95),
            "arms": arms}  # fmt: skip


def simulate(router: str, args: argparse.Namespace, load: float, seed: int) -> dict[str, Any]:
    timings = Timings(args.image_s, args.switch_s, args.adapter_load_s, args.jitter)
    servers = args.replicas if args.cores is None else min(args.replicas, args.cores)
    rate = load * servers / (args.image_s + args.switch_s)
    sim = Simulation(args.replicas, args.max_ongoing, args.cache, timings, seed, args.cores, args.evict_first,
                     args.keep_adapters)  # fmt: skip
    policy = sim.serve_default if router == "serve" else sim.mix_aware(int(router.removeprefix("mix_aware-")))
    done = sim.run(arrivals(args.requests, rate, seed, args.zipf, args.hot), policy)
    assert len(done) == args.requests, "a request was lost"
    return summarize(done, sim.replicas, args.warmup)


def tables(results: dict[tuple[float, str], list[dict[str, Any]]], args: argparse.Namespace) -> list[Table]:
    mixes = f"{args.hot:.0%} on {ARMS[0]}, the rest Zipf" if args.hot is not None else f"Zipf s={args.zipf}"
    where = "with a device each" if args.cores is None else f"sharing {args.cores:g} cores"
    if args.evict_first:
        where += ", adapters dropped at eviction (before the fix)"
    where += f", up to {args.keep_adapters} adapters kept loaded"
    table = Table(f"Simulated routing — {args.replicas} replicas {where}, {args.image_s} s per image, "
                  f"{1000 * args.switch_s:.0f} ms switch, {args.adapter_load_s} s per adapter loaded, cache of {args.cache}, "
                  f"max_ongoing_requests {args.max_ongoing}; {len(args.seeds)} seeds x {args.requests} requests "
                  f"(first {args.warmup} of each not counted) over 7 named + 3 ad-hoc mixes, {mixes}",
                  ["load", "router", "switches / 100", "mix misses / 100", "adapter loads / 100", "wait p50 (ms)", "wait p95 (ms)", "wait p99 (ms)",
                   "latency p95 (s)", "A/B arms' p50 differ"])  # fmt: skip
    for (load, router), runs in results.items():
        n = sum(r["requests"] for r in runs)
        waits = {q: sum(r[f"wait_p{q}"] for r in runs) / len(runs) for q in (50, 95, 99)}
        differ = sum(abs(r["arms"][0] - r["arms"][1]) / min(r["arms"]) for r in runs) / len(runs)
        table.add(f"{load:.0%}", router, f"{100 * sum(r['switches'] for r in runs) / n:.1f}",
                  f"{100 * sum(r['misses'] for r in runs) / n:.1f}", f"{100 * sum(r['adapter_loads'] for r in runs) / n:.1f}", *(f"{1000 * waits[q]:.0f}" for q in (50, 95, 99)),
                  f"{sum(r['latency_p95'] for r in runs) / len(runs):.2f}", f"{100 * differ:.1f} %")  # fmt: skip
    table.notes.append("Percentiles (and the arms' difference) are per seed, then averaged over the seeds; switches, misses "
                       "and adapter loads count every request.")
    table.notes.append("wait: arrival to the first denoising step (routing, the replica's queue, the mix load and switch).")
    return [table]


ROUTERS = ("serve", "mix_aware-0", "mix_aware-1", "mix_aware-2")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--image-s", type=float, default=1.8)
    parser.add_argument("--switch-s", type=float, default=0.05)
    parser.add_argument("--adapter-load-s", type=float, default=0.35, help="seconds per adapter file loaded")
    parser.add_argument("--jitter", type=float, default=0.03)
    parser.add_argument("--cache", type=int, default=DEFAULT_CACHE.mixes)
    parser.add_argument("--evict-first", action="store_true",
                        help="drop an evicted mix's adapters before the next load (deskgen before 2026-12-05)")
    parser.add_argument("--keep-adapters", type=int, default=DEFAULT_CACHE.keep_adapters,
                        help="loaded adapters kept in all although no cached mix uses them (0: none, deskgen before 2026-12-06)")
    parser.add_argument("--cores", type=float, default=None,
                        help="replicas share this many cores (as bench.router's do); default: a device each")
    parser.add_argument("--max-ongoing", type=int, default=2)
    parser.add_argument("--utilizations", default="0.5,0.7,0.85", help="arrival rates as shares of the replicas' capacity")
    parser.add_argument("--routers", default=",".join(ROUTERS))
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 3])
    parser.add_argument("--zipf", type=float, default=1.1)
    parser.add_argument("--hot", type=float, default=None, help="share of the requests on the control arm")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    routers = parse_choices(args.routers, ROUTERS, option="--routers")
    started = time.perf_counter()
    results: dict[tuple[float, str], list[dict[str, Any]]] = {}
    for load in (float(x) for x in args.utilizations.split(",")):
        for router in routers:
            results[(load, router)] = [simulate(router, args, load, seed) for seed in args.seeds]
    section = render_section("Generator routing, simulated", tables(results, args), command=command_line(),
                             wall_s=time.perf_counter() - started, host=machine())
    print(section)
    if not args.no_write:
        append_report(section)


if __name__ == "__main__":
    main()
