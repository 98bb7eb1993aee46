"""The ingress's door on the real app: API keys (401), per-key rate and concurrency limits (429) and
admission control (503 before the body is parsed), each changed with a `serve deploy` of the config and
restored after (so the tests run in any order with the rest of the tier)."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from deployments.door.apikeys import key_hash, mint

from .conftest import deploy, deployment, stage_stats
from .helpers import assert_error, door, generator_full, long_stream, text2img, wait_until

pytestmark = pytest.mark.serve

BACKEND, LIMITED, BUSY = mint(), mint(), mint()


def keyed_config(serve_app: dict[str, Any], keys: list[dict[str, Any]]) -> dict[str, Any]:
    config = copy.deepcopy(serve_app["config"])
    deployment(config, "Ingress")["user_config"]["api_keys"] = keys
    return config


@pytest.fixture()
def with_keys(serve_app: dict[str, Any], client: httpx.Client) -> Iterator[None]:
    """Three keys deployed: ``backend`` unlimited, ``limited`` 6/min with a burst of 2, ``busy`` one
    generation at a time. The session's open config is back afterwards."""
    keys = [
        {"name": "backend", "sha256": key_hash(BACKEND)},
        {"name": "limited", "sha256": key_hash(LIMITED), "requests_per_minute": 6, "burst": 2},
        {"name": "busy", "sha256": key_hash(BUSY), "max_concurrent": 1},
    ]
    deploy(keyed_config(serve_app, keys))
    wait_until(lambda: client.get("/v1/limits").status_code == 401, "the keys never applied")
    try:
        yield
    finally:
        deploy(serve_app["config"])
        wait_until(lambda: client.get("/v1/limits").status_code == 200, "the open config never came back")


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_keys_are_required_once_configured_and_revocable(with_keys: None, client: httpx.Client, serve_app: dict[str, Any]) -> None:
    missing = client.post("/v1/text2img", json={"prompt": "desk"})
    assert_error(missing, 401, "unauthorized", "Authorization", "API key is required")
    assert missing.headers["www-authenticate"] == 'Bearer realm="deskgen"'
    wrong = client.get("/v1/mixes", headers=bearer("dg_not-a-key"))
    assert_error(wrong, 401, "unauthorized", "Authorization", "not valid")
    assert 'error="invalid_token"' in wrong.headers["www-authenticate"]
    assert "dg_not-a-key" not in wrong.text  # a key is never echoed
    # Both ways of presenting a key work; a generation with one is an ordinary 200 PNG.
    assert client.get("/v1/mixes", headers={"X-API-Key": BACKEND}).status_code == 200
    made = text2img(client, seed=3, headers=bearer(BACKEND))
    assert made.status_code == 200 and made.headers["content-type"] == "image/png"
    # Health probes and the API's documentation stay open.
    for path in ("/healthz", "/readyz", "/openapi.json", "/docs"):
        assert client.get(path).status_code == 200, path
    document = client.get("/openapi.json").json()
    assert set(document["components"]["securitySchemes"]) == {"bearer", "apiKey"}
    assert {"401", "429"} <= set(document["paths"]["/v1/text2img"]["post"]["responses"])
    assert "security" not in document["paths"]["/healthz"]["get"]
    feedback_doc = document["paths"]["/v1/feedback"]["post"]
    assert "403" in feedback_doc["responses"] and "only the API key that generated it" in feedback_doc["description"]

    # Feedback for an image: only with the key that generated it, and with the user it was delivered to.
    mine = text2img(client, seed=4, user_id="key-user", headers=bearer(BACKEND))
    assert mine.status_code == 200, mine.text
    image_id = mine.headers["x-request-id"]
    body = {"image_id": image_id, "event": "like", "user_id": "key-user"}
    other_key = client.post("/v1/feedback", json=body, headers=bearer(BUSY))
    assert_error(other_key, 403, "feedback_forbidden", "image_id", "only with the API key that generated it")
    no_user = client.post("/v1/feedback", json={"image_id": image_id, "event": "like"}, headers=bearer(BACKEND))
    assert_error(no_user, 403, "feedback_forbidden", "user_id", "needs that user's `user_id`")
    assert client.post("/v1/feedback", json=body, headers=bearer(BACKEND)).status_code == 201
    anonymous = text2img(client, seed=5, headers=bearer(BUSY))  # no user id: the key alone decides
    assert anonymous.status_code == 200, anonymous.text
    anonymous_body = {"image_id": anonymous.headers["x-request-id"], "event": "download"}
    assert_error(client.post("/v1/feedback", json=anonymous_body, headers=bearer(BACKEND)), 403, "feedback_forbidden", "image_id")
    assert client.post("/v1/feedback", json=anonymous_body, headers=bearer(BUSY)).status_code == 201

    # Revoked by a serve deploy without it: refused at once, no restart.
    replica = client.get("/healthz").json()["replica"]
    keys = [{"name": "limited", "sha256": key_hash(LIMITED)}]
    deploy(keyed_config(serve_app, keys))
    wait_until(lambda: client.get("/v1/mixes", headers=bearer(BACKEND)).status_code == 401, "the key was never revoked")
    assert client.get("/v1/mixes", headers=bearer(LIMITED)).status_code == 200
    assert client.get("/healthz").json()["replica"] == replica


def test_rate_limit_is_429_with_retry_after_and_ratelimit_headers(with_keys: None, client: httpx.Client) -> None:
    first = client.get("/v1/limits", headers=bearer(LIMITED))
    assert first.status_code == 200
    assert first.headers["ratelimit-limit"] == "2" and first.headers["ratelimit-policy"] == "2;w=20"
    assert first.headers["ratelimit-remaining"] == "1"
    assert client.get("/v1/limits", headers=bearer(LIMITED)).status_code == 200
    refused = client.get("/v1/limits", headers=bearer(LIMITED))
    error = assert_error(refused, 429, "rate_limited", None, "6 requests per minute")
    # One token comes back every 10 s (6/min): the wait is at most that, never 0.
    assert 1 <= int(refused.headers["retry-after"]) <= 10 and error["retry_after_s"] == int(refused.headers["retry-after"])
    assert refused.headers["ratelimit-remaining"] == "0"
    # Other keys are not affected; a key without limits sends no RateLimit headers.
    other = client.get("/v1/limits", headers=bearer(BACKEND))
    assert other.status_code == 200 and "ratelimit-limit" not in other.headers


def test_concurrent_generations_per_key(with_keys: None, client: httpx.Client, serve_app: dict[str, Any]) -> None:
    """``busy`` may run one generation at a time: a second while the first streams is 429, another key's
    generation is admitted meanwhile and answered 200 once the generator is free, and the slot is free again
    once the first is answered."""
    with ThreadPoolExecutor(1) as pool, httpx.Client(base_url=serve_app["url"], timeout=120) as other:
        with long_stream(client, bearer(BUSY)) as first:
            assert first.status_code == 200
            second = text2img(client, seed=4, headers=bearer(BUSY))
            # The quota is the key's, not the service's: another key's generation gets in (it queues behind
            # the stream, which holds the generator) ...
            other_key = pool.submit(text2img, other, seed=4, headers=bearer(BACKEND))
            wait_until(lambda: door(client)["in_flight"] == 2, "the other key's generation never got in",
                       lambda: door(client))  # fmt: skip
            # Reading the mixes is not a generation.
            assert client.get("/v1/mixes", headers=bearer(BUSY)).status_code == 200
        # ... and is answered once the stream is closed (its generation cancelled).
        answered = other_key.result(timeout=120)
    assert_error(second, 429, "concurrency_limited", None, "1 generation(s) in flight")
    assert int(second.headers["retry-after"]) >= 1
    assert answered.status_code == 200 and answered.headers["content-type"] == "image/png", answered.text
    # Once the first is gone (closed: its generation is cancelled) the slot is free again.
    wait_until(lambda: door(client)["in_flight"] == 0, "the closed stream never left the door")
    assert text2img(client, seed=5, headers=bearer(BUSY)).status_code == 200


def test_admission_sheds_before_the_body_is_parsed(client: httpx.Client, serve_app: dict[str, Any], desk_photo: bytes) -> None:
    """The generator takes 1 running + 2 queued from this ingress (the tier's queue limits): with three
    long generations in flight, a fourth generation request is refused 503 at the door — a malformed body
    is not even parsed (503, not 400) and a photo is not gated — while other routes keep answering."""
    deploy(serve_app["config"])  # a reconfigure: the door starts again from the generator's capacity
    wait_until(lambda: door(client)["capacity"] == door(client)["limit"] == 3, "the door never learnt the "
               "generator's capacity", lambda: door(client))
    shed_before = door(client)["shed"]
    gated_before = stage_stats()["gated"]

    with generator_full(serve_app["url"], client) as full:
        malformed = client.post("/v1/text2img", content=b"{not json", headers={"Content-Type": "application/json"})
        photo = client.post("/v1/generate", files={"image": ("desk.jpg", desk_photo, "image/jpeg")})
        mixes = client.get("/v1/mixes")
        still_full = full()
    assert still_full, "a long generation ended before the probes: the door was not full while probing"
    for refused in (malformed, photo):
        error = assert_error(refused, 503, "overloaded", None, "at capacity")
        assert 1 <= int(refused.headers["retry-after"]) <= 5 and error["retry_after_s"] >= 1
    assert mixes.status_code == 200
    assert stage_stats()["gated"] == gated_before  # the refused photo never reached the gate
    assert door(client)["shed"] == shed_before + 2
    wait_until(lambda: door(client)["in_flight"] == 0, "the closed streams never left the door")
    # The door is open again.
    assert text2img(client, seed=6).status_code == 200


def test_without_keys_the_api_is_open(client: httpx.Client) -> None:
    """Without keys (the tier's config, like `make serve`) everything is open and no RateLimit header is sent."""
    response = client.get("/v1/limits")
    assert response.status_code == 200 and "ratelimit-limit" not in response.headers
    assert "securitySchemes" not in json.dumps(client.get("/openapi.json").json())
