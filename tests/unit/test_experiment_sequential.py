"""Intervals that hold, shown by seeded simulation on the real functions, and the experiment's decision.

* A/A experiments read after every batch of users: re-reading the fixed-horizon p-value inflates the
  false-positive rate well above alpha; the always-valid (mixture) p-value stays at or under it.
* The rate's Korn–Graubard interval covers a true rate of 0.05 at 20 users at least nominally.
* The confidence sequence covers a true non-zero difference at every look at once.
* The sequential figures equal their closed forms, written out here with ``math``.
* :func:`decide` reaches each verdict, validates its inputs, and its ``users_needed`` is about right.

Each simulation prints one ``[sim]`` line (``pytest -s``). Users see 1 to 6 images and differ in their
own like rate (a beta distribution), so the clustering by user is real.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest

from deskgen.experiments.decision import Decision, decide
from deskgen.experiments.stats import (
    RatioEstimate,
    difference,
    ratio_estimate,
    sequential_difference,
)

pytestmark = pytest.mark.unit

ALPHA = 0.05


def mc_se(p: float, runs: int) -> float:
    """Monte-Carlo standard error of a proportion ``p`` estimated from ``runs`` runs."""
    return math.sqrt(p * (1 - p) / runs)


def users(
    rng: np.random.Generator, n: int, rate: float, *, images: int = 6, concentration: float = 10.0
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` users' (events, exposures): 1..``images`` images each, every user with a like rate drawn from
    Beta(rate c, (1 - rate) c) (mean ``rate``; smaller ``c``, more heterogeneous users)."""
    exposures = rng.integers(1, images + 1, size=n)
    own = rng.beta(rate * concentration, (1 - rate) * concentration, size=n)
    return rng.binomial(exposures, own).astype(float), exposures.astype(float)


def looks(
    rng: np.random.Generator, rates: tuple[float, float], *, n_looks: int, batch: int
) -> list[tuple[RatioEstimate, RatioEstimate]]:
    """An experiment of control and treatment read after every batch of ``batch`` users per arm."""
    (yc, xc), (yt, xt) = (users(rng, n_looks * batch, rate) for rate in rates)
    return [
        (ratio_estimate(yc[: k * batch], xc[: k * batch]), ratio_estimate(yt[: k * batch], xt[: k * batch]))
        for k in range(1, n_looks + 1)
    ]


def test_a_and_a_peeking_inflates_the_fixed_horizon_rule_but_not_the_sequential_one() -> None:
    rng = np.random.default_rng(20240601)
    runs, n_looks, batch, tau = 1000, 20, 20, 0.03
    fixed = sequential = once = 0
    for _ in range(runs):
        experiment = looks(rng, (0.10, 0.10), n_looks=n_looks, batch=batch)
        p_values = [difference(c, t).p_value for c, t in experiment]
        fixed += any(p < ALPHA for p in p_values)
        once += p_values[-1] < ALPHA
        sequential += any(
            sequential_difference(c, t, alpha=ALPHA, tau=tau).p_value < ALPHA for c, t in experiment
        )
    se = mc_se(ALPHA, runs)
    print(
        f"\n[sim] A/A, {runs} experiments read after each of {n_looks} batches of {batch} users per arm: "
        f"false-positive rate fixed-horizon {fixed / runs:.3f}, sequential {sequential / runs:.3f} "
        f"(alpha {ALPHA}, MC SE {se:.4f}; fixed-horizon read once, at the last look: {once / runs:.3f})"
    )
    assert once / runs <= ALPHA + 3 * se  # the fixed-horizon p-value is right when read once
    assert fixed / runs > ALPHA + 3 * se  # peeking at the fixed-horizon p-value: inflated
    assert sequential / runs <= ALPHA + 3 * se  # always valid


@pytest.mark.parametrize("concentration", [math.inf, 5.0], ids=["same-rate", "heterogeneous"])
def test_the_rate_interval_covers_at_small_n(concentration: float) -> None:
    rng = np.random.default_rng(7)
    runs, n, rate = 4000, 20, 0.05
    covered = wald = 0
    for _ in range(runs):
        exposures = rng.integers(1, 6, size=n)
        own = np.full(n, rate) if math.isinf(concentration) else rng.beta(rate * concentration, (1 - rate) * concentration, size=n)  # fmt: skip
        est = ratio_estimate(rng.binomial(exposures, own).astype(float), exposures.astype(float))
        assert 0.0 <= est.ci_low <= est.rate <= est.ci_high <= 1.0 and est.ci_high > est.ci_low
        covered += est.ci_low <= rate <= est.ci_high
        wald += abs(est.rate - rate) <= 1.959964 * est.se
    se = mc_se(0.95, runs)
    print(
        f"\n[sim] rate interval at {n} users, true rate {rate} ({'same rate' if math.isinf(concentration) else 'heterogeneous users'}): "
        f"Korn-Graubard coverage {covered / runs:.3f}, Wald {wald / runs:.3f} (nominal 0.95, MC SE {se:.4f})"
    )  # fmt: skip
    assert covered / runs >= 0.95 - 3 * se
    assert wald / runs < 0.95 - 3 * se  # what the interval replaces


def test_the_rate_interval_is_clopper_pearson_without_clustering_and_never_degenerate() -> None:
    from statsmodels.stats.proportion import proportion_confint

    def reference(count: float, nobs: float) -> tuple[float, float]:
        low, high = proportion_confint(count, nobs, alpha=0.05, method="beta")
        return float(low), float(high)

    # Design effect 1: every user liked exactly one of two images (no variation between users).
    even = ratio_estimate([1.0] * 30, [2.0] * 30)
    assert even.design_effect == 1.0 and even.effective_n == 60.0
    assert (even.ci_low, even.ci_high) == tuple(pytest.approx(v, rel=1e-9) for v in reference(30, 60))
    # Zero events: [0, 1 - (alpha/2)^(1/n)], not 0 ± 0.
    zero = ratio_estimate([0.0] * 20, [3.0] * 20)
    assert zero.ci_low == 0.0 and zero.ci_high == pytest.approx(1 - 0.025 ** (1 / 60), rel=1e-12)
    assert (zero.ci_low, zero.ci_high) == tuple(pytest.approx(v, rel=1e-9) for v in reference(0, 60))
    # All events: the mirror image.
    full = ratio_estimate([3.0] * 20, [3.0] * 20)
    assert full.ci_high == 1.0 and full.ci_low == pytest.approx(0.025 ** (1 / 60), rel=1e-12)
    # Clustered: one heavy user holds every like; the interval is Clopper-Pearson on fewer, fractional trials.
    heavy = ratio_estimate([12.0] + [0.0] * 19, [20.0] + [2.0] * 19)
    assert heavy.design_effect > 5 and heavy.effective_n < 58 / 5
    assert (heavy.ci_low, heavy.ci_high) == tuple(
        pytest.approx(v, rel=1e-9) for v in reference(heavy.rate * heavy.effective_n, heavy.effective_n)
    )
    assert 0.0 < heavy.ci_low < heavy.rate < heavy.ci_high < 1.0


def test_the_confidence_sequence_covers_a_true_difference_at_every_look() -> None:
    rng = np.random.default_rng(99)
    runs, n_looks, batch, control, treatment, tau = 1000, 20, 10, 0.05, 0.08, 0.03
    truth = treatment - control
    always = fixed_always = 0
    for _ in range(runs):
        experiment = looks(rng, (control, treatment), n_looks=n_looks, batch=batch)
        sequences = [sequential_difference(c, t, alpha=ALPHA, tau=tau) for c, t in experiment]
        always += all(s.ci_low <= truth <= s.ci_high for s in sequences)
        fixed_always += all(d.ci_low <= truth <= d.ci_high for d in (difference(c, t) for c, t in experiment))
    se = mc_se(1 - ALPHA, runs)
    print(
        f"\n[sim] true difference {truth:+.2f} ({control} vs {treatment}), {runs} runs x {n_looks} looks of "
        f"{batch} users per arm: covered at every look by the confidence sequence {always / runs:.3f}, by the "
        f"fixed-horizon interval {fixed_always / runs:.3f} (nominal {1 - ALPHA}, MC SE {se:.4f})"
    )
    assert always / runs >= 1 - ALPHA - 3 * se


def closed_form(
    control: RatioEstimate, treatment: RatioEstimate, alpha: float, tau: float
) -> tuple[float, float, float]:
    """(variance, half-width, p-value) of the normal-mixture sequence, written out from the formulas."""

    def arm_variance(arm: RatioEstimate) -> float:
        shrunk = (arm.events + 0.5) / (arm.exposures + 1)
        floor = shrunk * (1 - shrunk) / arm.exposures
        return floor if math.isnan(arm.se) else max(arm.se**2, floor)

    v = arm_variance(control) + arm_variance(treatment)
    d = treatment.rate - control.rate
    half = math.sqrt(v * (v + tau**2) / tau**2 * math.log((v + tau**2) / (v * alpha**2)))
    mixture = math.sqrt(v / (v + tau**2)) * math.exp(tau**2 * d**2 / (2 * v * (v + tau**2)))
    return v, half, min(1.0, 1 / mixture)


@pytest.mark.parametrize(
    ("control", "treatment"),
    [
        (([3.0, 0.0, 1.0, 2.0, 0.0] * 8, [5.0, 2.0, 3.0, 4.0, 1.0] * 8), ([1.0, 2.0, 4.0, 0.0] * 10, [2.0, 3.0, 5.0, 1.0] * 10)),
        (([0.0] * 30, [2.0] * 30), ([1.0, 0.0, 0.0] * 10, [2.0] * 30)),  # no event in the control: the floor
        (([1.0], [4.0]), ([0.0, 3.0, 1.0], [1.0, 4.0, 2.0])),  # one user: no se, the floor
        (([1.0] * 80 + [0.0] * 320, [2.0] * 400), ([1.0] * 160 + [0.0] * 240, [2.0] * 400)),  # tiny p
        (([0.0], [1.0]), ([1.0], [1.0])),  # one image per arm: clipped to [-1, 1]
    ],
    ids=["clustered", "zero-events", "one-user", "decisive", "clipped"],
)  # fmt: skip
@pytest.mark.parametrize(("alpha", "tau"), [(0.05, 0.02), (0.01, 0.1)])
def test_the_sequence_and_its_p_value_equal_their_closed_forms(
    control: tuple[list[float], list[float]],
    treatment: tuple[list[float], list[float]],
    alpha: float,
    tau: float,
) -> None:
    c, t = ratio_estimate(*control), ratio_estimate(*treatment)
    seq = sequential_difference(c, t, alpha=alpha, tau=tau)
    v, half, p = closed_form(c, t, alpha, tau)
    d = t.rate - c.rate
    assert seq.estimate == d and seq.tau == tau and seq.variance == pytest.approx(v, rel=1e-12)
    assert seq.ci_low == pytest.approx(max(-1.0, d - half), rel=1e-9, abs=1e-15)
    assert seq.ci_high == pytest.approx(min(1.0, d + half), rel=1e-9, abs=1e-15)
    assert seq.p_value == pytest.approx(p, rel=1e-9, abs=1e-300)
    assert (seq.p_value < alpha) == (not seq.ci_low <= 0.0 <= seq.ci_high)
    assert -1.0 <= seq.ci_low < seq.ci_high <= 1.0 and (seq.ci_high == 1.0) == (d + half >= 1.0)
    # Wider than the fixed-horizon Wald interval on the same variance: the price of reading at any time.
    assert half > 1.959964 * math.sqrt(v)


def test_p_below_alpha_exactly_when_zero_is_outside_the_sequence() -> None:
    rng = np.random.default_rng(5)
    seen = {True: 0, False: 0}
    for _ in range(300):
        c = ratio_estimate(*users(rng, int(rng.integers(2, 200)), 0.1))
        t = ratio_estimate(*users(rng, int(rng.integers(2, 200)), float(rng.uniform(0.05, 0.3))))
        seq = sequential_difference(c, t, alpha=ALPHA, tau=0.03)
        outside = not seq.ci_low <= 0.0 <= seq.ci_high
        assert (seq.p_value < ALPHA) == outside
        seen[outside] += 1
    assert min(seen.values()) > 30  # both sides exercised


def test_the_sequence_is_explicit_about_degenerate_inputs() -> None:
    some = ratio_estimate([1.0, 0.0], [2.0, 3.0])
    empty = sequential_difference(ratio_estimate([], []), some, tau=0.02)
    assert all(
        math.isnan(v) for v in (empty.estimate, empty.ci_low, empty.ci_high, empty.p_value, empty.variance)
    )
    nothing = sequential_difference(
        ratio_estimate([0.0] * 5, [1.0] * 5), ratio_estimate([0.0] * 5, [1.0] * 5), tau=0.02
    )
    assert nothing.p_value == 1.0 and nothing.ci_low < 0.0 < nothing.ci_high  # zero events: not 0 ± 0
    for bad in ({"alpha": 0.0}, {"alpha": 1.0}, {"tau": 0.0}, {"tau": math.nan}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            sequential_difference(some, some, **{"tau": 0.02, **bad})  # type: ignore[arg-type]


# -- the decision ---------------------------------------------------------------------------------------


def arm(events: int, users_: int, images: int = 1) -> RatioEstimate:
    """``users_`` users of ``images`` images each, ``events`` of them with one event (no clustering)."""
    return ratio_estimate([1.0] * events + [0.0] * (users_ - events), [float(images)] * users_)


def test_a_treatment_that_beats_the_control_wins() -> None:
    rates = {"control": arm(500, 5000), "a": arm(750, 5000), "b": arm(1000, 5000)}
    decision = decide(rates, control="control", mde=0.02)
    assert decision.verdict == "winner" and decision.winner == "b"  # the best of those above 0
    assert decision.effect is not None and decision.ci_low is not None and decision.ci_high is not None
    assert decision.effect == pytest.approx(0.1)
    assert 0.0 < decision.ci_low < decision.effect < decision.ci_high
    assert decision.users_needed is None and decision.metric == "like" and decision.alpha == 0.05
    # Bonferroni: each comparison is the sequence at alpha / 2.
    for comparison in decision.comparisons:
        seq = sequential_difference(rates["control"], rates[comparison.arm], alpha=0.025, tau=0.02)
        assert (comparison.ci_low, comparison.ci_high, comparison.p_value) == (
            seq.ci_low,
            seq.ci_high,
            seq.p_value,
        )
    assert [c.arm for c in decision.comparisons] == ["a", "b"]
    assert "b" in decision.reason and "ship b" in decision.reason


def test_a_control_that_beats_every_treatment_wins() -> None:
    rates = {"a": arm(500, 5000), "control": arm(1000, 5000), "b": arm(600, 5000)}
    decision = decide(rates, control="control", metric="download", mde=0.02)
    assert decision.verdict == "winner" and decision.winner == "control"
    b = next(c for c in decision.comparisons if c.arm == "b")  # the runner-up
    assert decision.effect == pytest.approx(0.08) and (decision.ci_low, decision.ci_high) == (
        -b.ci_high,
        -b.ci_low,
    )
    assert decision.ci_low is not None and decision.ci_low > 0.0
    assert "download" in decision.reason and "keep control" in decision.reason


def test_no_difference_larger_than_the_mde() -> None:
    decision = decide({"control": arm(5000, 50_000), "new": arm(5050, 50_000)}, control="control", mde=0.02)
    assert decision.verdict == "no_difference" and decision.winner is None and decision.effect is None
    (comparison,) = decision.comparisons
    assert -0.02 < comparison.ci_low < 0.0 < comparison.ci_high < 0.02
    assert "2.0 pp" in decision.reason
    # An arm that lost and one within the MDE: nothing left to learn that the experiment cares about.
    mixed = decide({"control": arm(5000, 50_000), "same": arm(5050, 50_000), "worse": arm(4000, 50_000)},
                   control="control", mde=0.02)  # fmt: skip
    assert mixed.verdict == "no_difference" and "worse" in mixed.reason


def test_keep_running_at_small_n_says_how_many_users() -> None:
    decision = decide({"control": arm(2, 20), "new": arm(3, 20)}, control="control", mde=0.03)
    assert decision.verdict == "keep_running" and decision.winner is None
    assert decision.users_needed is not None and decision.users_needed > 100
    assert str(decision.users_needed) in decision.reason
    # Arms without events or users still get an estimate.
    for rates in (
        {"control": arm(0, 10), "new": arm(0, 10)},
        {"control": arm(0, 1), "new": ratio_estimate([], [])},
        {"control": ratio_estimate([], []), "new": ratio_estimate([], [])},
    ):
        quiet = decide(rates, control="control", mde=0.05)
        assert quiet.verdict == "keep_running" and quiet.users_needed is not None and quiet.users_needed > 0


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"alpha": 0.0}, "alpha"),
        ({"alpha": 0.5}, "alpha"),
        ({"mde": 0.0}, "mde"),
        ({"mde": -0.01}, "mde"),
        ({"mde": math.nan}, "mde"),
        ({"control": "missing"}, "control"),
        ({"tau": 0.0}, "tau"),
    ],
)
def test_decide_validates_its_inputs(kwargs: dict[str, object], field: str) -> None:
    rates = {"control": arm(2, 20), "new": arm(3, 20)}
    with pytest.raises(ValueError, match=field):
        decide(rates, **{"control": "control", "mde": 0.02, **kwargs})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="treatment"):
        decide({"control": arm(2, 20)}, control="control", mde=0.02)


@pytest.mark.parametrize(("treatment", "expected"), [(0.10, "no_difference"), (0.14, "winner")])
def test_users_needed_is_about_right(treatment: float, expected: str) -> None:
    """From 50 users per arm the decision asks for ``users_needed`` more; continuing the same process for
    that many reaches a decision in most runs. It is sized for the hardest case, an effect near the
    MDE's edge of "no difference": there a quarter of it is mostly not enough yet (a large effect, though,
    is usually clear well before; the estimate does not bet on the noisy early effect size)."""
    rng = np.random.default_rng(17)
    control, mde, runs = 0.10, 0.03, 60
    at_needed: list[str] = []
    at_quarter: list[str] = []
    for _ in range(runs):
        first = {name: users(rng, 50, rate) for name, rate in (("control", control), ("new", treatment))}
        read: Callable[[dict[str, tuple[np.ndarray, np.ndarray]]], Decision] = lambda data: decide(  # noqa: E731
            {name: ratio_estimate(*arrays) for name, arrays in data.items()}, control="control", mde=mde
        )
        start = read(first)
        if start.verdict != "keep_running":  # a large effect may already be clear at 50 users per arm
            continue
        assert start.users_needed is not None
        half = start.users_needed // 2 + 1
        more = {name: users(rng, half, rate) for name, rate in (("control", control), ("new", treatment))}
        for share, out in ((1.0, at_needed), (0.25, at_quarter)):
            m = int(half * share)
            joined = {name: (np.r_[first[name][0], more[name][0][:m]], np.r_[first[name][1], more[name][1][:m]])
                      for name in first}  # fmt: skip
            out.append(read(joined).verdict)
    read_on = len(at_needed)
    decided = sum(v != "keep_running" for v in at_needed) / read_on
    right = at_needed.count(expected) / read_on
    early = sum(v != "keep_running" for v in at_quarter) / read_on
    print(f"\n[sim] users_needed, true {control} vs {treatment} ({read_on} of {runs} runs undecided at 50 users per "
          f"arm): decided after it {decided:.2f} ({expected} {right:.2f}), after a quarter of it {early:.2f}")  # fmt: skip
    assert read_on >= runs // 2
    assert decided >= 0.8 and right >= 0.75
    if treatment == control:
        assert early <= 0.5
