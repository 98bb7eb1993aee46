"""The allocation math of deskgen.experiments.bandit: fixed split, burn-in, Thompson with floors, p_best."""

from __future__ import annotations

import math

import numpy as np
import pytest

from deskgen.experiments.bandit import (
    DEFAULT_FLOOR,
    Allocation,
    ArmEvidence,
    allocate,
    p_best,
    posterior,
    top_two_shares,
)

pytestmark = pytest.mark.unit

SPLIT3 = {"a": 1.0, "b": 1.0, "c": 1.0}


def users(rng: np.random.Generator, n: int, rate: float) -> ArmEvidence:
    """``n`` users, each with 1 + Poisson(2) images liked with probability ``rate``."""
    exposures = 1 + rng.poisson(2.0, size=n)
    return ArmEvidence(rng.binomial(exposures, rate).astype(float).tolist(), exposures.astype(float).tolist())


def evidence(seed: int, n: int, rates: dict[str, float]) -> dict[str, ArmEvidence]:
    rng = np.random.default_rng(seed)
    return {arm: users(rng, n, rate) for arm, rate in rates.items()}


def thompson(ev: dict[str, ArmEvidence], split: dict[str, float] = SPLIT3, **kw: object) -> Allocation:
    args: dict = {"burn_in_users": 50, "floors": {}, "seed": 7, "draws": 5_000} | kw
    return allocate("thompson", ev, split, **args)


def test_weights_sum_to_one_and_respect_the_floors() -> None:
    ev = evidence(1, 400, {"a": 0.05, "b": 0.10, "c": 0.30})
    floors = {"a": 0.05, "b": 0.02}  # c: the default floor
    for top_two in (False, True):
        alloc = thompson(ev, floors=floors, top_two=top_two)
        assert alloc.phase == "thompson" and alloc.users == {"a": 400, "b": 400, "c": 400}
        assert math.isclose(sum(alloc.weights.values()), 1.0, abs_tol=1e-12)
        assert math.isclose(sum(alloc.p_best.values()), 1.0, abs_tol=1e-12)
        assert alloc.weights["a"] >= 0.05 and alloc.weights["b"] >= 0.02 and alloc.weights["c"] >= DEFAULT_FLOOR
        # c is clearly best: it gets all but the others' floors (top-two: its challenger takes a share)
        assert alloc.p_best["c"] > 0.999
        assert alloc.weights["a"] == pytest.approx(0.05, abs=1e-3)
    assert thompson(ev, floors=floors).weights["c"] == pytest.approx(1 - 0.05 - 0.02, abs=1e-3)
    # floors summing to exactly 1 leave nothing to the bandit: the weights are the floors
    assert thompson(ev, floors={"a": 0.5, "b": 0.25, "c": 0.25}).weights == pytest.approx({"a": 0.5, "b": 0.25, "c": 0.25})


def test_probability_matching_gives_floor_plus_the_rest_times_p_best() -> None:
    ev = evidence(2, 300, {"a": 0.10, "b": 0.11, "c": 0.12})
    alloc = thompson(ev, floors={"a": 0.1, "b": 0.1, "c": 0.1})
    for arm in SPLIT3:
        assert alloc.weights[arm] == pytest.approx(0.1 + 0.7 * alloc.p_best[arm], abs=1e-12)


def test_burn_in_returns_the_split_until_every_arm_has_enough_users() -> None:
    split = {"a": 3.0, "b": 1.0}
    ev = evidence(3, 100, {"a": 0.05, "b": 0.40})
    ev_short = {"a": ev["a"], "b": ArmEvidence(ev["b"].events[:99], ev["b"].exposures[:99])}
    alloc = thompson(ev_short, split, burn_in_users=100)
    assert alloc.phase == "burn_in" and alloc.weights == {"a": 0.75, "b": 0.25}
    assert alloc.users == {"a": 100, "b": 99}
    assert alloc.p_best["b"] > 0.99  # computed in every phase, for the report
    # an arm without any evidence yet counts as 0 users
    assert thompson({"a": ev["a"]}, split, burn_in_users=1).phase == "burn_in"
    after = thompson(ev, split, burn_in_users=100)
    assert after.phase == "thompson" and after.weights["b"] > 0.95
    # an arm the split gives no share gets no users in burn-in: it does not hold the burn-in up
    with_zero = thompson(ev, {"a": 3.0, "b": 1.0, "z": 0.0}, burn_in_users=100)
    assert with_zero.phase == "thompson" and with_zero.users["z"] == 0 and with_zero.weights["z"] >= DEFAULT_FLOOR


def test_fixed_is_the_normalised_split_whatever_the_evidence() -> None:
    ev = evidence(4, 500, {"a": 0.05, "b": 0.40})
    alloc = allocate("fixed", ev, {"a": 2, "b": 6}, burn_in_users=0, floors={}, seed=1, draws=2_000)
    assert alloc.phase == "fixed" and alloc.weights == {"a": 0.25, "b": 0.75}
    assert alloc.p_best["b"] > 0.99


def test_p_best_is_deterministic_per_seed_and_seeds_differ_a_little() -> None:
    ev = evidence(5, 200, {"a": 0.10, "b": 0.11, "c": 0.12})
    first = p_best(ev, seed=11)
    assert p_best(ev, seed=11) == first
    # the order of the mapping does not change the draws (replicas may build it differently)
    assert p_best(dict(reversed(list(ev.items()))), seed=11) == first
    other = p_best(ev, seed=12)
    assert other != first
    assert max(abs(first[a] - other[a]) for a in ev) < 0.03  # Monte-Carlo noise, se <= 0.0035
    assert allocate("thompson", ev, SPLIT3, burn_in_users=0, floors={}, seed=3).weights == \
        allocate("thompson", ev, SPLIT3, burn_in_users=0, floors={}, seed=3).weights  # fmt: skip


def test_p_best_near_one_with_much_data_and_uniform_with_none() -> None:
    ev = evidence(6, 2_000, {"a": 0.10, "b": 0.10, "c": 0.15})
    assert p_best(ev, seed=1)["c"] > 0.999
    empty = p_best({"a": ArmEvidence(), "b": ArmEvidence(), "c": ArmEvidence()}, seed=1)
    assert all(abs(v - 1 / 3) < 0.02 for v in empty.values())
    # equal evidence: near uniform too
    same = ev["a"]
    assert all(abs(v - 0.5) < 0.02 for v in p_best({"x": same, "y": same}, seed=2).values())
    assert p_best({"only": same}, seed=0) == {"only": 1.0}


def test_a_heavy_user_arm_is_less_certain_than_the_same_counts_spread_over_users() -> None:
    # 150 likes of 500 images: five heavy users who like very differently, or 500 users of one image each
    heavy = ArmEvidence([0.0, 10.0, 20.0, 40.0, 80.0], [100.0] * 5)
    spread = ArmEvidence([1.0] * 150 + [0.0] * 350, [1.0] * 500)
    h, s = posterior(heavy), posterior(spread)
    # the same rate (0.3) behind both posteriors, worth ~500 independent images spread, ~10 from 5 users
    for post in (h, s):
        assert (post.alpha - 1) / post.effective_n == pytest.approx(0.3)
    assert s.effective_n == pytest.approx(500, rel=0.01) and s.mean == pytest.approx(0.3, abs=0.01)
    assert h.effective_n < 25 and h.sd > 5 * s.sd
    # against a well-measured arm at 0.25, the spread arm is surely better; the heavy-user arm is not
    rival = ArmEvidence([1.0] * 500 + [0.0] * 1500, [1.0] * 2000)
    assert p_best({"arm": spread, "rival": rival}, seed=4)["arm"] > 0.98
    assert 0.5 < p_best({"arm": heavy, "rival": rival}, seed=4)["arm"] < 0.8
    # a lone user counts as one observation, however many images it saw
    assert posterior(ArmEvidence([30.0], [100.0])).effective_n == 1.0


def test_top_two_sends_the_non_leader_share_to_the_challenger() -> None:
    p = {"a": 0.7, "b": 0.2, "c": 0.1}
    shares = top_two_shares(p, {}, leader_share=0.5)
    assert math.isclose(sum(shares.values()), 1.0)
    # closed form: 0.5 p_a + 0.5 sum_{i != a} p_i p_a / (1 - p_i)
    assert shares["a"] == pytest.approx(0.5 * 0.7 + 0.5 * (0.2 * 0.7 / 0.8 + 0.1 * 0.7 / 0.9))
    assert shares["b"] > p["b"] and shares["a"] < p["a"]
    # a leader that won every draw: its challenger is the arm that came second in its draws
    certain = top_two_shares({"a": 1.0, "b": 0.0, "c": 0.0}, {"a": {"a": 0.0, "b": 0.9, "c": 0.1}})
    assert certain == pytest.approx({"a": 0.5, "b": 0.45, "c": 0.05})
    assert top_two_shares({"a": 1.0}, {}) == {"a": 1.0}


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"policy": "greedy"}, "policy"),
        ({"split": {}}, "split"),
        ({"split": {"a": -1.0, "b": 1.0}}, "split"),
        ({"split": {"a": 0.0, "b": 0.0}}, "split"),
        ({"floors": {"a": 0.6, "b": 0.6}}, "floors"),
        ({"floors": {"a": -0.01}}, "floors"),
        ({"floors": {"zz": 0.1}}, "floors"),
        ({"floors": {"a": float("nan")}}, "floors"),
        ({"burn_in_users": -1}, "burn_in_users"),
        ({"draws": 0}, "draws"),
        ({"evidence": {"zz": ArmEvidence([1.0], [2.0])}}, "evidence"),
        ({"evidence": {"a": ArmEvidence([3.0], [2.0])}}, "evidence"),
        ({"evidence": {"a": ArmEvidence([1.0], [0.0])}}, "evidence"),
        ({"evidence": {"a": ArmEvidence([1.0, 2.0], [2.0])}}, "evidence"),
    ],
)
def test_invalid_inputs_name_their_argument(kwargs: dict, argument: str) -> None:
    args: dict = {"policy": "thompson", "evidence": {}, "split": {"a": 1.0, "b": 1.0}, "burn_in_users": 0,
                  "floors": {}, "seed": 0, "draws": 100} | kwargs  # fmt: skip
    policy, ev, split = args.pop("policy"), args.pop("evidence"), args.pop("split")
    with pytest.raises(ValueError, match=argument):
        allocate(policy, ev, split, **args)


def simulate(policy: str, seed: int, rates: dict[str, float], *, updates: int = 8, batch: int = 300) -> float:
    """Users arrive in batches assigned by the current weights and keep their arm; the share of the last
    batch's new users the policy sends to the best arm."""
    rng = np.random.default_rng(seed)
    arms = list(rates)
    events: dict[str, list[float]] = {a: [] for a in arms}
    exposures: dict[str, list[float]] = {a: [] for a in arms}
    split = {a: 1.0 for a in arms}
    weights: dict[str, float] = {}
    for update in range(updates):
        ev = {a: ArmEvidence(events[a], exposures[a]) for a in arms}
        weights = allocate(policy, ev, split, burn_in_users=100, floors={}, seed=seed * 100 + update,  # type: ignore[arg-type]
                           draws=4_000).weights  # fmt: skip
        assigned = rng.choice(len(arms), size=batch, p=[weights[a] for a in arms])
        images = 1 + rng.poisson(2.0, size=batch)
        likes = rng.binomial(images, [rates[arms[i]] for i in assigned])
        for i, x, y in zip(assigned, images, likes, strict=True):
            events[arms[i]].append(float(y))
            exposures[arms[i]].append(float(x))
    return weights[max(rates, key=rates.__getitem__)]


def test_thompson_puts_most_new_traffic_on_the_best_arm_and_fixed_does_not() -> None:
    rates = {"a": 0.08, "b": 0.10, "c": 0.20}
    for seed in (1, 2):
        assert simulate("thompson", seed, rates) > 0.8
        assert simulate("fixed", seed, rates) == pytest.approx(1 / 3)
