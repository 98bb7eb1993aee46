"""The statistics of an A/B report, with the **user** as the unit of analysis.

A user sees many images and may rate many of them; counting images as independent observations would
make a heavy user look like many users and the confidence intervals far too narrow. So every rate is a
ratio metric over users: ``rate = sum(events of the arm's users) / sum(their exposures)``, its variance by
the delta method over per-user totals (what cluster-robust standard errors by user give for the same
estimate; GrowthBook, Statsig and Eppo report ratio metrics this way). Arms are independent (a user is in
one arm), so the variance of a difference is the sum of the arms' variances.

Distributions come from scipy; the unit tests check every figure against statsmodels (cluster-robust
OLS) and closed forms computed without scipy.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

#: The sample-ratio-mismatch p-value below which a report raises the alarm (GrowthBook's and Statsig's).
SRM_ALARM_P = 0.001


@dataclass(frozen=True)
class RatioEstimate:
    """One arm's rate of an event per exposure, users as clusters."""

    users: int
    events: float
    exposures: float
    rate: float
    #: Standard error of ``rate`` (delta method over users); ``nan`` with fewer than 2 users.
    se: float
    ci_low: float
    ci_high: float


@dataclass(frozen=True)
class Difference:
    """``treatment.rate - control.rate`` with its confidence interval and two-sided p-value."""

    estimate: float
    se: float
    ci_low: float
    ci_high: float
    p_value: float


@dataclass(frozen=True)
class SampleRatio:
    """Users per arm against the configured split: a chi-square goodness-of-fit test."""

    observed: dict[str, int]
    expected: dict[str, float]
    chi2: float
    p_value: float
    alarm: bool


def _z(confidence: float) -> float:
    from scipy.stats import norm

    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1) but is {confidence}")
    return float(norm.ppf(0.5 + confidence / 2.0))


def ratio_estimate(
    events: Sequence[float], exposures: Sequence[float], *, confidence: float = 0.95, ddof: int = 1
) -> RatioEstimate:
    """The rate ``sum(events) / sum(exposures)`` over users (``events[i]``, ``exposures[i]``: user i's
    totals; every user has at least one exposure) with a normal confidence interval.

    Delta method: ``var(R) = sum((y_i - R x_i)^2) / ((n - ddof) * n * mean(x)^2)``. ``ddof=1`` (the
    default) equals statsmodels' cluster-robust variance with its small-sample correction G/(G-1);
    ``ddof=0`` equals it without.
    """
    y = np.asarray(events, dtype=np.float64)
    x = np.asarray(exposures, dtype=np.float64)
    if y.shape != x.shape or y.ndim != 1:
        raise ValueError("events and exposures must be two sequences of the same length, one entry per user")
    if (x <= 0).any():
        raise ValueError("every user in a ratio metric has at least one exposure")
    if (y < 0).any():
        raise ValueError("event counts cannot be negative")
    n = len(x)
    if n == 0:
        nan = float("nan")
        return RatioEstimate(0, 0.0, 0.0, nan, nan, nan, nan)
    rate = float(y.sum() / x.sum())
    if n - ddof <= 0:
        se = float("nan")
    else:
        residual = y - rate * x
        se = math.sqrt(float(residual @ residual) / ((n - ddof) * n * float(x.mean()) ** 2))
    z = _z(confidence)
    return RatioEstimate(n, float(y.sum()), float(x.sum()), rate, se, rate - z * se, rate + z * se)


def difference(control: RatioEstimate, treatment: RatioEstimate, *, confidence: float = 0.95) -> Difference:
    """``treatment - control`` of two independent arms: a normal (Wald) interval and a two-sided p-value."""
    from scipy.stats import norm

    estimate = treatment.rate - control.rate
    se = math.sqrt(control.se**2 + treatment.se**2)
    if not math.isfinite(se) or se == 0.0:
        return Difference(estimate, se, float("nan"), float("nan"), float("nan"))
    z = _z(confidence)
    p = float(2.0 * norm.sf(abs(estimate) / se))
    return Difference(estimate, se, estimate - z * se, estimate + z * se, p)


def sample_ratio(users: Mapping[str, int], split: Mapping[str, float]) -> SampleRatio:
    """Chi-square test of the users per arm against ``split`` (shares, normalised here). Arms of the split
    that got no user count as 0; a user in an arm outside the split is an error of the caller."""
    from scipy.stats import chisquare

    unknown = set(users) - set(split)
    if unknown:
        raise ValueError(f"arms {sorted(unknown)} are not in the split {sorted(split)}")
    arms = list(split)
    total_share = sum(split.values())
    observed = np.array([users.get(arm, 0) for arm in arms], dtype=np.float64)
    n = float(observed.sum())
    expected = np.array([n * split[arm] / total_share for arm in arms])
    if n == 0 or len(arms) < 2:
        return SampleRatio({a: int(o) for a, o in zip(arms, observed, strict=True)},
                           {a: float(e) for a, e in zip(arms, expected, strict=True)}, 0.0, 1.0, False)  # fmt: skip
    result = chisquare(observed, expected)
    p = float(result.pvalue)
    return SampleRatio(
        observed={a: int(o) for a, o in zip(arms, observed, strict=True)},
        expected={a: float(e) for a, e in zip(arms, expected, strict=True)},
        chi2=float(result.statistic),
        p_value=p,
        alarm=p < SRM_ALARM_P,
    )
