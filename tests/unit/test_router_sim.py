"""The routing simulation (bench/router_sim.py): its replicas, its model of Serve's router, its bookkeeping."""

from __future__ import annotations

import argparse
import itertools

import pytest

from bench import router_sim as sim
from deployments.routing import RECHECK_S, SPILL_GRACE_S

pytestmark = pytest.mark.unit

TIMINGS = sim.Timings(image_s=1.0, switch_s=0.1, adapter_load_s=0.5, jitter=0.0)


def test_a_replica_loads_only_the_adapters_it_lacks_and_drops_those_no_cached_mix_uses() -> None:
    replica = sim.Replica(0, cache_size=2, keep_adapters=0)  # none kept beyond the cached mixes'
    assert replica.prepare("ott_3d", TIMINGS) == pytest.approx(2 * 0.5 + 0.1)  # two adapters, then the switch
    assert replica.prepare("ott_only", TIMINGS) == pytest.approx(0.1)  # a miss, but ott is loaded: a switch only
    assert replica.prepare("ott_only", TIMINGS) == 0.0  # active already
    assert replica.prepare("dalle_only", TIMINGS) == pytest.approx(0.5 + 0.1)  # evicts ott_3d: 3d goes
    assert replica.adapters == {"ott", "dalle"} and list(replica.cache) == ["ott_only", "dalle_only"]
    assert replica.prepare("3d:0.9", TIMINGS) == pytest.approx(0.5 + 0.1)  # 3d again (an ad-hoc mix); ott goes
    assert replica.adapters == {"dalle", "3d"}
    assert (replica.misses, replica.adapter_loads, replica.switches) == (4, 4, 4)
    # The order before the fix: the eviction first, then the load, which reloads the adapter the two shared.
    before = sim.Replica(0, cache_size=1, evict_first=True, keep_adapters=0)
    before.prepare("dalle_ott", TIMINGS)
    assert before.prepare("dalle_only", TIMINGS) == pytest.approx(0.5 + 0.1) and before.adapter_loads == 3
    after = sim.Replica(0, cache_size=1, keep_adapters=0)
    after.prepare("dalle_ott", TIMINGS)
    assert after.prepare("dalle_only", TIMINGS) == pytest.approx(0.1) and after.adapter_loads == 2


def test_a_replica_keeps_the_most_recently_used_adapters_no_cached_mix_uses_up_to_its_limit() -> None:
    replica = sim.Replica(0, cache_size=1, keep_adapters=3)
    replica.prepare("dalle_ott", TIMINGS)
    replica.prepare("3d_only", TIMINGS)  # evicts dalle_ott; dalle and ott kept: 3 loaded in all
    assert replica.adapters == {"dalle", "ott", "3d"}
    assert replica.prepare("dalle_ott", TIMINGS) == pytest.approx(0.1)  # back without a read: a switch only
    two = sim.Replica(0, cache_size=1, keep_adapters=2)
    two.prepare("dalle_ott", TIMINGS)
    two.prepare("ott_only", TIMINGS)  # ott used last: it stays (needed), dalle kept (room for 1)
    two.prepare("3d_only", TIMINGS)  # needs 3d: room for one more, the most recently used (ott)
    assert two.adapters == {"ott", "3d"} and two.adapter_loads == 3


def test_every_request_is_served_once_and_each_replica_runs_one_generation_at_a_time() -> None:
    simulation = sim.Simulation(replicas=2, max_ongoing=2, cache_size=2, timings=TIMINGS, seed=3)
    arrivals = sim.arrivals(300, rate=1.5, seed=3, zipf=1.1, hot=None)
    done = simulation.run(arrivals, simulation.mix_aware(1))
    assert sorted(r.id for r in done) == list(range(300))
    assert all(r.started is not None and r.finished is not None and r.arrived <= r.started < r.finished for r in done)
    assert sum(rep.switches for rep in simulation.replicas) <= 300
    assert not +simulation.mix_inflight  # every request counted in was counted out
    # Each replica ran one generation at a time: its requests' [start, finish) never overlap.
    for replica in (0, 1):
        spans = sorted((r.started, r.finished) for r in done if r.replica == replica)
        assert all(a[1] <= b[0] + 1e-9 for a, b in itertools.pairwise(spans))


def test_serve_s_model_tries_the_holders_first_then_the_replicas_with_the_fewest_mixes() -> None:
    simulation = sim.Simulation(replicas=3, max_ongoing=2, cache_size=4, timings=TIMINGS, seed=1)
    holder, _empty, other = simulation.replicas
    holder.cache["ott_3d"] = None
    other.cache.update({"mix": None, "dalle_ott": None})
    request = sim.Request(0, "ott_3d", arrived=0.0)
    assert simulation.serve_default(request, now=0.0) == [[0]]
    assert simulation.serve_default(request, now=0.0) == [[1]]  # next try: the fewest cached mixes (none)


def test_an_idle_replica_takes_a_mix_whose_holder_is_busy_with_spill_queue_0_and_not_with_1() -> None:
    """A request whose mix's only holder is busy with another mix: with spill_queue 0 the idle replica takes
    it at once; with 1 it queues on the holder (none of the mix's own requests there yet)."""
    for spill_queue, replica_used in ((0, 1), (1, 0)):
        simulation = sim.Simulation(replicas=2, max_ongoing=2, cache_size=4, timings=TIMINGS, seed=1)
        holder, idle = simulation.replicas
        holder.cache.update({"ott_3d": None, "mix": None})
        holder.adapters |= {"ott", "3d", "dalle"}
        holder.active = "mix"
        idle.cache["dalle_only"] = None
        idle.adapters.add("dalle")
        idle.active = "dalle_only"
        done = simulation.run([(0.0, "mix"), (0.01, "ott_3d")], simulation.mix_aware(spill_queue))
        assert {r.mix: r.replica for r in done} == {"mix": 0, "ott_3d": replica_used}, spill_queue


def test_the_bench_runs_and_tells_routers_apart() -> None:
    args = argparse.Namespace(replicas=3, image_s=1.0, switch_s=0.05, adapter_load_s=0.3, jitter=0.03, cache=4,
                              max_ongoing=2, requests=400, warmup=50, zipf=1.1, hot=None, seeds=[1], cores=None,
                              evict_first=False, keep_adapters=4)  # fmt: skip
    results = {router: sim.simulate(router, args, 0.7, seed=1) for router in sim.ROUTERS}
    assert all(r["requests"] == 400 for r in results.values())
    assert len({(r["switches"], r["misses"]) for r in results.values()}) > 1
    tables = sim.tables({(0.7, router): [r] for router, r in results.items()}, args)
    assert len(tables[0].rows) == len(sim.ROUTERS)


def test_replicas_sharing_cores_slow_each_other_down_and_replicas_with_a_device_each_do_not() -> None:
    timings = sim.Timings(image_s=1.0, switch_s=0.0, adapter_load_s=0.0, jitter=0.0)
    # The second request finds the mix's holder busy and an idle replica: the router holds it for its spill
    # grace (ranking it again every RECHECK_S), then it spills; it starts d later.
    d = SPILL_GRACE_S
    for cores, finished in ((None, [1.0, 1.0 + d]), (1.0, [2.0 - d, 2.0]), (2.0, [1.0, 1.0 + d])):
        simulation = sim.Simulation(replicas=2, max_ongoing=1, cache_size=4, timings=timings, seed=1, cores=cores)
        done = simulation.run([(0.0, "ott_3d"), (0.0, "ott_3d")], simulation.mix_aware(0))
        assert {r.replica for r in done} == {0, 1}
        assert [r.finished for r in done] == pytest.approx(finished, abs=RECHECK_S), cores  # held in steps of RECHECK_S
    # One core, and the second request arrives half-way through the first: 0.5 + d s alone, then both at half speed.
    simulation = sim.Simulation(replicas=2, max_ongoing=1, cache_size=4, timings=timings, seed=1, cores=1.0)
    done = simulation.run([(0.0, "ott_3d"), (0.5, "ott_3d")], simulation.mix_aware(0))
    assert sorted(r.finished or 0.0 for r in done) == pytest.approx([1.5 - d, 2.0], abs=RECHECK_S)
