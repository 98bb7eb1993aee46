"""An experiment's decision on its primary metric: a winner, no difference larger than the minimum
detectable effect (MDE), or keep running with an estimate of the users still needed.

Every treatment is compared with the control by the always-valid confidence sequence of
:func:`deskgen.experiments.stats.sequential_difference` at ``alpha / (k - 1)`` (Bonferroni over the
``k - 1`` comparisons of ``k`` arms), so the decision may be read after every user and acted on at the
first look that reaches one, with a family-wise false-positive rate of at most ``alpha``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from deskgen.experiments.stats import (
    RatioEstimate,
    floored_variance,
    mixture_half_width,
    sequential_difference,
)

Verdict = Literal["winner", "no_difference", "keep_running"]


@dataclass(frozen=True)
class Comparison:
    """One treatment arm against the control on the primary metric: ``treatment - control`` with its
    always-valid interval and p-value (at the Bonferroni-corrected level)."""

    arm: str
    estimate: float
    ci_low: float
    ci_high: float
    p_value: float


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    metric: str
    alpha: float
    mde: float
    #: The arm to ship (may be the control) when ``verdict == "winner"``.
    winner: str | None
    #: The winner's rate minus the runner-up it beat (for a treatment: minus the control).
    effect: float | None
    #: The always-valid interval of ``effect``.
    ci_low: float | None
    ci_high: float | None
    #: ``keep_running``: estimated further users (all arms together) until a decision.
    users_needed: int | None
    comparisons: list[Comparison]
    #: One plain-English sentence a product manager can read.
    reason: str


def _pp(value: float) -> str:
    """A difference of rates in percentage points."""
    return f"{value * 100:+.1f} pp"


def decide(
    rates: Mapping[str, RatioEstimate],
    *,
    control: str,
    metric: str = "like",
    alpha: float = 0.05,
    mde: float,
    tau: float | None = None,
) -> Decision:
    """The decision on ``metric`` from each arm's rate (``rates``: arm -> its :class:`RatioEstimate`,
    the control included); ``mde`` is an absolute difference of rates (0.02: two percentage points).

    Rules, in order, on the always-valid intervals of ``treatment - control``:

    1. a treatment whose interval lies above 0 beats the control: the winner is the best such by rate;
    2. every treatment's interval lies below 0: the control wins, over the best treatment (the runner-up);
    3. every interval lies inside ``(-mde, +mde)`` (arms whose interval lies below 0 excepted: they lost):
       no difference larger than the MDE;
    4. otherwise keep running, with an estimate of the users needed (see :func:`users_needed`).

    ``tau`` (the mixing sd of the confidence sequences) defaults to ``mde``.
    """
    if not (isinstance(alpha, float | int) and 0.0 < alpha < 0.5):
        raise ValueError(f"alpha must be in (0, 0.5) but is {alpha!r}")
    if not (isinstance(mde, float | int) and math.isfinite(mde) and mde > 0.0):
        raise ValueError(f"mde must be a positive number but is {mde!r}")
    if control not in rates:
        raise ValueError(f"control {control!r} is not one of the arms {sorted(rates)}")
    treatments = [arm for arm in rates if arm != control]
    if not treatments:
        raise ValueError(f"rates must hold a treatment arm besides the control {control!r}")
    tau = float(mde) if tau is None else tau
    if not (math.isfinite(tau) and tau > 0.0):
        raise ValueError(f"tau must be a positive number but is {tau!r}")
    level = alpha / len(treatments)
    sequences = {
        arm: sequential_difference(rates[control], rates[arm], alpha=level, tau=tau) for arm in treatments
    }
    comparisons = [
        Comparison(arm, s.estimate, s.ci_low, s.ci_high, s.p_value) for arm, s in sequences.items()
    ]
    overall = f"{1 - alpha:.0%}"

    def decision(verdict: Verdict, reason: str, winner: str | None = None, effect: float | None = None,
                 interval: tuple[float, float] | None = None, needed: int | None = None) -> Decision:  # fmt: skip
        low, high = interval if interval is not None else (None, None)
        return Decision(verdict, metric, alpha, mde, winner, effect, low, high, needed, comparisons, reason)

    above = [arm for arm, s in sequences.items() if s.ci_low > 0.0]
    below = [arm for arm, s in sequences.items() if s.ci_high < 0.0]
    inside = [arm for arm, s in sequences.items() if -mde < s.ci_low and s.ci_high < mde]
    if above:
        best = max(above, key=lambda arm: rates[arm].rate)
        s = sequences[best]
        return decision(
            "winner",
            f"{best} beats {control} on {metric} rate by {_pp(s.estimate)} (always-valid {overall} interval "
            f"{_pp(s.ci_low)} to {_pp(s.ci_high)}): ship {best}.",
            best, s.estimate, (s.ci_low, s.ci_high),
        )  # fmt: skip
    if len(below) == len(treatments):
        runner_up = max(treatments, key=lambda arm: rates[arm].rate)
        s = sequences[runner_up]
        return decision(
            "winner",
            f"{control} (the control) beats every other arm on {metric} rate, the closest, {runner_up}, by "
            f"{_pp(-s.estimate)} (always-valid {overall} interval {_pp(-s.ci_high)} to {_pp(-s.ci_low)}): "
            f"keep {control}.",
            control, -s.estimate, (-s.ci_high, -s.ci_low),
        )  # fmt: skip
    lost = [arm for arm in below if arm not in inside]
    if inside and len(inside) + len(lost) == len(treatments):
        # Every arm is within the MDE of the control or has lost to it: more users could only resolve a
        # difference smaller than the experiment cares about.
        head = f"{', '.join(lost)} did worse than {control}; no other arm" if lost else "No arm"
        return decision(
            "no_difference",
            f"{head} differs from {control} on {metric} rate by more than the minimum detectable effect of "
            f"{mde * 100:.1f} pp (always-valid {overall} intervals): keeping {control} loses nothing the "
            f"experiment can detect.",
        )  # fmt: skip
    undecided = [arm for arm in treatments if arm not in above and arm not in below and arm not in inside]
    needed = users_needed(rates, control=control, comparisons=undecided, alpha=level, tau=tau, mde=mde)
    return decision(
        "keep_running",
        f"Not enough data yet to tell the arms apart on {metric} rate to within {mde * 100:.1f} pp: keep "
        f"running for about {needed} more users.",
        needed=needed,
    )  # fmt: skip


def users_needed(
    rates: Mapping[str, RatioEstimate],
    *,
    control: str,
    comparisons: list[str],
    alpha: float,
    tau: float,
    mde: float,
) -> int:
    """Further users, all arms together, until every one of ``comparisons`` (treatment arms against
    ``control``) has a confidence sequence (at ``alpha`` each) of half-width under ``mde / 2``.

    Why that target: an interval narrower than ``mde`` either excludes 0 or, holding 0, lies inside
    ``(-mde, +mde)``, so each such comparison is decided whichever way the data goes.

    Every arm's users are scaled by a common factor keeping the current proportions (an arm without users
    counts as one), and an arm's variance scales as 1 / users (``variance * users`` stays); the smallest
    total is found by bisection (the half-width grows with the variance). An arm with fewer than 2 users
    has no variance estimate of its own: it gets the pooled binomial variance ``p (1 - p) / m`` per user,
    ``p`` the pooled rate of all arms (0.5 without events, or with nothing but events), ``m`` the mean
    exposures per user (1 without any). At least 1.
    """
    users = sum(r.users for r in rates.values())
    events = sum(r.events for r in rates.values() if r.users)
    exposures = sum(r.exposures for r in rates.values() if r.users)
    pooled = events / exposures if exposures > 0 else 0.0
    if not 0.0 < pooled < 1.0:
        pooled = 0.5
    pooled_unit = pooled * (1.0 - pooled) / (exposures / users if users > 0 else 1.0)
    weights = {arm: max(r.users, 1) for arm, r in rates.items()}
    total_weight = sum(weights.values())
    # Variance of the arm's rate times its users: what stays as users are added.
    unit = {
        arm: floored_variance(rates[arm]) * rates[arm].users if rates[arm].users >= 2 else pooled_unit
        for arm in {control, *comparisons}
    }

    def narrow_enough(total: float) -> bool:
        def variance(arm: str) -> float:
            return unit[arm] * total_weight / (total * weights[arm])

        return all(
            mixture_half_width(variance(control) + variance(arm), tau, alpha) < mde / 2.0
            for arm in comparisons
        )

    low = float(max(users, 1))
    if narrow_enough(low):
        return 1
    high = 2.0 * low
    while not narrow_enough(high):
        high *= 2.0
    while high - low > 0.5:
        middle = (low + high) / 2.0
        low, high = (low, middle) if narrow_enough(middle) else (middle, high)
    return max(1, math.ceil(high) - users)
