"""How an experiment shares its NEW users among its arms: a fixed split, or Thompson sampling.

Pure math, no storage and no clock: the caller hands over each arm's per-user totals (what the store
aggregates) and gets the weights for the next period. ``fixed`` keeps the configured split. ``thompson``
first runs a **burn-in** on the configured split until every arm has ``burn_in_users`` users, then gives
every arm its **floor** plus the rest of the traffic in proportion to the posterior probability that the
arm has the highest rate of the primary metric (*probability matching*, the allocation Thompson sampling
makes in expectation); :func:`allocate` with ``top_two=True`` gives the top-two variant (Russo 2016),
which spends ``1 - leader_share`` of the traffic on the leader's closest challenger instead and so
identifies the best arm faster when arms are close.

**The user is the unit.** A user sees many images and their likes are correlated (a user who likes one
image tends to like the next), so an arm's images are not independent draws: a single heavy user must
not count as many users. Each arm's posterior is ``Beta(1 + rate * n_eff, 1 + (1 - rate) * n_eff)``,
with ``rate`` the ratio metric over the arm's users and ``n_eff`` its *effective* number of exposures:
``exposures / design_effect``, from :func:`deskgen.experiments.stats.ratio_estimate`, where the design
effect (>= 1) is the variance over users against the variance were every image independent. The
posterior is therefore about as wide as the report's user-level interval, and an arm whose evidence is a
few heavy users stays uncertain. An arm with fewer than 2 users has no estimate of that correlation and
counts as at most one observation; an arm without users is ``Beta(1, 1)``.

**Why floors.** Probability matching drives a losing arm's share towards 0. A floor (1 % by default)
keeps every arm measured: the report's intervals keep shrinking, an arm whose first users were unlucky
can recover, and a change of rates over time (a novelty effect wearing off, a new audience) still shows
in every arm. ``floor_a + (1 - sum(floors)) * p_best_a`` sums to 1 and never goes below the floor.

The weights are for new users only; a user keeps the arm first assigned (the caller's job). Because the
weights change over time, a pooled comparison of arms mixes periods; under a strong time trend compare
arms within a period. :func:`p_best` is a seeded Monte-Carlo estimate: the same evidence and seed give
the same figures on every replica, whatever the order of the arms.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from deskgen.experiments.stats import ratio_estimate

#: How an experiment allocates new users.
AllocationPolicy = Literal["fixed", "thompson"]
ALLOCATION_POLICIES: tuple[str, ...] = ("fixed", "thompson")
#: ``fixed``: the configured split; ``burn_in``: thompson on the split until every arm has enough users;
#: ``thompson``: floors plus probability matching.
Phase = Literal["fixed", "burn_in", "thompson"]

#: An arm's minimum share of new users under thompson unless its experiment sets another.
DEFAULT_FLOOR = 0.01
#: Monte-Carlo draws of :func:`p_best`: its standard error is at most 0.5 / sqrt(draws) = 0.0035.
DEFAULT_DRAWS = 20_000
#: Top-two Thompson: the share of the (non-floor) traffic that follows the leader.
DEFAULT_LEADER_SHARE = 0.5


@dataclass(frozen=True)
class ArmEvidence:
    """An arm's users so far: ``events[i]`` and ``exposures[i]`` are user i's totals of the primary metric
    (e.g. likes) and of delivered images (each >= 1)."""

    events: Sequence[float] = ()
    exposures: Sequence[float] = ()


@dataclass(frozen=True)
class Posterior:
    """An arm's Beta posterior of its rate and what it was computed from."""

    alpha: float
    beta: float
    users: int
    #: The exposures the arm's users are worth as independent draws (0 without users).
    effective_n: float

    @property
    def mean(self) -> float:
        return self.alpha / (self.alpha + self.beta)

    @property
    def sd(self) -> float:
        a, b = self.alpha, self.beta
        return math.sqrt(a * b / ((a + b) ** 2 * (a + b + 1.0)))


@dataclass(frozen=True)
class Allocation:
    """The shares of new users per arm for the next period, and why."""

    #: arm -> share of NEW users; sums to 1; under thompson every arm is at or above its floor.
    weights: dict[str, float]
    #: arm -> posterior probability that the arm has the highest rate (sums to 1).
    p_best: dict[str, float]
    phase: Phase
    #: Users per arm the weights were computed from.
    users: dict[str, int]


def posterior(evidence: ArmEvidence, *, arm: str = "") -> Posterior:
    """``Beta(1 + rate * n_eff, 1 + (1 - rate) * n_eff)`` with the user-level ``n_eff`` (module docstring).

    ValueError (naming ``evidence``) if the arm has more events than exposures or malformed totals."""
    where = f"evidence[{arm!r}]" if arm else "evidence"
    try:
        est = ratio_estimate(evidence.events, evidence.exposures)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from e
    if est.users == 0:
        return Posterior(1.0, 1.0, 0, 0.0)
    if not 0.0 <= est.rate <= 1.0:
        raise ValueError(f"{where}: the rate must be in [0, 1] (events <= exposures) but is {est.rate}")
    n_eff = est.effective_n if est.users >= 2 else min(est.effective_n, 1.0)
    return Posterior(1.0 + est.rate * n_eff, 1.0 + (1.0 - est.rate) * n_eff, est.users, n_eff)


def _draw(posteriors: Mapping[str, Posterior], *, seed: int, draws: int, runner_up: bool
          ) -> tuple[dict[str, float], dict[str, dict[str, float]]]:  # fmt: skip
    """P(best) per arm from ``draws`` joint draws of the posteriors; with ``runner_up``, also, per arm,
    how often each other arm came second in the draws that arm led (arm -> arm -> share)."""
    if isinstance(draws, bool) or not isinstance(draws, int) or draws < 1:
        raise ValueError(f"draws must be a positive integer but is {draws!r}")
    order = sorted(posteriors)  # the same draws whatever the order of the caller's mapping
    if not order:
        return {}, {}
    alpha = np.array([posteriors[a].alpha for a in order])
    beta = np.array([posteriors[a].beta for a in order])
    samples = np.random.default_rng(seed).beta(alpha, beta, size=(draws, len(order)))
    leader = samples.argmax(axis=1)
    counts = np.bincount(leader, minlength=len(order))
    share = {a: float(c) / draws for a, c in zip(order, counts, strict=True)}
    second: dict[str, dict[str, float]] = {}
    if runner_up and len(order) > 1:
        seconds = np.argsort(samples, axis=1)[:, -2]
        pairs = np.zeros((len(order), len(order)))
        np.add.at(pairs, (leader, seconds), 1.0)
        for i, a in enumerate(order):
            total = pairs[i].sum()
            second[a] = {b: float(pairs[i, j] / total) if total else 0.0 for j, b in enumerate(order)}
    return {a: share[a] for a in posteriors}, second


def p_best(evidence: Mapping[str, ArmEvidence], *, seed: int, draws: int = DEFAULT_DRAWS) -> dict[str, float]:
    """Posterior probability that each arm has the highest rate: the share of ``draws`` joint draws of the
    arms' Beta posteriors (:func:`posterior`) in which it is highest. Deterministic for a ``seed`` (a
    non-negative int) and independent of the mapping's order; sums to 1."""
    posteriors = {arm: posterior(ev, arm=arm) for arm, ev in evidence.items()}
    return _draw(posteriors, seed=seed, draws=draws, runner_up=False)[0]


def top_two_shares(p: Mapping[str, float], runner_up: Mapping[str, Mapping[str, float]], *,
                   leader_share: float = DEFAULT_LEADER_SHARE) -> dict[str, float]:  # fmt: skip
    """The expected traffic of top-two Thompson sampling: with probability ``leader_share`` the arm of a
    posterior draw, else the challenger, the leader of fresh draws until one is not the first leader:
    ``leader_share * p_a + (1 - leader_share) * sum_{i != a} p_i * p_a / (1 - p_i)``. Where a leader won
    every draw (``p_i == 1``; resampling would never end) its challengers are the arms that came second
    in its draws (``runner_up[i]``)."""
    arms = list(p)
    out = {a: leader_share * p[a] for a in arms}
    if len(arms) < 2:
        return {a: p[a] for a in arms}
    for i in arms:
        if p[i] <= 0.0:
            continue
        rest = 1.0 - p[i]
        if rest > 1e-12:
            challenger = {a: (p[a] / rest if a != i else 0.0) for a in arms}
        else:
            challenger = {a: (runner_up.get(i, {}).get(a, 0.0) if a != i else 0.0) for a in arms}
        total = sum(challenger.values())
        if total <= 0.0:  # no draw to tell challengers apart: share alike
            challenger = {a: (1.0 if a != i else 0.0) for a in arms}
            total = len(arms) - 1.0
        for a in arms:
            out[a] += (1.0 - leader_share) * p[i] * challenger[a] / total
    norm = sum(out.values())
    return {a: v / norm for a, v in out.items()}


def _share(value: object, name: str, *, high: float) -> float:
    """``value`` as a float in [0, ``high``], else ValueError naming it."""
    try:
        share = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        share = math.nan
    if isinstance(value, bool) or not (math.isfinite(share) and 0.0 <= share <= high):
        bound = f"[0, {high:g}]" if math.isfinite(high) else ">= 0 and finite"
        raise ValueError(f"{name} must be a share {bound} but is {value!r}")
    return share


def _normalised_split(split: Mapping[str, float]) -> dict[str, float]:
    if not split:
        raise ValueError("split must name at least one arm")
    out = {arm: _share(share, f"split[{arm!r}]", high=math.inf) for arm, share in split.items()}
    total = sum(out.values())
    if total <= 0.0:
        raise ValueError(f"split must have a positive share but is {dict(split)}")
    return {arm: share / total for arm, share in out.items()}


def _floors(floors: Mapping[str, float], split: Mapping[str, float]) -> dict[str, float]:
    unknown = sorted(set(floors) - set(split))
    if unknown:
        raise ValueError(f"floors names arms {unknown} that are not in the split {sorted(split)}")
    out = {}
    for arm in split:
        out[arm] = _share(floors.get(arm, DEFAULT_FLOOR), f"floors[{arm!r}]", high=1.0)
    if sum(out.values()) > 1.0 + 1e-9:
        raise ValueError(f"floors sum to {sum(out.values()):.4f} (arms without one get {DEFAULT_FLOOR}); "
                         "they must leave a share for the bandit (sum <= 1)")  # fmt: skip
    return out


def allocate(policy: AllocationPolicy, evidence: Mapping[str, ArmEvidence], split: Mapping[str, float], *,
             burn_in_users: int, floors: Mapping[str, float], seed: int, draws: int = DEFAULT_DRAWS,
             top_two: bool = False, leader_share: float = DEFAULT_LEADER_SHARE) -> Allocation:  # fmt: skip
    """The shares of new users per arm for the next period.

    The arms are those of ``split`` (shares, normalised here); ``evidence`` may lack an arm (no users yet)
    but may not name another. ``floors`` gives arms their minimum share under thompson (an arm it does not
    name gets :data:`DEFAULT_FLOOR`). ``fixed``: the split, phase ``fixed``. ``thompson``: the split while
    an arm with a positive share has fewer than ``burn_in_users`` users (phase ``burn_in``; an arm the
    split gives no share gets no users then, so it does not hold the burn-in up), afterwards
    ``floor_a + (1 - sum(floors)) * q_a`` with ``q`` = :func:`p_best` (probability matching), or the
    top-two shares (:func:`top_two_shares`) with ``top_two``. ``p_best`` is computed in every phase, for
    the report. ``seed`` makes the draws reproducible (same inputs and seed, same weights on every replica).

    ValueError naming the argument: an unknown policy, an empty or negative split, floors for unknown
    arms, negative or summing past 1, evidence of arms outside the split, a negative burn-in.
    """
    if policy not in ALLOCATION_POLICIES:
        raise ValueError(f"policy must be one of {list(ALLOCATION_POLICIES)} but is {policy!r}")
    shares = _normalised_split(split)
    floor = _floors(floors, split)
    if isinstance(burn_in_users, bool) or not isinstance(burn_in_users, int) or burn_in_users < 0:
        raise ValueError(f"burn_in_users must be an integer >= 0 but is {burn_in_users!r}")
    if not 0.0 < leader_share <= 1.0:
        raise ValueError(f"leader_share must be in (0, 1] but is {leader_share!r}")
    unknown = sorted(set(evidence) - set(split))
    if unknown:
        raise ValueError(f"evidence names arms {unknown} that are not in the split {sorted(split)}")
    posteriors = {arm: posterior(evidence.get(arm, ArmEvidence()), arm=arm) for arm in split}
    users = {arm: post.users for arm, post in posteriors.items()}
    best, runner_up = _draw(posteriors, seed=seed, draws=draws, runner_up=top_two and policy == "thompson")
    if policy == "fixed":
        return Allocation(shares, best, "fixed", users)
    if any(users[arm] < burn_in_users for arm in split if shares[arm] > 0.0):
        return Allocation(shares, best, "burn_in", users)
    target = top_two_shares(best, runner_up, leader_share=leader_share) if top_two else best
    spare = 1.0 - sum(floor.values())
    return Allocation({arm: floor[arm] + spare * target[arm] for arm in split}, best, "thompson", users)
