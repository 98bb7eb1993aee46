"""A Thompson-sampling experiment driven through the real app by simulated users whose like probability
depends on the mix they are shown: after the burn-in the weights move to the better mix, users keep the
arm they were first given, and the sample-ratio test (expected counts under each user's weights) raises no
alarm. The session's config is restored afterwards."""

from __future__ import annotations

import time
import uuid
from typing import Any

import httpx
import numpy as np
import pytest
from sqlalchemy import select

from deskgen.ab import pick_arm
from deskgen.experiments.schema import assignments
from deskgen.experiments.store import make_engine

from .conftest import deploy
from .helpers import text2img
from .test_experiments import ingress_config, post_feedback, redeploy_with, wait_for_experiment

pytestmark = pytest.mark.serve

GOOD, BAD = "ott_3d", "dalle_ott"
#: The simulated users' probability of liking an image of each mix.
LIKES = {GOOD: 0.9, BAD: 0.1}
BURN_IN = 6
POLICY = {"allocation": "thompson", "burn_in_users": BURN_IN, "update_every_s": 1, "floor": 0.05, "mde": 0.2}


def visit(client: httpx.Client, user: str, rng: np.random.Generator) -> str:
    """One image for ``user``; the user likes it with their mix's probability. Returns the arm."""
    r = text2img(client, user_id=user)
    assert r.status_code == 200, r.text
    arm = r.headers["x-deskgen-ab-arm"]
    if rng.random() < LIKES[arm]:
        fb = post_feedback(client, image_id=r.headers["x-request-id"], event="like", user_id=user)
        assert fb.status_code == 201, fb.text
    return arm


def live_weights(client: httpx.Client) -> dict[str, float]:
    r = client.get("/v1/mixes")
    assert r.status_code == 200, r.text
    return dict(r.json()["ab_weights"])


def test_thompson_moves_new_users_to_the_better_mix_and_keeps_old_ones(
    serve_app: dict[str, Any], client: httpx.Client
) -> None:
    base = serve_app["config"]
    before = ingress_config(base).experiment.id
    config = redeploy_with(base, client, ab_split={BAD: 0.5, GOOD: 0.5}, ab_salt=f"bandit-{uuid.uuid4().hex[:8]}",
                           ab_policy=POLICY)  # fmt: skip
    experiment_id = ingress_config(config).experiment.id
    rng = np.random.default_rng(7)
    try:
        # Burn-in: the configured 50/50 split until every arm has BURN_IN users.
        assert live_weights(client) == {BAD: 0.5, GOOD: 0.5}
        arm_of: dict[str, str] = {}
        while min(sum(1 for a in arm_of.values() if a == arm) for arm in LIKES) < BURN_IN:
            assert len(arm_of) < 60, arm_of
            user = f"early-{len(arm_of)}"
            arm_of[user] = visit(client, user, rng)
            assert visit(client, user, rng) == arm_of[user]  # sticky within the burn-in too
        early = dict(arm_of)

        # Within a cadence or two the weights move to the better mix, identically on every replica.
        deadline_polls = 60
        while (weights := live_weights(client))[GOOD] < 0.8:
            deadline_polls -= 1
            assert deadline_polls > 0, weights
            time.sleep(0.5)
        assert weights[BAD] >= 0.05 - 1e-9  # the floor

        # New users are drawn with the moved weights; the early users keep the arm they were first given.
        late = {f"late-{i}": visit(client, f"late-{i}", rng) for i in range(16)}
        for user, arm in early.items():
            assert visit(client, user, rng) == arm, user

        report = client.get(f"/v1/experiments/{experiment_id}").json()
        allocation = report["allocation"]
        phases = [h["phase"] for h in allocation["history"]]
        assert phases[0] == "burn_in" and "thompson" in phases, phases
        assert allocation["policy"] == "thompson" and report["policy"]["allocation"] == "thompson"
        arms = {a["arm"]: a for a in report["arms"]}
        assert arms[GOOD]["p_best"] > 0.9, arms[GOOD]["p_best"]
        # SRM: observed users per arm against the weights each user was drawn with (from the store).
        engine = make_engine(serve_app["experiments_db"])
        with engine.connect() as c:
            drawn = c.execute(select(assignments.c.user_id, assignments.c.arm, assignments.c.weights)
                              .where(assignments.c.experiment_id == experiment_id)).all()  # fmt: skip
        engine.dispose()
        assert {r.user_id: r.arm for r in drawn} == early | late
        # Each late user got the arm that their hash gives against the weights stored with them, and those
        # weights favour the better mix: "new users mostly get it", checked exactly rather than by a count of
        # the 16 against a fixed bound (12 of 16 fails about one run in five at a weight of 0.8: CI saw 11).
        salt = ingress_config(config).experiment.salt
        late_weights = {r.user_id: {arm: float(w) for arm, w in r.weights.items()} for r in drawn if r.user_id in late}
        for user, arm in late.items():
            assert late_weights[user][GOOD] > 0.5, (user, late_weights[user])
            assert arm == pick_arm(late_weights[user], user, salt), (user, arm, late_weights[user])
        expected = {arm: sum(float(r.weights[arm]) for r in drawn) for arm in LIKES}
        srm = report["sample_ratio"]
        assert srm["observed"] == {arm: sum(a == arm for a in (early | late).values()) for arm in LIKES}
        assert srm["expected"] == pytest.approx(expected)
        assert not srm["alarm"], srm
        print(f"\n[bandit] burn-in users {len(early)} ({sum(a == GOOD for a in early.values())} on {GOOD}); weights "
              f"after: {weights}; late users on {GOOD}: {sum(a == GOOD for a in late.values())}/16; p_best "
              f"{ {a['arm']: round(a['p_best'], 3) for a in report['arms']} }; SRM p={srm['p_value']:.3f}; "
              f"decision {report['decision']['verdict']} {report['decision'].get('winner')}")  # fmt: skip
    finally:
        deploy(base)
        wait_for_experiment(client, before)
