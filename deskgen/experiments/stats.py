"""The statistics of an A/B report, with the **user** as the unit of analysis.

A user sees many images and may rate many of them; counting images as independent observations would
make a heavy user look like many users and the confidence intervals far too narrow. So every rate is a
ratio metric over users: ``rate = sum(events of the arm's users) / sum(their exposures)``, its variance by
the delta method over per-user totals (what cluster-robust standard errors by user give for the same
estimate; GrowthBook, Statsig and Eppo report ratio metrics this way). Arms are independent (a user is in
one arm), so the variance of a difference is the sum of the arms' variances.

An event (like, dislike, download, select) happens at most once per image, so a rate is a proportion and
its intervals are built to stay in [0, 1] and to keep a non-zero width at zero events:

* **A rate**: the Korn–Graubard interval (Korn & Graubard 1998; the NCHS standard for proportions from
  clustered survey data): the exact Clopper–Pearson interval on the *effective* sample size
  ``n* = exposures / design_effect`` with ``x* = rate * n*`` events, in its beta-distribution form so that
  non-integer ``n*`` and ``x*`` work. The clustering stays (a design effect above 1 shrinks ``n*``), the
  bounds are quantiles of a beta distribution on [0, 1], and at zero events the upper bound is
  ``1 - (alpha/2)^(1/n*)`` instead of the zero-width ``0 ± 0`` of a Wald interval. At small n (20 users and
  a rate of 0.05 are typical early in an experiment) the Wald interval badly undercovers and even Wilson's
  undercovers near 0; Clopper–Pearson is conservative there, which is the side a report should err on.
* **A difference, fixed horizon** (valid only when read once, at a horizon fixed in advance): the
  estimate, its delta-method standard error and a two-sided Wald p-value, with the MOVER interval
  (Newcombe's hybrid score method as generalised by Zou & Donner 2008) recovered from the two arms'
  Korn–Graubard intervals, hence inside [-1, 1] and not degenerate at zero events.
* **A difference, always valid** (:func:`sequential_difference`): the normal-mixture confidence sequence
  (Robbins; Howard et al. 2021, as GrowthBook and Eppo use) with its mixture-SPRT p-value (Johari et al.,
  as Optimizely and Statsig use): the report may be read after every user and stopped on any look without
  inflating the false-positive rate, which re-reading the fixed-horizon p-value does.

Distributions come from scipy's special functions; the unit tests check every figure against statsmodels
(cluster-robust OLS, ``proportion_confint``) and closed forms, and the sequential guarantees by seeded
simulation (tests/unit/test_experiment_sequential.py).
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
    #: The Korn–Graubard interval: Clopper–Pearson on ``effective_n`` (see the module docstring).
    ci_low: float
    ci_high: float
    #: ``se**2`` over the variance the same rate would have if every exposure were an independent draw
    #: (``rate (1 - rate) / exposures``), floored at 1: what clustering by user costs. 1 when undefined
    #: (no variation, fewer than 2 users).
    design_effect: float = 1.0
    #: ``exposures / design_effect``: as many independent exposures as the users' data is worth.
    effective_n: float = 0.0


@dataclass(frozen=True)
class Difference:
    """``treatment.rate - control.rate`` at a fixed horizon: its delta-method standard error, two-sided
    Wald p-value and MOVER confidence interval. Valid when read once; see :class:`SequentialDifference`."""

    estimate: float
    se: float
    ci_low: float
    ci_high: float
    p_value: float


@dataclass(frozen=True)
class SequentialDifference:
    """``treatment.rate - control.rate`` with an always-valid confidence sequence and p-value: correct at
    whatever look the report is read or the experiment stopped."""

    estimate: float
    ci_low: float
    ci_high: float
    #: ``min(1, 1 / mixture likelihood ratio)``; below alpha exactly when 0 is outside the sequence.
    p_value: float
    #: The mixing standard deviation (the effect size the sequence is tuned to detect).
    tau: float
    #: The variance of ``estimate`` used (each arm's floored at a binomial variance, see the function).
    variance: float


@dataclass(frozen=True)
class SampleRatio:
    """Users per arm against the configured split: a chi-square goodness-of-fit test."""

    observed: dict[str, int]
    expected: dict[str, float]
    chi2: float
    p_value: float
    alarm: bool


def _z(confidence: float) -> float:
    from scipy.special import ndtri

    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1) but is {confidence}")
    return float(ndtri(0.5 + confidence / 2.0))


def ratio_estimate(
    events: Sequence[float] | np.ndarray,
    exposures: Sequence[float] | np.ndarray,
    *,
    confidence: float = 0.95,
    ddof: int = 1,
) -> RatioEstimate:
    """The rate ``sum(events) / sum(exposures)`` over users (``events[i]``, ``exposures[i]``: user i's
    totals; every user has at least one exposure) with its Korn–Graubard confidence interval.

    Delta method: ``var(R) = sum((y_i - R x_i)^2) / ((n - ddof) * n * mean(x)^2)``. ``ddof=1`` (the
    default) equals statsmodels' cluster-robust variance with its small-sample correction G/(G-1);
    ``ddof=0`` equals it without. The interval is Clopper–Pearson on ``effective_n = exposures /
    design_effect`` (inside [0, 1], non-zero width at 0 events, conservative at small n); with one user
    there is no variance estimate, the design effect is taken as 1 and the interval is that of the
    user's exposures. No user: every figure ``nan``.
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
        return RatioEstimate(0, 0.0, 0.0, nan, nan, nan, nan, 1.0, 0.0)
    total_y, total_x = float(y.sum()), float(x.sum())
    rate = total_y / total_x
    if n - ddof <= 0:
        se = float("nan")
    else:
        residual = y - rate * x
        se = math.sqrt(float(residual @ residual) / ((n - ddof) * n * float(x.mean()) ** 2))
    deff = design_effect(rate, se, total_x)
    n_eff = total_x / deff
    low, high = korn_graubard(rate, n_eff, confidence=confidence)
    return RatioEstimate(n, total_y, total_x, rate, se, low, high, deff, n_eff)


def design_effect(rate: float, se: float, exposures: float) -> float:
    """``se**2 / (rate (1 - rate) / exposures)`` floored at 1 (never credit clustering with more
    information than independent exposures carry); 1 where it is undefined (a rate of 0 or 1, no se)."""
    iid = rate * (1.0 - rate) / exposures if exposures > 0 else float("nan")
    if not (math.isfinite(se) and math.isfinite(iid)) or iid <= 0.0:
        return 1.0
    return max(1.0, se**2 / iid)


def korn_graubard(rate: float, effective_n: float, *, confidence: float = 0.95) -> tuple[float, float]:
    """Clopper–Pearson's exact interval for ``x* = rate * n*`` events in ``n* = effective_n`` trials, in
    the beta form that takes non-integer counts: ``Beta(alpha/2; x*, n* - x* + 1)`` to
    ``Beta(1 - alpha/2; x* + 1, n* - x*)``, with 0 (1) for the bound at 0 (all) events."""
    from scipy.special import betaincinv

    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1) but is {confidence}")
    if not (math.isfinite(rate) and math.isfinite(effective_n)) or effective_n <= 0.0:
        return float("nan"), float("nan")
    tail = (1.0 - confidence) / 2.0
    rate = min(1.0, max(0.0, rate))
    x = rate * effective_n
    low = 0.0 if x <= 0.0 else float(betaincinv(x, effective_n - x + 1.0, tail))
    high = 1.0 if x >= effective_n else float(betaincinv(x + 1.0, effective_n - x, 1.0 - tail))
    return low, high


def difference(control: RatioEstimate, treatment: RatioEstimate, *, confidence: float = 0.95) -> Difference:
    """``treatment - control`` of two independent arms at a fixed horizon.

    ``se = sqrt(se_c^2 + se_t^2)`` and a two-sided Wald p-value (``nan`` when the se is 0 or undefined).
    The interval is MOVER (Newcombe's hybrid, Zou & Donner): with ``(l, u)`` each arm's Korn–Graubard
    interval at ``confidence`` and ``d`` the estimate,
    ``d - sqrt((p_t - l_t)^2 + (u_c - p_c)^2)`` to ``d + sqrt((u_t - p_t)^2 + (p_c - l_c)^2)``: it inherits
    the arms' range-respecting, never-degenerate bounds (inside [-1, 1], wide at zero events), and is given
    whenever both arms have a user. Neither the p-value nor the interval stays valid when the report is
    read repeatedly; :func:`sequential_difference` does.
    """
    from scipy.special import ndtr

    _z(confidence)  # validates
    nan = float("nan")
    estimate = treatment.rate - control.rate
    se = math.sqrt(control.se**2 + treatment.se**2)
    p = float(2.0 * ndtr(-abs(estimate) / se)) if math.isfinite(se) and se > 0.0 else nan
    if control.users == 0 or treatment.users == 0:
        return Difference(estimate, se, nan, nan, p)
    lc, uc = korn_graubard(control.rate, control.effective_n, confidence=confidence)
    lt, ut = korn_graubard(treatment.rate, treatment.effective_n, confidence=confidence)
    low = estimate - math.hypot(treatment.rate - lt, uc - control.rate)
    high = estimate + math.hypot(ut - treatment.rate, control.rate - lc)
    return Difference(estimate, se, max(-1.0, low), min(1.0, high), p)


def floored_variance(arm: RatioEstimate) -> float:
    """The arm's delta-method variance (``se**2``), floored at the binomial variance of the shrunk rate
    ``(events + 0.5) / (exposures + 1)`` over its exposures: an arm with no event (se 0) or one user (se
    nan) still has the variance a binomial sample of its size would have."""
    shrunk = (arm.events + 0.5) / (arm.exposures + 1.0)
    floor = shrunk * (1.0 - shrunk) / arm.exposures
    se2 = arm.se**2
    return max(floor, se2) if math.isfinite(se2) else floor


def mixture_half_width(variance: float, tau: float, alpha: float) -> float:
    """Half-width of the two-sided normal-mixture confidence sequence for an estimate of ``variance``:
    ``sqrt(V (V + tau^2) / tau^2 * log((V + tau^2) / (V alpha^2)))`` (increasing in ``V``)."""
    v, t2 = variance, tau * tau
    return math.sqrt(v * (v + t2) / t2 * math.log((v + t2) / (v * alpha * alpha)))


def sequential_difference(
    control: RatioEstimate, treatment: RatioEstimate, *, alpha: float = 0.05, tau: float
) -> SequentialDifference:
    """``treatment - control`` with the normal-mixture confidence sequence and its always-valid p-value.

    With ``d`` the estimate and ``V`` its variance (``se_c^2 + se_t^2``, each arm's floored at the binomial
    variance of a shrunk rate ``(events + 0.5) / (exposures + 1)`` so that an arm without events is not
    degenerate), the mixture likelihood ratio of "the difference is theta, theta ~ N(0, tau^2)" against
    "it is 0" is ``Lambda = sqrt(V / (V + tau^2)) * exp(tau^2 d^2 / (2 V (V + tau^2)))``; the p-value is
    ``min(1, 1 / Lambda)`` and the sequence ``d ± sqrt(V (V + tau^2) / tau^2 * log((V + tau^2) /
    (V alpha^2)))`` (clipped to [-1, 1]) holds every difference whose Lambda stays below ``1 / alpha``.

    Why it holds at every look: under the null, Lambda computed on the accumulating data is (with the
    estimate's normal approximation, Robbins' mixture argument) a non-negative martingale with mean 1, and
    Ville's inequality bounds the chance that it *ever* exceeds ``1 / alpha`` by ``alpha``. So the
    false-positive rate of "stop as soon as p < alpha" is at most alpha however often the report is read,
    and the sequence covers the true difference at all looks simultaneously with probability
    ``1 - alpha`` (asymptotically: the variance is estimated; the simulation in the unit tests checks it
    at small n). The price is a wider interval than the fixed-horizon one at any single look.

    ``tau`` is the mixing standard deviation: the size of effect the sequence is most powerful for. The
    interval is narrowest when ``V`` has shrunk to about ``tau^2``-scale; a tau far from the real effect
    costs width, never validity. The report sets it to the experiment's minimum detectable effect.
    An arm without users: every figure ``nan``.
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1) but is {alpha}")
    if not (math.isfinite(tau) and tau > 0.0):
        raise ValueError(f"tau must be a positive number but is {tau}")
    nan = float("nan")
    if control.users == 0 or treatment.users == 0:
        return SequentialDifference(nan, nan, nan, nan, tau, nan)
    estimate = treatment.rate - control.rate
    v = floored_variance(control) + floored_variance(treatment)
    t2 = tau * tau
    log_lambda = 0.5 * math.log(v / (v + t2)) + t2 * estimate * estimate / (2.0 * v * (v + t2))
    p = 1.0 if log_lambda <= 0.0 else math.exp(-log_lambda)
    half = mixture_half_width(v, tau, alpha)
    return SequentialDifference(estimate, max(-1.0, estimate - half), min(1.0, estimate + half), p, tau, v)


def sample_ratio(users: Mapping[str, int], split: Mapping[str, float]) -> SampleRatio:
    """Chi-square test of the users per arm against ``split`` (shares, normalised here). Arms of the split
    that got no user count as 0; a user in an arm outside the split is an error of the caller. Under a
    bandit, ``split`` is each arm's expected users (the sum of the weights each user was drawn with): they
    sum to the users, so the normalisation keeps them."""
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
