"""Per-key rate limits and concurrency quotas, enforced by each ingress replica for its share of the keys'
traffic.

A key's limits (:class:`~deployments.door.apikeys.KeyLimits`) are global; with ``replicas`` ingress replicas each
enforces ``1/replicas`` of them (rate and burst divided, concurrency rounded up). Serve's proxy spreads a
key's requests over the replicas (it routes by queue length, not by key), so the sum holds the global
limit **approximately**: within a burst of a few requests, and exactly with one replica. An exact global
limit would need a shared counter on every request's path — one more remote call, about the whole
Serve floor again (BENCHMARKS.md) — for a limit whose purpose is protection, not billing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from deployments.door.apikeys import KeyLimits


@dataclass
class TokenBucket:
    """``capacity`` tokens, refilled at ``rate`` per second; a request takes one."""

    rate: float
    capacity: float
    tokens: float
    updated: float

    def refill(self, now: float) -> None:
        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
        self.updated = now

    def take(self, now: float) -> bool:
        self.refill(now)
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False

    def give_back(self) -> None:
        self.tokens = min(self.capacity, self.tokens + 1.0)

    def wait_s(self) -> float:
        """Seconds until one token is there (after :meth:`refill`)."""
        return max(0.0, (1.0 - self.tokens) / self.rate)

    def full_in_s(self) -> float:
        return max(0.0, (self.capacity - self.tokens) / self.rate)


@dataclass(frozen=True)
class Verdict:
    """What the limiter decided for one request: ``code`` is None when allowed, else ``rate_limited`` or
    ``concurrency_limited`` with the seconds to wait; ``headers`` are the ``RateLimit-*`` fields to send."""

    code: str | None
    retry_after_s: int = 0
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class _KeyState:
    limits: KeyLimits
    replicas: int
    bucket: TokenBucket | None
    in_flight: int = 0


class KeyQuotas:
    """The limit state of every key at this replica (in memory; a restarted replica starts with full buckets)."""

    def __init__(self) -> None:
        self._state: dict[str, _KeyState] = {}
        self.replicas = 1

    def state(self, name: str, limits: KeyLimits, now: float) -> _KeyState:
        state = self._state.get(name)
        if state is None or state.limits != limits or state.replicas != self.replicas:
            # A new key, its limits changed by `serve deploy`, or the replicas sharing it changed: a fresh
            # bucket (its generations in flight are kept).
            bucket = None
            if limits.requests_per_minute is not None:
                burst = limits.burst or max(1, math.ceil(limits.requests_per_minute))
                capacity = max(1.0, burst / self.replicas)
                bucket = TokenBucket(rate=limits.requests_per_minute / 60.0 / self.replicas, capacity=capacity,
                                     tokens=capacity, updated=now)  # fmt: skip
            state = _KeyState(limits=limits, replicas=self.replicas, bucket=bucket,
                              in_flight=state.in_flight if state else 0)
            self._state[name] = state
        return state

    def set_replicas(self, replicas: int) -> None:
        """Re-share the limits over ``replicas`` ingress replicas (buckets are rebuilt on next use)."""
        self.replicas = max(1, replicas)

    def forget_except(self, names: set[str]) -> None:
        """Drop the state of revoked keys (those with work in flight stay until it ends)."""
        for name in [n for n, s in self._state.items() if n not in names and s.in_flight == 0]:
            del self._state[name]

    def admit(self, name: str, limits: KeyLimits, now: float, *, generation: bool, busy_retry_s: int = 1) -> Verdict:
        """Take a token (every request) and, for a generation, a concurrency slot; release the slot with
        :meth:`release`. A refused request takes nothing."""
        state = self.state(name, limits, now)
        bucket = state.bucket
        headers: dict[str, str] = {}
        if bucket is not None:
            allowed = bucket.take(now)
            headers = self._headers(state.limits, bucket)
            if not allowed:
                return Verdict("rate_limited", max(1, math.ceil(bucket.wait_s())), headers)
        cap = self.concurrency(state.limits)
        if generation and cap is not None:
            if state.in_flight >= cap:
                if bucket is not None:
                    bucket.give_back()
                    headers = self._headers(state.limits, bucket)
                return Verdict("concurrency_limited", max(1, busy_retry_s), headers)
        if generation:
            state.in_flight += 1
        return Verdict(None, 0, headers)

    def give_back(self, name: str) -> None:
        """Return the token of a request that was admitted here but then refused for another reason
        (the generator at capacity): a refusal does not use up a key's quota."""
        state = self._state.get(name)
        if state is not None and state.bucket is not None:
            state.bucket.give_back()

    def release(self, name: str) -> None:
        state = self._state.get(name)
        if state is not None and state.in_flight > 0:
            state.in_flight -= 1

    def concurrency(self, limits: KeyLimits) -> int | None:
        if limits.max_concurrent is None:
            return None
        return max(1, math.ceil(limits.max_concurrent / self.replicas))

    def _headers(self, limits: KeyLimits, bucket: TokenBucket) -> dict[str, str]:
        """``RateLimit-*`` (IETF httpapi draft): the key's limit, what is left of it (this replica's share
        scaled up to the whole key), seconds until the bucket is full, and the policy (burst; window)."""
        limit = max(1, round(bucket.capacity * self.replicas))
        window = max(1, round(bucket.capacity / bucket.rate))
        return {
            "RateLimit-Limit": str(limit),
            "RateLimit-Remaining": str(max(0, math.floor(bucket.tokens * self.replicas))),
            "RateLimit-Reset": str(math.ceil(bucket.full_in_s())),
            "RateLimit-Policy": f"{limit};w={window}",
        }
