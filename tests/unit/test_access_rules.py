"""API keys and per-key limits without a server: how a key is presented and looked up, the token bucket,
the concurrency quota and how both are shared over several ingress replicas."""

from __future__ import annotations

import pytest

from deployments.door.apikeys import ApiKey, KeyRing, key_hash, mint, presented_key
from deployments.door.ratelimit import KeyQuotas

pytestmark = pytest.mark.unit


def test_a_key_is_presented_as_bearer_or_x_api_key_and_looked_up_by_hash() -> None:
    key = mint()
    assert key.startswith("dg_") and len(key) > 40 and mint() != key
    assert presented_key({"authorization": f"Bearer {key}"}) == key
    assert presented_key({"authorization": f"bearer  {key} "}) == key
    assert presented_key({"x-api-key": key}) == key
    assert presented_key({"authorization": "Basic dXNlcjpwdw==", "x-api-key": key}) == key
    assert presented_key({"authorization": "Bearer "}) is None and presented_key({}) is None
    ring = KeyRing([ApiKey(name="backend", sha256=key_hash(key))])
    assert ring and ring.lookup(key).name == "backend"  # type: ignore[union-attr]
    assert ring.lookup(key + "x") is None and not KeyRing([])
    with pytest.raises(ValueError):
        ApiKey(name="backend", sha256=key)  # the key itself is not a hash: refused, never stored


def test_token_bucket_allows_the_burst_then_one_per_refill() -> None:
    limits = ApiKey(name="k", sha256="0" * 64, requests_per_minute=60, burst=3)
    quotas = KeyQuotas()
    verdicts = [quotas.admit("k", limits, now=0.0, generation=False) for _ in range(4)]
    assert [v.code for v in verdicts] == [None, None, None, "rate_limited"]
    assert verdicts[0].headers == {"RateLimit-Limit": "3", "RateLimit-Remaining": "2", "RateLimit-Reset": "1",
                                   "RateLimit-Policy": "3;w=3"}  # fmt: skip
    assert verdicts[3].retry_after_s == 1 and verdicts[3].headers["RateLimit-Remaining"] == "0"
    assert quotas.admit("k", limits, now=0.5, generation=False).code == "rate_limited"
    assert quotas.admit("k", limits, now=1.0, generation=False).code is None  # one token a second


def test_concurrency_quota_counts_generations_in_flight_and_refusals_take_nothing() -> None:
    limits = ApiKey(name="k", sha256="0" * 64, requests_per_minute=600, burst=10, max_concurrent=2)
    quotas = KeyQuotas()
    assert quotas.admit("k", limits, 0.0, generation=True).code is None
    assert quotas.admit("k", limits, 0.0, generation=True).code is None
    refused = quotas.admit("k", limits, 0.0, generation=True, busy_retry_s=3)
    assert refused.code == "concurrency_limited" and refused.retry_after_s == 3
    assert refused.headers["RateLimit-Remaining"] == "8"  # the refused request's token was given back
    assert quotas.admit("k", limits, 0.0, generation=False).code is None  # reading is not a generation
    quotas.release("k")
    assert quotas.admit("k", limits, 0.0, generation=True).code is None


def test_limits_are_shared_over_ingress_replicas() -> None:
    limits = ApiKey(name="k", sha256="0" * 64, requests_per_minute=120, burst=4, max_concurrent=3)
    quotas = KeyQuotas()
    quotas.set_replicas(2)
    # Each of two replicas holds half the burst and refills at half the rate; the headers speak for the key.
    verdicts = [quotas.admit("k", limits, 0.0, generation=False) for _ in range(3)]
    assert [v.code for v in verdicts] == [None, None, "rate_limited"]
    assert verdicts[0].headers["RateLimit-Limit"] == "4" and verdicts[0].headers["RateLimit-Remaining"] == "2"
    assert quotas.admit("k", limits, 1.0, generation=False).code is None  # 1 token/s here (2/s for the key)
    assert quotas.concurrency(limits) == 2  # ceil(3 / 2)
    # A changed limit (serve deploy) takes effect at once; a revoked key's state goes.
    quotas.set_replicas(1)
    wider = limits.model_copy(update={"burst": 10})
    assert [quotas.admit("k", wider, 1.0, generation=False).code for _ in range(10)] == [None] * 10
    quotas.forget_except(set())
    assert quotas._state == {}
