"""A new config through the Serve controller (what `serve deploy` does) changes the A/B split
without restarting any replica. It restores the session's config in ``finally`` (and waits for it), so
it runs in any order with the other tests of the tier."""

from __future__ import annotations

import copy
import time
from typing import Any

import httpx
import pytest

from .conftest import deploy, deployment, generator_info

pytestmark = pytest.mark.serve


def wait_for_split(client: httpx.Client, expected: dict[str, float], timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while client.get("/v1/mixes").json()["ab_split"] != expected:
        if time.monotonic() > deadline:
            raise TimeoutError(f"split never became {expected}")
        time.sleep(0.2)


def test_new_split_applies_without_restarting_replicas(client: httpx.Client, serve_app: dict[str, Any]) -> None:
    ingress_before = client.get("/healthz").json()["replica"]
    generator_before = generator_info()
    config = copy.deepcopy(serve_app["config"])
    deployment(config, "Ingress")["user_config"]["ab_split"] = {"ott_3d": 1.0}
    deploy(config)
    try:
        wait_for_split(client, {"ott_3d": 1.0})
        for user in ("alice", "bob", "carol", "dave"):
            response = client.post("/v1/text2img", json={"prompt": "desk", "steps": 1, "user_id": user})
            assert response.status_code == 200, response.text
            assert response.headers["x-deskgen-ab-arm"] == "ott_3d"
        assert client.get("/healthz").json()["replica"] == ingress_before
        generator_after = generator_info()
        assert generator_after["replica"] == generator_before["replica"]
        assert generator_after["base_loads"] == 1
    finally:
        deploy(serve_app["config"])
        split = deployment(serve_app["config"], "Ingress")["user_config"]["ab_split"]
        wait_for_split(client, {arm: share / sum(split.values()) for arm, share in split.items()})
