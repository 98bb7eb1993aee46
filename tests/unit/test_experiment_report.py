"""An experiment's report from a real SQLite store, against the scenario's own counts."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from deskgen.experiments.records import Experiment, Exposure, Feedback
from deskgen.experiments.report import build_report
from deskgen.experiments.store import ExperimentStore

pytestmark = pytest.mark.unit

SPLIT = {"dalle_ott": 0.5, "ott_3d": 0.5}
EXPERIMENT = Experiment(split=SPLIT, salt="s1", mixes={"dalle_ott": {"dalle": 0.7}, "ott_3d": {"ott": 0.7}})


def test_a_two_arm_report_counts_users_exposures_events_and_guardrails(tmp_path: Path) -> None:
    store = ExperimentStore.open(f"sqlite:///{tmp_path / 'e.db'}")
    store.ensure_experiment(EXPERIMENT)
    rng = np.random.default_rng(5)
    # 12 users per arm, 1..6 images each; likes with arm-dependent odds; one gate rejection and one
    # timeout per arm that never count as delivered images.
    expected: dict[str, dict[str, list[int]]] = {arm: {"exposures": [], "like": [], "download": []} for arm in SPLIT}
    totals: dict[str, list[float]] = {arm: [] for arm in SPLIT}
    exposures, feedback = [], []
    for arm, like_p in (("dalle_ott", 0.3), ("ott_3d", 0.6)):
        for u in range(12):
            user = f"{arm}-u{u}"
            n = int(rng.integers(1, 7))
            likes = downloads = 0
            for i in range(n):
                image = f"{user}-i{i}"
                total = float(rng.uniform(0.5, 2.0))
                totals[arm].append(total)
                exposures.append(Exposure(image, EXPERIMENT.id, user, arm, arm, "ab", "ok", 200, timings={"total_s": total}))
                if rng.random() < like_p:
                    feedback.append(Feedback(image, "like", user_id=user))
                    feedback.append(Feedback(image, "like", user_id=user))  # a retry: counted once
                    likes += 1
                if i == 0:
                    feedback.append(Feedback(image, "download", user_id=user))
                    downloads += 1
            expected[arm]["exposures"].append(n)
            expected[arm]["like"].append(likes)
            expected[arm]["download"].append(downloads)
        exposures.append(Exposure(f"{arm}-rejected", EXPERIMENT.id, f"{arm}-u0", arm, arm, "ab", "not_a_desk_setup", 422))
        exposures.append(Exposure(f"{arm}-timeout", EXPERIMENT.id, f"{arm}-u1", arm, arm, "ab", "timeout", 504))
    assert store.record_exposures(exposures) == len(exposures)
    for fb in feedback:
        store.record_feedback(fb)

    report = build_report(store, EXPERIMENT.id)
    assert report is not None and report.control == "dalle_ott"
    for arm_report in report.arms:
        want = expected[arm_report.arm]
        assert arm_report.users == 12 and arm_report.exposures == sum(want["exposures"])
        like = arm_report.rates["like"]
        assert (like.events, like.exposures) == (sum(want["like"]), sum(want["exposures"]))
        assert like.rate == pytest.approx(sum(want["like"]) / sum(want["exposures"]))
        assert arm_report.rates["download"].events == 12 and arm_report.rates["select"].events == 0
        g = arm_report.guardrails
        assert g.requests == sum(want["exposures"]) + 2
        assert g.error_rate == pytest.approx(1 / g.requests) and g.gate_rejection_rate == pytest.approx(1 / g.requests)
        assert g.p50_total_s == pytest.approx(float(np.percentile(totals[arm_report.arm], 50)))
        assert g.p95_total_s == pytest.approx(float(np.percentile(totals[arm_report.arm], 95)))
    control, treatment = report.arms
    assert control.vs_control is None and treatment.vs_control is not None
    assert treatment.vs_control["like"].estimate == pytest.approx(treatment.rates["like"].rate - control.rates["like"].rate)
    assert report.sample_ratio.observed == {"dalle_ott": 12, "ott_3d": 12}
    assert report.sample_ratio.p_value == pytest.approx(1.0) and not report.sample_ratio.alarm
    body = json.loads(json.dumps(report.public(), allow_nan=False))  # JSON-ready: no NaN
    assert body["arms"][1]["rates"]["select"]["se"] == 0.0
    assert body["arms"][0]["vs_control"] is None


def test_an_unknown_experiment_has_no_report_and_an_empty_one_has_no_numbers(tmp_path: Path) -> None:
    store = ExperimentStore.open(f"sqlite:///{tmp_path / 'e.db'}")
    assert build_report(store, "exp-000000000000") is None
    store.ensure_experiment(EXPERIMENT)
    report = build_report(store, EXPERIMENT.id)
    assert report is not None and [a.users for a in report.arms] == [0, 0]
    assert math.isnan(report.arms[0].rates["like"].rate)
    assert json.loads(json.dumps(report.public(), allow_nan=False))["arms"][0]["rates"]["like"]["rate"] is None


def test_the_report_breaks_arms_down_by_concept_with_the_share_of_products_found(tmp_path: Path) -> None:
    store = ExperimentStore.open(f"sqlite:///{tmp_path / 'e.db'}")
    store.ensure_experiment(EXPERIMENT)
    rows = [  # (image, arm, concept, found fraction, liked)
        ("a1", "dalle_ott", "cozy-wood", 1.0, True),
        ("a2", "dalle_ott", "cozy-wood", 0.5, False),
        ("a3", "dalle_ott", None, None, True),  # no concept; the locator was off
        ("b1", "ott_3d", "gaming-rgb", 0.25, False),
        ("b2", "ott_3d", "gaming-rgb", 0.75, True),
        ("b3", "ott_3d", "gaming-rgb", None, False),  # located nothing (timeout): not in the mean
    ]
    exposures = [Exposure(image, EXPERIMENT.id, f"u-{image}", arm, arm, "ab", "ok", 200, concept=concept,
                          found_fraction=found) for image, arm, concept, found, _ in rows]  # fmt: skip
    # A refused request with a concept is a guardrail, not a delivered image of its concept.
    exposures.append(Exposure("b4", EXPERIMENT.id, "u-b4", "ott_3d", "ott_3d", "ab", "timeout", 504, concept="gaming-rgb"))
    store.record_exposures(exposures)
    for image, *_, liked in rows:
        if liked:
            store.record_feedback(Feedback(image, "like", user_id=f"u-{image}"))

    report = build_report(store, EXPERIMENT.id)
    assert report is not None
    control, treatment = report.arms
    assert sorted(control.by_concept) == ["cozy-wood", "none"] and list(treatment.by_concept) == ["gaming-rgb"]
    cozy, plain, gaming = control.by_concept["cozy-wood"], control.by_concept["none"], treatment.by_concept["gaming-rgb"]
    assert (cozy.exposures, cozy.events, cozy.rates["like"]) == (2, {"like": 1}, 0.5)
    assert (cozy.located_images, cozy.mean_found_fraction) == (2, pytest.approx(0.75))
    assert (plain.exposures, plain.located_images, plain.rates["like"]) == (1, 0, 1.0) and np.isnan(plain.mean_found_fraction)
    assert (gaming.exposures, gaming.located_images, gaming.mean_found_fraction) == (3, 2, pytest.approx(0.5))
    assert gaming.rates["like"] == pytest.approx(1 / 3)
    assert control.guardrails.located_images == 2 and control.guardrails.mean_found_fraction == pytest.approx(0.75)
    assert treatment.guardrails.requests == 4 and treatment.guardrails.mean_found_fraction == pytest.approx(0.5)
    body = json.loads(json.dumps(report.public(), allow_nan=False))
    assert body["arms"][0]["by_concept"]["none"]["mean_found_fraction"] is None


def _store_with(tmp_path: Path, experiment: Experiment, like_p: dict[str, float], users: int, seed: int = 3) -> ExperimentStore:
    """``users`` users per arm, 1..4 images each, liked with the arm's probability."""
    store = ExperimentStore.open(f"sqlite:///{tmp_path / 'd.db'}")
    store.ensure_experiment(experiment)
    rng = np.random.default_rng(seed)
    exposures, feedback = [], []
    for arm, p in like_p.items():
        for u in range(users):
            user = f"{arm}-{u}"
            for i in range(1 + u % 4):
                image = f"{user}-{i}"
                exposures.append(Exposure(image, experiment.id, user, arm, arm, "ab", "ok", 200))
                if rng.random() < p:
                    feedback.append(Feedback(image, "like", user_id=user))
    store.record_exposures(exposures)
    for fb in feedback:
        store.record_feedback(fb)
    return store


def test_a_clear_winner_is_stated_with_the_config_change_that_ships_it(tmp_path: Path) -> None:
    from deskgen.experiments.records import Policy

    experiment = Experiment(SPLIT, "win", EXPERIMENT.mixes, policy=Policy(alpha=0.05, mde=0.05))
    store = _store_with(tmp_path, experiment, {"dalle_ott": 0.1, "ott_3d": 0.6}, users=150)
    report = build_report(store, experiment.id)
    assert report is not None and report.decision is not None
    assert (report.decision.verdict, report.decision.winner) == ("winner", "ott_3d")
    treatment = report.arms[1]
    assert treatment.vs_control_sequential is not None
    seq, fixed = treatment.vs_control_sequential["like"], treatment.vs_control["like"]  # type: ignore[index]
    assert seq.ci_low > 0 and seq.estimate == pytest.approx(fixed.estimate)
    assert seq.ci_high - seq.ci_low > fixed.ci_high - fixed.ci_low  # valid at every look costs width
    assert treatment.p_best > 0.99 and report.arms[0].p_best < 0.01
    assert report.promotion is not None and report.promotion["default_mix"] == "ott_3d"
    assert "default_mix: ott_3d\nab_split: {}\n" in report.promotion["yaml"]
    body = json.loads(json.dumps(report.public(), allow_nan=False))
    assert body["decision"]["verdict"] == "winner" and body["policy"]["mde"] == 0.05
    assert set(body["methods"]) >= {"rates", "vs_control", "vs_control_sequential"}
    assert body["allocation"] == {"policy": "fixed", "phase": "fixed", "weights": SPLIT, "history": []}


def test_a_young_experiment_keeps_running_and_says_for_how_many_users(tmp_path: Path) -> None:
    experiment = Experiment(SPLIT, "young", EXPERIMENT.mixes)
    store = _store_with(tmp_path, experiment, {"dalle_ott": 0.3, "ott_3d": 0.33}, users=10)
    report = build_report(store, experiment.id)
    assert report is not None and report.decision is not None
    assert report.decision.verdict == "keep_running"
    assert report.decision.users_needed is not None and report.decision.users_needed > 0
    assert report.promotion is None


def test_a_bandit_report_tests_the_sample_ratio_against_each_users_weights(tmp_path: Path) -> None:
    from deskgen.experiments.records import Policy

    experiment = Experiment(SPLIT, "bandit", EXPERIMENT.mixes, policy=Policy(allocation="thompson"))
    store = _store_with(tmp_path, experiment, {"dalle_ott": 0.2, "ott_3d": 0.5}, users=20)
    # Of each arm's 20 users, 10 were drawn at 50/50 and 10 at 20/80: dalle_ott is expected 2 * (5 + 2) = 14
    # users and ott_3d 2 * (5 + 8) = 26 (the split alone would expect 20 each).
    for arm in SPLIT:
        for u in range(20):
            weights = {"dalle_ott": 0.5, "ott_3d": 0.5} if u < 10 else {"dalle_ott": 0.2, "ott_3d": 0.8}
            store.assign(experiment.id, f"{arm}-{u}", arm, weights)
    store.store_allocation(experiment.id, 1, "burn_in", {"dalle_ott": 0.5, "ott_3d": 0.5}, {}, {})
    store.store_allocation(experiment.id, 2, "thompson", {"dalle_ott": 0.2, "ott_3d": 0.8}, {"dalle_ott": 0.1, "ott_3d": 0.9}, {})
    report = build_report(store, experiment.id)
    assert report is not None
    srm = report.sample_ratio
    assert srm.expected == pytest.approx({"dalle_ott": 2 * (10 * 0.5 + 10 * 0.2), "ott_3d": 2 * (10 * 0.5 + 10 * 0.8)})
    from scipy.stats import chisquare

    want = chisquare([20, 20], [14.0, 26.0])
    assert srm.p_value == pytest.approx(float(want.pvalue))
    assert report.allocation["phase"] == "thompson" and report.allocation["weights"] == {"dalle_ott": 0.2, "ott_3d": 0.8}
    assert [h["phase"] for h in report.allocation["history"]] == ["burn_in", "thompson"]
    assert [a.weight for a in report.arms] == [0.2, 0.8]


def test_an_experiment_of_one_arm_has_no_decision(tmp_path: Path) -> None:
    single = Experiment({"mix": 1.0}, "solo", {"mix": {"dalle": 0.6}})
    store = _store_with(tmp_path, single, {"mix": 0.3}, users=5)
    report = build_report(store, single.id)
    assert report is not None and report.decision is None and report.promotion is None
    assert json.loads(json.dumps(report.public(), allow_nan=False))["decision"] is None
