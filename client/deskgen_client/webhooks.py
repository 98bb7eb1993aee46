"""Webhook signatures as Standard Webhooks defines them (https://www.standardwebhooks.com), both sides.

deskgen signs every webhook it sends with the secret of the API key that created the job; a receiver
checks it with :func:`verify` before it trusts the body::

    from deskgen_client.webhooks import verify, WebhookVerificationError

    try:
        event = verify(secret, request.body, request.headers)   # the parsed JSON body
    except WebhookVerificationError:
        return 400

Headers: ``webhook-id`` (the delivery's id, the same on every retry of one event: a receiver dedupes on
it), ``webhook-timestamp`` (Unix seconds), ``webhook-signature`` (``v1,<base64 HMAC-SHA256>`` over
``{id}.{timestamp}.{body}``, several space-separated while secrets rotate). Secrets are ``whsec_`` +
base64 of the key bytes. A timestamp more than :data:`TOLERANCE_S` from now is refused (replays).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Mapping
from typing import Any

SECRET_PREFIX = "whsec_"
TOLERANCE_S = 5 * 60


class WebhookVerificationError(ValueError):
    """The headers are missing, the timestamp is too old or too new, or no signature matches."""


def new_secret() -> str:
    """A fresh signing secret (24 random bytes), as ``whsec_<base64>``."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(24)).decode()


def _key(secret: str) -> bytes:
    try:
        return base64.b64decode(secret.removeprefix(SECRET_PREFIX), validate=True)
    except ValueError as exc:
        raise WebhookVerificationError("the secret is not whsec_ + base64") from exc


def signature(secret: str, webhook_id: str, timestamp: int, body: bytes) -> str:
    """``v1,<base64>``: HMAC-SHA256 with the secret's key over ``{id}.{timestamp}.{body}``."""
    signed = f"{webhook_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(_key(secret), signed, hashlib.sha256).digest()).decode()


def sign(secret: str, webhook_id: str, body: bytes, *, timestamp: int | None = None) -> dict[str, str]:
    """The three headers a webhook carries."""
    ts = int(time.time()) if timestamp is None else timestamp
    return {"webhook-id": webhook_id, "webhook-timestamp": str(ts),
            "webhook-signature": signature(secret, webhook_id, ts, body)}  # fmt: skip


def verify(secret: str, body: bytes, headers: Mapping[str, str], *, now: float | None = None) -> Any:
    """The webhook's JSON body if ``headers`` carry a valid signature of it by ``secret``; else
    :class:`WebhookVerificationError`. Header names are matched case-insensitively."""
    lower = {k.lower(): v for k, v in headers.items()}
    try:
        webhook_id, ts_text, signatures = (lower[h] for h in ("webhook-id", "webhook-timestamp", "webhook-signature"))
        timestamp = int(ts_text)
    except (KeyError, ValueError) as exc:
        raise WebhookVerificationError("missing or malformed webhook-id / webhook-timestamp / webhook-signature") from exc
    current = time.time() if now is None else now
    if abs(current - timestamp) > TOLERANCE_S:
        raise WebhookVerificationError(f"the timestamp is {current - timestamp:+.0f} s from now (tolerance {TOLERANCE_S} s)")
    expected = signature(secret, webhook_id, timestamp, body).encode()
    if not any(hmac.compare_digest(expected, candidate.encode()) for candidate in signatures.split()):
        raise WebhookVerificationError("no signature matches")
    return json.loads(body)
