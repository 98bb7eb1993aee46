"""The report's statistics against independent values: statsmodels' cluster-robust OLS for the ratio
metric and the difference (the same estimands, computed by another library's code path), and closed
forms with the standard library (math.erfc) for the sample-ratio test."""

from __future__ import annotations

import math

import numpy as np
import pytest

from deskgen.experiments.stats import SRM_ALARM_P, difference, ratio_estimate, sample_ratio

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


def test_the_ratio_metric_equals_cluster_robust_ols_by_user() -> None:
    import statsmodels.api as sm

    likes, exposures = users_of(np.random.default_rng(1), 200, 0.3)
    est = ratio_estimate(likes, exposures)
    y, groups = exposure_rows(likes, exposures)
    fit = sm.OLS(y, np.ones((len(y), 1))).fit(cov_type="cluster", cov_kwds={"groups": groups})
    assert est.users == 200 and est.exposures == exposures.sum() and est.events == likes.sum()
    assert est.rate == pytest.approx(float(fit.params[0]), rel=1e-12)
    assert est.se == pytest.approx(float(fit.bse[0]), rel=1e-9)  # ddof=1 = statsmodels' G/(G-1) correction
    low, high = fit.conf_int(alpha=0.05)[0]
    assert (est.ci_low, est.ci_high) == (pytest.approx(low, rel=1e-9), pytest.approx(high, rel=1e-9))
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
    fit = sm.OLS(y, sm.add_constant(arm)).fit(cov_type="cluster", cov_kwds={"groups": groups, "use_correction": False})
    assert diff.estimate == pytest.approx(float(fit.params[1]), rel=1e-10)
    assert diff.se == pytest.approx(float(fit.bse[1]), rel=1e-9)
    assert diff.p_value == pytest.approx(float(fit.pvalues[1]), rel=1e-6)
    low, high = fit.conf_int(alpha=0.05)[1]
    assert (diff.ci_low, diff.ci_high) == (pytest.approx(low, rel=1e-9), pytest.approx(high, rel=1e-9))


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
    assert math.isnan(ratio_estimate([1.0], [3.0]).se)  # one user: no variance estimate
    assert ratio_estimate([], []).users == 0
    with pytest.raises(ValueError, match="at least one exposure"):
        ratio_estimate([0.0], [0.0])
    with pytest.raises(ValueError, match="not in the split"):
        sample_ratio({"x": 3}, {"a": 0.5, "b": 0.5})
    assert sample_ratio({}, {"a": 0.5, "b": 0.5}).p_value == 1.0
