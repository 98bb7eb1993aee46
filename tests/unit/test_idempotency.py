"""Idempotency keys (deskgen/jobs/idempotency.py) on a real Redis: first request runs, a replay gets the
first answer, 409 while it runs, 422 with another body, a 5xx releases the key, keys are per API key."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from deployments.http_errors import status_of
from deskgen.errors import IdempotencyConflict, IdempotencyKeyReused, InvalidParameter
from deskgen.jobs.idempotency import IdempotencyStore, StoredAnswer, parse_key
from deskgen.tools.redis import running_redis

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def redis_client() -> Iterator[object]:
    import redis

    with running_redis() as url:
        yield redis.Redis.from_url(url)


def test_the_header_is_a_structured_field_string() -> None:
    assert parse_key('"8e03978e-40d5-43e8-bc93-6894a57f9324"') == "8e03978e-40d5-43e8-bc93-6894a57f9324"
    assert parse_key("plain-token") == "plain-token"
    assert parse_key(None) is None
    for bad in ('""', '"a b"', '"x"y"', "x" * 256, "é"):
        with pytest.raises(InvalidParameter) as info:
            parse_key(bad)
        assert info.value.field == "Idempotency-Key"


def test_claim_replay_conflict_and_reuse(redis_client: object) -> None:
    store = IdempotencyStore(redis_client)
    body = b'{"prompt": "a desk"}'
    assert store.claim("key-a", "/v1/text2img", "k1", body).state == "new"
    with pytest.raises(IdempotencyConflict) as running:
        store.claim("key-a", "/v1/text2img", "k1", body)
    assert status_of(running.value) == 409
    answer = StoredAnswer(200, {"content-type": "image/png", "x-request-id": "r1"}, b"\x89PNG...")
    store.complete("key-a", "/v1/text2img", "k1", body, answer)
    replay = store.claim("key-a", "/v1/text2img", "k1", body)
    assert (replay.state, replay.answer) == ("replay", answer)
    with pytest.raises(IdempotencyKeyReused) as reused:
        store.claim("key-a", "/v1/text2img", "k1", b'{"prompt": "another desk"}')
    assert status_of(reused.value) == 422
    assert 24 * 3600 - 5 <= redis_client.ttl("deskgen:idem:key-a:/v1/text2img:k1") <= 24 * 3600  # type: ignore[attr-defined]
    # Scoped per API key and route: the same key elsewhere is another key.
    assert store.claim("key-b", "/v1/text2img", "k1", body).state == "new"
    assert store.claim("key-a", "/v1/jobs", "k1", body).state == "new"


def test_a_5xx_releases_the_key_and_a_lost_replica_lets_it_go_after_its_lease(redis_client: object) -> None:
    store = IdempotencyStore(redis_client, lease_s=1)
    body = b"{}"
    assert store.claim("s", "/v1/generate", "k2", body).state == "new"
    store.complete("s", "/v1/generate", "k2", body, StoredAnswer(503, {}, b'{"error": {}}'))
    assert store.claim("s", "/v1/generate", "k2", body).state == "new"  # the retry runs afresh
    # That second claim never completes (its replica died): after the 1 s lease the key is free again.
    time.sleep(1.2)
    assert store.claim("s", "/v1/generate", "k2", body).state == "new"
