"""An experiment's report: per arm, users, exposures, event rates with confidence intervals, the difference
of each arm against the control (the split's first arm) — always-valid (a confidence sequence: read it at
any time) and fixed-horizon (labelled so) — the decision on the primary metric, the change to
serve_config.yaml that acts on it, the allocation (weights over time, each arm's probability of being
best), the sample-ratio test under the weights each user was drawn with, and guardrails."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from deskgen.experiments.bandit import ArmEvidence, p_best
from deskgen.experiments.decision import Decision, decide
from deskgen.experiments.records import Experiment
from deskgen.experiments.stats import (
    Difference,
    RatioEstimate,
    SampleRatio,
    SequentialDifference,
    difference,
    ratio_estimate,
    sample_ratio,
    sequential_difference,
)
from deskgen.experiments.store import ConceptTotals, ExperimentStore, UserTotals
from deskgen_client.rules import FEEDBACK_EVENTS

#: The outcome an exposure records when the gate refused the photo.
GATE_REJECTED = "not_a_desk_setup"

#: How each figure is computed and when it may be read (the JSON's ``methods``; the page shows them).
METHODS = {
    "rates": "events per delivered image with the user as the unit (ratio of per-user sums); interval by "
    "Korn-Graubard: Clopper-Pearson on the effective sample size (images / design effect), so it stays in "
    "[0, 1] and is not empty at zero events",
    "vs_control_sequential": "always valid: a confidence sequence (normal mixture, Howard et al.) and its "
    "p-value; read it at any time, as often as you like",
    "vs_control": "fixed horizon: Wald p-value and a MOVER interval; valid only when read once, at a number of "
    "users fixed in advance; reading it every day inflates false positives",
    "decision": "on the primary metric, from the always-valid comparisons at alpha / (arms - 1) each (Bonferroni; "
    "decision.comparisons, wider than vs_control_sequential with 3 arms or more); users_needed is an upper "
    "estimate: the users after which any remaining comparison is decided whatever the true effect",
    "sample_ratio": "chi-square of users per arm against the weights each user was drawn with; alarm below 0.001",
}

#: The seed of the report's probability-of-being-best draws (a report is reproducible).
P_BEST_SEED = 20261204


@dataclass(frozen=True)
class Guardrails:
    """What an arm costs, over every request it answered (delivered or not)."""

    requests: int
    #: Total request seconds of delivered images, p50 and p95 (``nan`` without any).
    p50_total_s: float
    p95_total_s: float
    #: Share of requests answered 5xx (overloaded, replica down, timeout, internal).
    error_rate: float
    #: Share of requests the desk gate refused (422).
    gate_rejection_rate: float
    #: Delivered images the product locator answered for, and the mean share of the products asked for
    #: that it found in them (``nan`` without any): a mix that stops drawing the products shows here.
    located_images: int = 0
    mean_found_fraction: float = float("nan")


@dataclass(frozen=True)
class ConceptSlice:
    """An arm's delivered images made with one concept preset: feedback per image and products found."""

    exposures: int
    events: dict[str, int]
    #: Events per delivered image (no interval: slices are small and images of one user are not independent).
    rates: dict[str, float]
    located_images: int
    mean_found_fraction: float


@dataclass(frozen=True)
class ArmReport:
    arm: str
    users: int
    exposures: int
    rates: dict[str, RatioEstimate]
    #: Against the control arm, per event, fixed-horizon (Wald p-value; valid when read once, at a sample
    #: size fixed in advance); ``None`` for the control itself.
    vs_control: dict[str, Difference] | None
    guardrails: Guardrails
    #: Concept preset (``none`` without one) -> this arm's images made with it.
    by_concept: dict[str, ConceptSlice]
    #: Against the control arm, per event, always valid (a confidence sequence at the policy's alpha, mixing
    #: scale = its MDE): may be read at every look; ``None`` for the control itself.
    vs_control_sequential: dict[str, SequentialDifference] | None = None
    #: Posterior probability that this arm has the highest primary-metric rate.
    p_best: float = float("nan")
    #: The share of new users the arm gets now (the split, or the bandit's latest weights).
    weight: float = float("nan")


@dataclass(frozen=True)
class ExperimentReport:
    experiment_id: str
    split: dict[str, float]
    salt: str
    control: str
    arms: list[ArmReport]
    sample_ratio: SampleRatio
    policy: dict[str, Any] = field(default_factory=dict)
    decision: Decision | None = None
    #: What to change in serve_config.yaml once the experiment is concluded (``None`` while it runs).
    promotion: dict[str, Any] | None = None
    #: ``policy``, ``phase`` and ``weights`` now, and ``history``: the weights of every stored epoch.
    allocation: dict[str, Any] = field(default_factory=dict)
    #: Which figures may be read when.
    methods: dict[str, str] = field(default_factory=lambda: dict(METHODS))

    def public(self) -> dict[str, Any]:
        """The report as JSON-ready plain data (NaN becomes null)."""
        return _finite(asdict(self))


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if np.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


#: An exposure as the guardrails see it: outcome, status, timings, found fraction.
OutcomeRow = tuple[str, int, dict[str, float], float | None]


def _guardrails(rows: list[OutcomeRow]) -> Guardrails:
    n = len(rows)
    totals = [float(t["total_s"]) for outcome, _, t, _ in rows if outcome == "ok" and "total_s" in t]
    p50, p95 = (float(np.percentile(totals, 50)), float(np.percentile(totals, 95))) if totals else (float("nan"),) * 2
    found = [f for outcome, _, _, f in rows if outcome == "ok" and f is not None]
    return Guardrails(
        requests=n,
        p50_total_s=p50,
        p95_total_s=p95,
        error_rate=sum(1 for _, status, _, _ in rows if status >= 500) / n if n else float("nan"),
        gate_rejection_rate=sum(1 for outcome, _, _, _ in rows if outcome == GATE_REJECTED) / n if n else float("nan"),
        located_images=len(found),
        mean_found_fraction=float(np.mean(found)) if found else float("nan"),
    )


def _slice(totals: ConceptTotals) -> ConceptSlice:
    return ConceptSlice(
        exposures=totals.exposures,
        events=dict(totals.events),
        rates={name: totals.events.get(name, 0) / totals.exposures for name in FEEDBACK_EVENTS},
        located_images=totals.located,
        mean_found_fraction=totals.mean_found_fraction,
    )


def build_report(store: ExperimentStore, experiment_id: str, *, confidence: float = 0.95) -> ExperimentReport | None:
    """The report of ``experiment_id``; ``None`` when no such experiment was recorded."""
    experiment = store.experiment(experiment_id)
    if experiment is None:
        return None
    arms = list(experiment.split)
    control = arms[0]
    per_arm_users: dict[str, list[UserTotals]] = {arm: [] for arm in arms}
    for totals in store.user_totals(experiment_id):
        per_arm_users.setdefault(totals.arm, []).append(totals)
    per_arm_outcomes: dict[str, list[OutcomeRow]] = {arm: [] for arm in arms}
    for arm, outcome, status, timings, found in store.outcomes(experiment_id):
        if arm is not None:
            per_arm_outcomes.setdefault(arm, []).append((outcome, int(status), dict(timings or {}), found))
    per_arm_concepts: dict[str, dict[str, ConceptSlice]] = {}
    for sliced in store.concept_totals(experiment_id):
        per_arm_concepts.setdefault(sliced.arm, {})[sliced.concept] = _slice(sliced)

    policy = experiment.policy
    rates: dict[str, dict[str, RatioEstimate]] = {}
    for arm, users in per_arm_users.items():
        exposures = [u.exposures for u in users]
        rates[arm] = {
            name: ratio_estimate([u.events.get(name, 0) for u in users], exposures, confidence=confidence)
            for name in FEEDBACK_EVENTS
        }
    metric = policy.primary_metric
    # One arm (no A/B split: every user gets the default mix) has nothing to decide.
    decision = decide({arm: rates[arm][metric] for arm in experiment.split if arm in rates}, control=control,
                      metric=metric, alpha=policy.alpha, mde=policy.mde) if len(experiment.split) > 1 else None  # fmt: skip
    evidence = {
        arm: ArmEvidence(events=[float(u.events.get(metric, 0)) for u in users], exposures=[float(u.exposures) for u in users])
        for arm, users in per_arm_users.items() if arm in experiment.split
    }  # fmt: skip
    best = p_best(evidence, seed=P_BEST_SEED)
    history = store.allocation_history(experiment_id)
    total = sum(experiment.split.values())
    weights = dict(history[-1]["weights"]) if history else {a: s / total for a, s in experiment.split.items()}
    allocation = {"policy": policy.allocation, "phase": history[-1]["phase"] if history else "fixed",
                  "weights": weights, "history": history}  # fmt: skip
    srm = _sample_ratio(store, experiment, per_arm_users)
    reports = [
        ArmReport(
            arm=arm,
            users=len(users),
            exposures=sum(u.exposures for u in users),
            rates=rates[arm],
            vs_control=None if arm == control else {
                name: difference(rates[control][name], rates[arm][name], confidence=confidence)
                for name in FEEDBACK_EVENTS
            },
            guardrails=_guardrails(per_arm_outcomes.get(arm, [])),
            by_concept=dict(sorted(per_arm_concepts.get(arm, {}).items())),
            vs_control_sequential=None if arm == control else {
                name: sequential_difference(rates[control][name], rates[arm][name], alpha=policy.alpha, tau=policy.mde)
                for name in FEEDBACK_EVENTS
            },
            p_best=best.get(arm, float("nan")),
            weight=weights.get(arm, 0.0),
        )
        for arm, users in per_arm_users.items()
    ]  # fmt: skip
    return ExperimentReport(
        experiment_id, experiment.split, experiment.salt, control, reports, srm, policy=policy.public(),
        decision=decision, promotion=promotion(decision, experiment), allocation=allocation,
    )  # fmt: skip


def _sample_ratio(store: ExperimentStore, experiment: Experiment, users: dict[str, list[UserTotals]]) -> SampleRatio:
    """Users per arm against the weights each was drawn with: the split's for a fixed allocation; for a
    bandit, the weights stored with the user's assignment (the split's for a user assigned while the store
    was unreachable)."""
    observed = {arm: len(u) for arm, u in users.items() if arm in experiment.split}
    if experiment.policy.allocation == "fixed":
        return sample_ratio(observed, experiment.split)
    total = sum(experiment.split.values())
    split = {arm: share / total for arm, share in experiment.split.items()}
    drawn = store.assignment_weights(experiment.id)
    expected = dict.fromkeys(experiment.split, 0.0)
    for arm_users in users.values():
        for user in arm_users:
            for arm, weight in drawn.get(user.user_id, split).items():
                if arm in expected:
                    expected[arm] += float(weight)
    return sample_ratio(observed, expected)


def promotion(decision: Decision | None, experiment: Experiment) -> dict[str, Any] | None:
    """The serve_config.yaml change that acts on a concluded experiment: ``serve deploy`` stays the one way
    to change live traffic. A winner becomes the default mix; with no difference the control stays."""
    if decision is None or decision.verdict == "keep_running":
        return None
    ship = decision.winner if decision.verdict == "winner" and decision.winner else next(iter(experiment.split))
    why = (f"{ship} won on {decision.metric}" if decision.verdict == "winner"
           else f"no difference of {decision.metric} larger than the MDE: keep the control {ship}")  # fmt: skip
    yaml = (
        "# serve_config.yaml: applications[0].deployments[name: Ingress].user_config\n"
        f"# {why}; the experiment ends (a new ab_split or ab_salt starts the next one)\n"
        f"default_mix: {ship}\n"
        "ab_split: {}\n"
    )
    return {"default_mix": ship, "ab_split": {}, "reason": why, "yaml": yaml,
            "apply": "serve deploy serve_config.yaml"}  # fmt: skip
