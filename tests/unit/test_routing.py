"""The mix-aware router's ranking (deployments/routing.py): which replicas a request for a mix tries first."""

from __future__ import annotations

import asyncio

import pytest

from deployments.routing import HOLDER_WAIT_S, SPILL_GRACE_S, ReplicaView, rank

pytestmark = pytest.mark.unit


def r(name: str, active: str | None = None, cached: tuple[str, ...] = (), queue: int | None = 0,
      reported: int | None = None, mix: int = 0) -> ReplicaView:  # fmt: skip
    """A replica view; ``mix``: requests of the ranked mix in its queue (this router's)."""
    return ReplicaView(name, active, frozenset(cached + ((active,) if active else ())), queue, reported, mix)


def ids(ranks: list[list[ReplicaView]]) -> list[list[str]]:
    return [[v.id for v in group] for group in ranks]


def test_an_idle_replica_with_the_mix_active_comes_first_then_cached_then_the_rest() -> None:
    replicas = [r("other", "b", queue=0), r("cached", "c", ("a",), queue=0), r("active", "a", queue=0)]
    # The idle holders only, active first: the other replica is not offered while one of them can take it.
    assert ids(rank(replicas, "a", spill_queue=2)) == [["active", "cached"]]


def test_a_busy_replica_is_not_made_to_switch_while_an_idle_one_holds_the_mix() -> None:
    replicas = [r("busy-active", "a", queue=1), r("idle-cached", "b", ("a",), queue=0), r("idle-other", "c", queue=0)]
    assert ids(rank(replicas, "a", spill_queue=2)) == [["idle-cached"], ["busy-active"]]
    # A holder this router has no count of (idle past Serve's 10 s) but whose report shows nothing in flight
    # is idle, and comes before a busy holder: in one rank Serve would take the busy one, whose count it has.
    unknown = [r("busy", "a", queue=1, reported=1), r("quiet", "b", ("a",), queue=None, reported=0)]
    assert ids(rank(unknown, "a", spill_queue=2)) == [["quiet"], ["busy"]]


def test_below_the_threshold_the_mix_waits_for_its_holder_and_goes_elsewhere_only_after_a_while() -> None:
    replicas = [r("holder", "a", queue=1), r("idle", "b", queue=0)]
    assert ids(rank(replicas, "a", spill_queue=2)) == [["holder"]]
    # The holder has not accepted for HOLDER_WAIT_S (full, or no answer to Serve's queue probe): switch elsewhere.
    assert ids(rank(replicas, "a", spill_queue=2, waited_s=HOLDER_WAIT_S - 0.01)) == [["holder"]]
    assert ids(rank(replicas, "a", spill_queue=2, waited_s=HOLDER_WAIT_S)) == [["holder"], ["idle"]]
    unknown = [r("holder", "a", queue=None), r("idle", "b", queue=0)]  # no count, no report: idle (Serve probes it)
    assert ids(rank(unknown, "a", spill_queue=1)) == [["holder"]]


def test_a_hot_mix_spills_to_an_idle_replica_and_comes_back_when_it_cools() -> None:
    hot = [r("holder", "a", queue=2, mix=2), r("idle", "b", queue=0), r("busy", "c", queue=1)]
    # The idle replica first, in a rank of its own (Serve probes it rather than take the holder whose queue it
    # has cached), then the holder, then the replica busy with another mix.
    assert ids(rank(hot, "a", spill_queue=2, waited_s=SPILL_GRACE_S)) == [["idle"], ["holder"], ["busy"]]
    # The second replica now has the mix active too; once the queues fall below the threshold, the mix's
    # requests go to an idle holder (either), never to the busy replica of another mix.
    cooled = [r("holder", "a", queue=0), r("second", "a", queue=1, mix=1), r("busy", "c", queue=1)]
    assert ids(rank(cooled, "a", spill_queue=2))[0] == ["holder"]


def test_a_mix_is_hot_when_its_own_requests_on_its_holders_reach_the_threshold() -> None:
    # Three of the mix's requests over two busy holders: under 2 per holder, then at it.
    below = [r("h1", "a", queue=2, mix=2), r("h2", "b", ("a",), queue=1, mix=1), r("idle", "c", queue=0)]
    assert "idle" not in ids(rank(below, "a", spill_queue=2))[0]
    at = [r("h1", "a", queue=2, mix=2), r("h2", "b", ("a",), queue=2, mix=2), r("idle", "c", queue=0)]
    assert ids(rank(at, "a", spill_queue=2, waited_s=SPILL_GRACE_S)) == [["idle"], ["h1", "h2"]]
    # Holders busy with other mixes only: the mix waits for one rather than have an idle replica load it.
    elsewhere = [r("h1", "a", queue=2, mix=0), r("idle", "c", queue=0)]
    assert ids(rank(elsewhere, "a", spill_queue=1)) == [["h1"]]
    # An idle holder is never hot: its own requests counted but finished on the replica (no spill).
    assert ids(rank([r("h1", "a", queue=0, mix=1), r("idle", "c", queue=0)], "a", spill_queue=1)) == [["h1"]]
    unknown = [r("h1", "a", queue=None, mix=1), r("idle", "c", queue=0)]  # a queue not known yet is not "hot"
    assert ids(rank(unknown, "a", spill_queue=1))[0] == ["h1"]
    hot = [r("h1", "a", queue=2, mix=2), r("unprobed", "c", queue=None), r("busy", "d", queue=1)]
    assert ids(rank(hot, "a", spill_queue=2, waited_s=SPILL_GRACE_S)) == [["unprobed"], ["h1"], ["busy"]]
    # A replica this router has no count of but that reported requests in flight is not idle: the request is
    # not held for it, and it comes after the holder.
    reported_busy = [r("h1", "a", queue=2, mix=2), r("unprobed", "c", queue=None, reported=1)]
    assert ids(rank(reported_busy, "a", spill_queue=2)) == [["h1"], ["unprobed"]]


def test_a_mix_no_replica_holds_goes_to_the_replicas_with_the_fewest_cached_mixes_first() -> None:
    replicas = [r("full", "b", ("c", "d"), queue=0), r("empty", None, queue=0), r("one", "c", queue=0)]
    assert ids(rank(replicas, "a", spill_queue=2)) == [["empty", "one", "full"]]
    # An idle replica before a busy one, in a rank of its own, also when this router has no count of it (Serve
    # would take the busy one whose count it has), unless the replica's own report shows it busy.
    mixed = [r("busy", "b", queue=1), r("unknown", "c", queue=None), r("reported", "d", queue=None, reported=1)]
    assert ids(rank(mixed, "a", spill_queue=2)) == [["unknown"], ["busy", "reported"]]


def test_a_replica_that_must_switch_is_the_one_whose_mix_is_wanted_least() -> None:
    replicas = [r("hot", "a", queue=0), r("cold", "b", queue=0), r("never", "c", ("d", "e"), queue=0)]
    demand = {"a": 30.0, "b": 2.0, "c": 0.5}
    assert ids(rank(replicas, "x", spill_queue=1, demand=demand)) == [["never", "cold", "hot"]]
    busy = [r("holder", "x", queue=1, mix=1), r("hot", "a", queue=0), r("cold", "b", queue=0)]
    first = ids(rank(busy, "x", spill_queue=1, demand=demand, waited_s=SPILL_GRACE_S))[0]
    assert first == ["cold", "hot"]  # a spill goes to the idle replica of the coldest mix first


def test_a_holder_is_busy_only_when_the_router_and_the_replica_agree() -> None:
    """The router still counts a request that just finished until its done-callback runs; the replica's
    report lags by a stats period. Spilling needs both to say so, or a sequential client would be spread."""
    just_finished = [r("holder", "a", queue=1, reported=0, mix=1), r("idle", "b", queue=0, reported=0)]
    assert ids(rank(just_finished, "a", spill_queue=1)) == [["holder"]]
    busy = [r("holder", "a", queue=1, reported=1, mix=1), r("idle", "b", queue=0, reported=0)]
    assert ids(rank(busy, "a", spill_queue=1, waited_s=SPILL_GRACE_S)) == [["idle"], ["holder"]]


def test_a_hot_mix_spills_only_once_the_request_has_waited_past_the_grace() -> None:
    """Both counts say busy, but the router's may still hold a request that just finished (its done-callback
    runs a moment after the caller's answer): within SPILL_GRACE_S no replica is offered (the router holds
    the request and ranks it again, :func:`settle`), and a caller that sends its next request at once stays
    on its holder."""
    busy = [r("holder", "a", queue=1, reported=1, mix=1), r("idle", "b", queue=0, reported=0)]
    assert rank(busy, "a", spill_queue=0) == []
    assert rank(busy, "a", spill_queue=0, waited_s=SPILL_GRACE_S / 2) == []
    assert ids(rank(busy, "a", spill_queue=0, waited_s=SPILL_GRACE_S)) == [["idle"], ["holder"]]
    # The retry, once the done-callback ran: the holder is idle, and takes the request.
    finished = [r("holder", "a", queue=0, reported=1), r("idle", "b", queue=0, reported=0)]
    assert ids(rank(finished, "a", spill_queue=0, waited_s=SPILL_GRACE_S)) == [["holder"]]
    # Every replica busy: there is nowhere to spill, so the request is not held at all (it would wait the
    # grace for nothing); Serve takes the shortest queue, a holder's first.
    saturated = [r("holder", "a", queue=1, reported=1, mix=1), r("busy", "b", queue=1, reported=1)]
    assert ids(rank(saturated, "a", spill_queue=0)) == [["holder"], ["busy"]]
    # A router configured without the grace (spill_grace_s 0) spills at once.
    assert ids(rank(busy, "a", spill_queue=0, grace_s=0.0)) == [["idle"], ["holder"]]
    assert rank(busy, "a", spill_queue=0, waited_s=0.03, grace_s=0.05) == []


def test_a_request_held_within_the_grace_goes_to_its_holder_when_the_done_callback_lands_meanwhile() -> None:
    """The race the grace closes, as Serve runs it: the caller has its answer, its next request of the same
    mix is routed, and the finished request's done-callback arrives a moment later from another thread
    (Ray's callback thread, through ``call_soon_threadsafe``). The router holds the request on its event
    loop and ranks it again; the callback lands meanwhile, and the holder takes it (``stayed``). With no
    callback the grace passes and the idle replica is offered first (``spilled``), not before the grace."""
    import threading

    from deployments.routing import settle

    async def scenario(finishes: bool, grace_s: float) -> tuple[list[list[str]], str | None, float]:
        loop = asyncio.get_running_loop()
        queue = {"holder": 1}  # the router's count: the request that just finished, its callback not run yet
        started = loop.time()

        def ranking() -> list[list[ReplicaView]]:
            busy = queue["holder"]
            replicas = [r("holder", "a", queue=busy, reported=1, mix=busy), r("idle", "b", queue=0, reported=0)]
            return rank(replicas, "a", spill_queue=0, waited_s=loop.time() - started, grace_s=grace_s)

        def done_callback() -> None:  # what Serve's _process_finished_request does to the counts
            queue["holder"] = 0

        if finishes:
            threading.Timer(0.005, lambda: loop.call_soon_threadsafe(done_callback)).start()
        ranks, held = await settle(ranking, "a")
        return ids(ranks), held, loop.time() - started

    # A grace far beyond the callback's 5 ms, so that no machine is too slow for the hold to resolve.
    ranks, held, _ = asyncio.run(scenario(finishes=True, grace_s=30.0))
    assert (ranks, held) == ([["holder"]], "stayed")
    ranks, held, waited = asyncio.run(scenario(finishes=False, grace_s=0.05))
    assert (ranks[0], held) == (["idle"], "spilled")
    assert waited >= 0.05
    # A ranking that offers replicas at once is not held.
    assert asyncio.run(settle(lambda: [[r("holder", "a")]], "a")) == ([[r("holder", "a")]], None)


def test_the_router_s_settings_are_checked_and_a_bad_one_falls_back_to_the_default_with_an_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from ray.serve._private.common import DeploymentHandleSource, DeploymentID

    from deployments.routing import DEFAULT_SPILL_QUEUE, MixAwareRouter, router_settings

    assert router_settings() == (DEFAULT_SPILL_QUEUE, SPILL_GRACE_S)
    assert router_settings(2, 0) == (2, 0.0)
    for bad, field in (({"spill_queue": -1}, "spill_queue"), ({"spill_queue": "2"}, "spill_queue"),
                       ({"spill_queue": 1.5}, "spill_queue"), ({"spill_queue": True}, "spill_queue"),
                       ({"spill_grace_s": -0.01}, "spill_grace_s"), ({"spill_grace_s": "20ms"}, "spill_grace_s"),
                       ({"spill_grace_s": HOLDER_WAIT_S + 1}, "spill_grace_s")):  # fmt: skip
        with pytest.raises(ValueError, match=f"request_router_kwargs.{field} must"):
            router_settings(**bad)
    # Serve builds the router in the caller's process after the deploy: a bad value must not break routing.
    router = MixAwareRouter(deployment_id=DeploymentID(name="Generator", app_name="deskgen"),
                            handle_source=DeploymentHandleSource.PROXY)  # fmt: skip
    router.initialize_state(spill_queue=2, spill_grace_s=0)
    assert (router.spill_queue, router.spill_grace_s) == (2, 0.0)
    with caplog.at_level("ERROR", logger="ray.serve"):
        router.initialize_state(spill_queue="two")
    assert (router.spill_queue, router.spill_grace_s) == (DEFAULT_SPILL_QUEUE, SPILL_GRACE_S)
    assert "request_router_kwargs.spill_queue must be a whole number" in caplog.text


def test_serve_config_yaml_gives_the_router_valid_settings() -> None:
    from deployments.routing import router_settings
    from deskgen.serve_config import deployment_config, load_serve_config

    kwargs = deployment_config(load_serve_config(), "Generator")["request_router_config"]["request_router_kwargs"]
    assert router_settings(**kwargs) == (kwargs["spill_queue"], kwargs["spill_grace_s"])


def test_the_router_counts_each_mix_s_requests_from_routed_to_completed_once() -> None:
    """The per-mix counts that make a mix hot: built by Serve's own callbacks on a router made as Serve makes
    it. A completion is counted once (Serve's contract, checked here against a repeated or unknown one), a
    finished mix leaves no entry behind, and a dead replica's requests are dropped with it."""
    from ray.serve._private.common import DeploymentHandleSource, DeploymentID, ReplicaID, RequestMetadata
    from ray.serve.request_router import PendingRequest

    from deployments.routing import MixAwareRouter

    deployment = DeploymentID(name="Generator", app_name="deskgen")
    a, b = ReplicaID("a", deployment), ReplicaID("b", deployment)

    async def scenario() -> None:  # PendingRequest makes an asyncio future: it needs a running loop
        router = MixAwareRouter(deployment_id=deployment, handle_source=DeploymentHandleSource.PROXY)
        router.initialize_state(spill_queue=1)

        def route(request_id: str, mix: str, replica: ReplicaID) -> None:
            metadata = RequestMetadata(request_id=request_id, internal_request_id=request_id, multiplexed_model_id=mix)
            router.on_request_routed(PendingRequest(args=[], kwargs={}, metadata=metadata), replica, None)

        route("r1", "x", a)
        route("r2", "x", a)
        route("r3", "y", b)
        assert dict(router.mix_inflight) == {(a, "x"): 2, (b, "y"): 1}
        assert router.sent == {a: "x", b: "y"}
        assert router.demand["x"] > router.demand["y"] > 0
        router.on_request_completed(a, "r1")
        router.on_request_completed(a, "r1")  # a second completion of the same request changes nothing
        router.on_request_completed(a, "never-routed")  # nor does one this router did not route (a rejection)
        assert dict(router.mix_inflight) == {(a, "x"): 1, (b, "y"): 1}
        router.on_request_completed(a, "r2")
        assert dict(router.mix_inflight) == {(b, "y"): 1} and set(router.routed) == {"r3"}
        route("r4", "x", b)  # b will hold x once its queue drains
        assert router.sent[b] == "x"
        router.on_replica_actor_died(b)
        assert not router.mix_inflight and not router.routed and b not in router.sent

    asyncio.run(scenario())
