"""An experiment's report: per arm, users, exposures, event rates with confidence intervals, the difference
of each arm against the control (the split's first arm), the sample-ratio test and guardrails."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from deskgen.experiments.records import FEEDBACK_EVENTS
from deskgen.experiments.stats import (
    Difference,
    RatioEstimate,
    SampleRatio,
    difference,
    ratio_estimate,
    sample_ratio,
)
from deskgen.experiments.store import ConceptTotals, ExperimentStore, UserTotals

#: The outcome an exposure records when the gate refused the photo.
GATE_REJECTED = "not_a_desk_setup"


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
    #: Against the control arm, per event; ``None`` for the control itself.
    vs_control: dict[str, Difference] | None
    guardrails: Guardrails
    #: Concept preset (``none`` without one) -> this arm's images made with it.
    by_concept: dict[str, ConceptSlice]


@dataclass(frozen=True)
class ExperimentReport:
    experiment_id: str
    split: dict[str, float]
    salt: str
    control: str
    arms: list[ArmReport]
    sample_ratio: SampleRatio

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

    rates: dict[str, dict[str, RatioEstimate]] = {}
    for arm, users in per_arm_users.items():
        exposures = [u.exposures for u in users]
        rates[arm] = {
            name: ratio_estimate([u.events.get(name, 0) for u in users], exposures, confidence=confidence)
            for name in FEEDBACK_EVENTS
        }
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
        )
        for arm, users in per_arm_users.items()
    ]  # fmt: skip
    srm = sample_ratio({r.arm: r.users for r in reports if r.arm in experiment.split}, experiment.split)
    return ExperimentReport(experiment_id, experiment.split, experiment.salt, control, reports, srm)
