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
                    feedback.append(Feedback(image, "download"))
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
