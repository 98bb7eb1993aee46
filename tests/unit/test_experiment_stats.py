"""The report's statistics against independent values: statsmodels' cluster-robust OLS for the ratio
metric and the difference (the same estimands, computed by another library's code path), statsmodels'
Clopper–Pearson (``proportion_confint(method="beta")``) for the Korn–Graubard and MOVER intervals, and
closed forms with the standard library (math.erfc) for the sample-ratio test. The sequential statistics
and the simulations are in test_experiment_sequential.py."""

from __future__ import annotations

import math

import numpy as np
import pytest

from deskgen.experiments.stats import SRM_ALARM_P, RatioEstimate, difference, ratio_estimate, sample_ratio

pytestmark = pytest.mark.unit


def users_of(rng: np.random.Generator, n: int, like_p: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-user exposures (1..12, heavy users included) and likes among them."""
    exposures = rng.integers(1, 13, size=n)
    likes = rng.binomial(exposures, like_p)
    return likes.astype(float), exposures.astype(float)


def exposure_rows(likes: np.ndarray, exposures: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One row per exposure (outcome 0/1) and its user: what an OLS on raw events sees."""
    outcome, group = [], []
    for user, (y, x) in enumerate(zip(likes.astype(int), exposures.astype(int), strict=True)):
        outcome += [1.0] * y + [0.0] * (x - y)
        group += [user] * x
    return np.array(outcome), np.array(group)


def clopper_pearson(rate: float, n_eff: float, alpha: float = 0.05) -> tuple[float, float]:
    """statsmodels' Clopper–Pearson interval of ``rate`` over ``n_eff`` (possibly fractional) trials."""
    from statsmodels.stats.proportion import proportion_confint

    low, high = proportion_confint(rate * n_eff, n_eff, alpha=alpha, method="beta")
    return float(low), float(high)


def korn_graubard_reference(rate: float, se: float, exposures: float) -> tuple[float, float]:
    """Korn–Graubard from its definition: Clopper–Pearson on exposures / design effect, the design
    effect being the (cluster-robust) variance over the binomial one, floored at 1."""
    deff = max(1.0, se**2 / (rate * (1 - rate) / exposures))
    return clopper_pearson(rate, exposures / deff)


def mover_reference(control: RatioEstimate, treatment: RatioEstimate) -> tuple[float, float]:
    """Newcombe's hybrid (MOVER) interval of treatment - control from the two arms' intervals."""
    d = treatment.rate - control.rate
    low = d - math.sqrt((treatment.rate - treatment.ci_low) ** 2 + (control.ci_high - control.rate) ** 2)
    high = d + math.sqrt((treatment.ci_high - treatment.rate) ** 2 + (control.rate - control.ci_low) ** 2)
    return low, high


def test_the_ratio_metric_equals_cluster_robust_ols_by_user() -> None:
    import statsmodels.api as sm

    likes, exposures = users_of(np.random.default_rng(1), 200, 0.3)
    est = ratio_estimate(likes, exposures)
    y, groups = exposure_rows(likes, exposures)
    fit = sm.OLS(y, np.ones((len(y), 1))).fit(cov_type="cluster", cov_kwds={"groups": groups})
    assert est.users == 200 and est.exposures == exposures.sum() and est.events == likes.sum()
    assert est.rate == pytest.approx(float(fit.params[0]), rel=1e-12)
    assert est.se == pytest.approx(float(fit.bse[0]), rel=1e-9)  # ddof=1 = statsmodels' G/(G-1) correction
    # The interval is Korn–Graubard: Clopper–Pearson on the effective sample size, the design effect taken
    # from statsmodels' clustered standard error.
    deff = float(fit.bse[0]) ** 2 / (est.rate * (1 - est.rate) / est.exposures)
    assert deff > 1.0 and est.design_effect == pytest.approx(deff, rel=1e-9)
    assert est.effective_n == pytest.approx(est.exposures / deff, rel=1e-9)
    low, high = korn_graubard_reference(float(fit.params[0]), float(fit.bse[0]), float(exposures.sum()))
    assert (est.ci_low, est.ci_high) == (pytest.approx(low, rel=1e-9), pytest.approx(high, rel=1e-9))
    # Wider than the Wald interval statsmodels gives on the same se, never narrower.
    wald_low, wald_high = fit.conf_int(alpha=0.05)[0]
    assert est.ci_high - est.ci_low >= (wald_high - wald_low) * 0.999
    uncorrected = sm.OLS(y, np.ones((len(y), 1))).fit(
        cov_type="cluster", cov_kwds={"groups": groups, "use_correction": False}
    )
    assert ratio_estimate(likes, exposures, ddof=0).se == pytest.approx(float(uncorrected.bse[0]), rel=1e-9)


def test_a_heavy_user_counts_once_not_once_per_image() -> None:
    """The same 40 likes: from 40 users the interval is narrow; from one user who liked everything and 39
    who liked nothing it is much wider, because the unit is the user."""
    spread = ratio_estimate([1.0] * 40 + [0.0] * 60, [1.0] * 100)
    concentrated = ratio_estimate([40.0] + [0.0] * 60, [40.0] + [1.0] * 60)
    assert spread.rate == concentrated.rate == 0.4
    assert concentrated.se > 2.5 * spread.se
    # Independent Bernoulli users: the delta method reduces to sqrt(p(1-p)/(n-1)) (sample variance).
    assert spread.se == pytest.approx(math.sqrt(0.4 * 0.6 / 99), rel=1e-12)


def test_the_difference_equals_the_arm_coefficient_of_cluster_robust_ols() -> None:
    import statsmodels.api as sm

    rng = np.random.default_rng(2)
    control, treatment = users_of(rng, 150, 0.30), users_of(rng, 120, 0.36)
    a = ratio_estimate(*control, ddof=0)
    b = ratio_estimate(*treatment, ddof=0)
    diff = difference(a, b)
    ya, ga = exposure_rows(*control)
    yb, gb = exposure_rows(*treatment)
    y = np.concatenate([ya, yb])
    arm = np.concatenate([np.zeros_like(ya), np.ones_like(yb)])
    groups = np.concatenate([ga, gb + 10_000])
    fit = sm.OLS(y, sm.add_constant(arm)).fit(
        cov_type="cluster", cov_kwds={"groups": groups, "use_correction": False}
    )
    assert diff.estimate == pytest.approx(float(fit.params[1]), rel=1e-10)
    assert diff.se == pytest.approx(float(fit.bse[1]), rel=1e-9)
    assert diff.p_value == pytest.approx(float(fit.pvalues[1]), rel=1e-6)
    # The fixed-horizon interval is MOVER from the arms' Korn–Graubard intervals (statsmodels' Clopper–Pearson
    # on each arm's effective size), inside [-1, 1] and around the estimate.
    arm_a = RatioEstimate(a.users, a.events, a.exposures, a.rate, a.se,
                          *korn_graubard_reference(a.rate, a.se, a.exposures))  # fmt: skip
    arm_b = RatioEstimate(b.users, b.events, b.exposures, b.rate, b.se,
                          *korn_graubard_reference(b.rate, b.se, b.exposures))  # fmt: skip
    low, high = mover_reference(arm_a, arm_b)
    assert (diff.ci_low, diff.ci_high) == (pytest.approx(low, rel=1e-9), pytest.approx(high, rel=1e-9))
    assert -1.0 <= diff.ci_low < diff.estimate < diff.ci_high <= 1.0


def test_the_difference_with_the_reports_small_sample_correction_equals_statsmodels_per_arm() -> None:
    """The report uses ``ddof=1``: each arm's variance with statsmodels' G/(G-1) correction of that arm's
    clusters (a pooled regression would correct with all clusters and the regressors instead). The
    difference's se and z-test p-value then equal those from statsmodels' per-arm cluster-robust fits."""
    import statsmodels.api as sm

    rng = np.random.default_rng(3)
    control, treatment = users_of(rng, 40, 0.30), users_of(rng, 25, 0.42)
    diff = difference(ratio_estimate(*control), ratio_estimate(*treatment))
    bse = []
    for likes, exposures in (control, treatment):
        y, groups = exposure_rows(likes, exposures)
        fit = sm.OLS(y, np.ones((len(y), 1))).fit(cov_type="cluster", cov_kwds={"groups": groups})
        assert not fit.use_t  # a normal reference distribution, as the report's p-value
        bse.append(float(fit.bse[0]))
    se = math.hypot(*bse)
    assert diff.se == pytest.approx(se, rel=1e-9)
    assert diff.p_value == pytest.approx(math.erfc(abs(diff.estimate) / se / math.sqrt(2)), rel=1e-9)


def test_the_difference_interval_is_given_where_the_p_value_is_not() -> None:
    # No event in either arm: se 0, no p-value, yet an interval around 0 of non-zero width.
    none = ratio_estimate([0.0] * 30, [2.0] * 30)
    diff = difference(none, ratio_estimate([0.0] * 25, [3.0] * 25))
    assert diff.se == 0.0 and math.isnan(diff.p_value)
    assert -1.0 <= diff.ci_low < 0.0 < diff.ci_high <= 1.0
    assert diff.ci_high == pytest.approx(1 - 0.025 ** (1 / 75), rel=1e-9)  # the treatment's upper bound
    # One user in an arm: no se, but the interval still comes from the arms' intervals.
    lone = difference(none, ratio_estimate([2.0], [3.0]))
    assert math.isnan(lone.se) and math.isnan(lone.p_value) and lone.ci_low < lone.estimate < lone.ci_high
    # An arm without users: nothing.
    empty = difference(none, ratio_estimate([], []))
    assert math.isnan(empty.ci_low) and math.isnan(empty.ci_high) and math.isnan(empty.p_value)
    # Extreme rates stay in range.
    extreme = difference(none, ratio_estimate([1.0] * 5, [1.0] * 5))
    assert extreme.estimate == 1.0 and 0.0 < extreme.ci_low < extreme.ci_high == 1.0


def test_the_sample_ratio_test_matches_the_closed_form() -> None:
    # 821 vs 179 users on an 80/20 split: chi2 = 21^2/800 + 21^2/200; with 1 degree of freedom
    # p = erfc(sqrt(chi2 / 2)).
    srm = sample_ratio({"dalle_ott": 821, "ott_3d": 179}, {"dalle_ott": 0.8, "ott_3d": 0.2})
    chi2 = 21**2 / 800 + 21**2 / 200
    assert srm.chi2 == pytest.approx(chi2, rel=1e-12)
    assert srm.p_value == pytest.approx(math.erfc(math.sqrt(chi2 / 2)), rel=1e-9)
    assert srm.expected == {"dalle_ott": 800.0, "ott_3d": 200.0} and not srm.alarm
    # Shares are normalised, and a real mismatch raises the alarm.
    broken = sample_ratio({"dalle_ott": 700, "ott_3d": 300}, {"dalle_ott": 7, "ott_3d": 1.75})
    assert broken.p_value < SRM_ALARM_P and broken.alarm
    assert broken.p_value == pytest.approx(math.erfc(math.sqrt((100**2 / 800 + 100**2 / 200) / 2)), rel=1e-9)


def test_degenerate_inputs_are_explicit() -> None:
    lone = ratio_estimate([1.0], [3.0])  # one user: no variance estimate, the interval of its exposures
    assert math.isnan(lone.se) and lone.design_effect == 1.0
    assert (lone.ci_low, lone.ci_high) == tuple(pytest.approx(v, rel=1e-9) for v in clopper_pearson(1 / 3, 3))
    nobody = ratio_estimate([], [])
    assert (
        nobody.users == 0
        and math.isnan(nobody.rate)
        and math.isnan(nobody.ci_low)
        and math.isnan(nobody.ci_high)
    )
    with pytest.raises(ValueError, match="at least one exposure"):
        ratio_estimate([0.0], [0.0])
    with pytest.raises(ValueError, match="not in the split"):
        sample_ratio({"x": 3}, {"a": 0.5, "b": 0.5})
    assert sample_ratio({}, {"a": 0.5, "b": 0.5}).p_value == 1.0
