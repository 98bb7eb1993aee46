"""Idempotency keys on POST, as the IETF draft describes them (draft-ietf-httpapi-idempotency-key-header).

A client sends ``Idempotency-Key: "<key>"`` (a Structured Field string; a bare token is accepted too) with
a POST; the server remembers, per API key and route, the key, a fingerprint of the request (a hash of
its body) and, once there is one, the answer:

* the first request with a key runs, and its answer is stored for :attr:`IdempotencyStore.retention_s`
  (24 h by default);
* a replay (same key, same body) while the first runs -> 409 ``idempotency_conflict``; after it -> the
  stored answer, unchanged (same image or job id): no second generation, no second exposure;
* the same key with another body -> 422 ``idempotency_key_reused``;
* a first request that ends with a 5xx (the service's fault, nothing delivered) releases its key, so the
  client's retry runs afresh; any other answer is kept.

The records live in Redis (shared by every ingress replica; ``SET NX`` takes a key atomically, ``EX``
expires it), scoped ``<api key or "-">`` x route x key.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any, Literal

from deskgen.errors import IdempotencyConflict, IdempotencyKeyReused, InvalidParameter

#: A key: 1-255 visible ASCII characters (the draft leaves the format to the server; UUIDs fit).
KEY_RE = re.compile(r'^[\x21\x23-\x5b\x5d-\x7e]{1,255}$')
DEFAULT_RETENTION_S = 24 * 3600
#: How long a key stays "running" without an answer before another request may take it: the ingress renews
#: it while the request runs (:meth:`IdempotencyStore.renew`), so a replica that died mid-request releases
#: its keys within this long.
DEFAULT_LEASE_S = 30
PREFIX = "deskgen:idem:"


def parse_key(header: str | None) -> str | None:
    """The key of an ``Idempotency-Key`` header (a Structured Field string, or a bare token), None when
    absent; InvalidParameter naming the header when malformed."""
    if header is None:
        return None
    value = header.strip()
    if len(value) >= 2 and value[0] == value[-1] == '"':
        value = value[1:-1]
    if not KEY_RE.fullmatch(value):
        raise InvalidParameter(
            "`Idempotency-Key` must be a quoted string of 1-255 visible ASCII characters (no quote or "
            'backslash), e.g. Idempotency-Key: "8e03978e-40d5-43e8-bc93-6894a57f9324".',
            field="Idempotency-Key",
        )
    return value


def fingerprint(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


@dataclass(frozen=True)
class StoredAnswer:
    """What a replay returns: the first answer's status, headers (those that describe it) and body."""

    status: int
    headers: dict[str, str]
    body: bytes

    def to_json(self) -> str:
        return json.dumps({"status": self.status, "headers": self.headers, "body": self.body.hex()})

    @classmethod
    def from_json(cls, text: str) -> StoredAnswer:
        data = json.loads(text)
        return cls(int(data["status"]), dict(data["headers"]), bytes.fromhex(data["body"]))


@dataclass(frozen=True)
class Claim:
    """The outcome of :meth:`IdempotencyStore.claim`: run the request (``new``) or answer with ``answer``."""

    state: Literal["new", "replay"]
    answer: StoredAnswer | None = None


class IdempotencyStore:
    """See the module docstring. ``redis`` is a ``redis.Redis`` client (synchronous; call from a thread)."""

    def __init__(self, redis: Any, *, retention_s: float = DEFAULT_RETENTION_S, lease_s: float = DEFAULT_LEASE_S) -> None:
        self.redis = redis
        self.retention_s = int(retention_s)
        self.lease_s = int(lease_s)

    @staticmethod
    def _name(scope: str, route: str, key: str) -> str:
        return f"{PREFIX}{scope}:{route}:{key}"

    def claim(self, scope: str, route: str, key: str, body: bytes) -> Claim:
        """Take ``key`` for this request, or say what to answer instead (raises 409 / 422 errors)."""
        name = self._name(scope, route, key)
        record = json.dumps({"fingerprint": fingerprint(body), "state": "running"})
        if self.redis.set(name, record, nx=True, ex=self.lease_s):
            return Claim("new")
        raw = self.redis.get(name)
        if raw is None:  # expired between the two calls: take it now
            return self.claim(scope, route, key, body)
        stored = json.loads(raw)
        if stored["fingerprint"] != fingerprint(body):
            raise IdempotencyKeyReused(
                f"`Idempotency-Key` {key!r} was used with another request body; use a new key for a new request.",
                field="Idempotency-Key",
            )
        if stored["state"] == "running":
            raise IdempotencyConflict(
                f"`Idempotency-Key` {key!r}: the first request with this key is still running; retry later.",
                field="Idempotency-Key",
            )
        return Claim("replay", StoredAnswer.from_json(stored["answer"]))

    def complete(self, scope: str, route: str, key: str, body: bytes, answer: StoredAnswer) -> None:
        """Store the first request's answer for the retention; a 5xx releases the key instead."""
        name = self._name(scope, route, key)
        if answer.status >= 500:
            self.redis.delete(name)
            return
        record = json.dumps({"fingerprint": fingerprint(body), "state": "done", "answer": answer.to_json()})
        self.redis.set(name, record, ex=self.retention_s)

    def renew(self, scope: str, route: str, key: str) -> None:
        """Keep a running key's lease (called while its request runs)."""
        name = self._name(scope, route, key)
        raw = self.redis.get(name)
        if raw is not None and json.loads(raw)["state"] == "running":
            self.redis.expire(name, self.lease_s)

    def release(self, scope: str, route: str, key: str) -> None:
        """Forget ``key`` (the request failed before it had an answer to keep)."""
        self.redis.delete(self._name(scope, route, key))
