"""Standard Webhooks signatures (deskgen_client.webhooks), checked against the reference implementation
(the `standardwebhooks` package) when it is installed, and by their definition otherwise."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from datetime import UTC

import pytest

from deskgen_client.webhooks import WebhookVerificationError, new_secret, sign, signature, verify

pytestmark = pytest.mark.unit

BODY = json.dumps({"type": "job.completed", "data": {"id": "job_1"}}).encode()


def test_the_signature_is_the_hmac_of_id_timestamp_body() -> None:
    secret = "whsec_" + base64.b64encode(b"0123456789abcdef0123").decode()
    want = base64.b64encode(hmac.new(b"0123456789abcdef0123", b"msg_1.1700000000." + BODY, hashlib.sha256).digest())
    assert signature(secret, "msg_1", 1_700_000_000, BODY) == "v1," + want.decode()


def test_verify_accepts_its_own_signatures_and_refuses_changes() -> None:
    secret = new_secret()
    headers = sign(secret, "msg_2", BODY)
    assert verify(secret, BODY, headers) == json.loads(BODY)
    assert verify(secret, BODY, {k.upper(): v for k, v in headers.items()}) == json.loads(BODY)
    with pytest.raises(WebhookVerificationError, match="no signature matches"):
        verify(secret, BODY + b" ", headers)
    with pytest.raises(WebhookVerificationError, match="no signature matches"):
        verify(new_secret(), BODY, headers)
    with pytest.raises(WebhookVerificationError, match="tolerance"):
        verify(secret, BODY, headers, now=time.time() + 3600)
    with pytest.raises(WebhookVerificationError, match="missing"):
        verify(secret, BODY, {"webhook-id": "x"})
    rotated = {**headers, "webhook-signature": "v1,bm9wZQ== " + headers["webhook-signature"]}
    assert verify(secret, BODY, rotated) == json.loads(BODY)


def test_the_reference_implementation_agrees_both_ways() -> None:
    standardwebhooks = pytest.importorskip("standardwebhooks")
    secret = new_secret()
    reference = standardwebhooks.Webhook(secret)
    headers = sign(secret, "msg_3", BODY)
    assert reference.verify(BODY, headers) == json.loads(BODY)  # theirs accepts ours
    ts = int(time.time())
    from datetime import datetime

    theirs = reference.sign("msg_4", datetime.fromtimestamp(ts, tz=UTC), BODY.decode())
    ours = verify(secret, BODY, {"webhook-id": "msg_4", "webhook-timestamp": str(ts), "webhook-signature": theirs})
    assert ours == json.loads(BODY)
