"""Webhook targets and deliveries: the allow-list check at submit, signed at-least-once delivery after.

:func:`check_target` runs when a job is submitted: the URL must be ``http``/``https`` with a host, and
every address the host resolves to must be public, unless the configured allow-list names it (a host
name, an address or a CIDR range). Loopback, private (RFC 1918, unique-local), link-local (cloud metadata
endpoints), multicast, reserved and unspecified addresses are refused by default: a webhook must not be a
way into the service's own network. The check is repeated before each delivery (a name may resolve
elsewhere later).

:func:`deliver` POSTs one event, signed as Standard Webhooks do (:mod:`deskgen_client.webhooks`), and
retries on a connection error, a timeout, 408, 429 or 5xx with exponential backoff (``base_delay_s`` x 2^n,
at most ``max_attempts`` tries and ``max_total_s`` seconds in all); any 2xx ends it; another 4xx ends it as
failed (the receiver refused it; retrying would not help). Every attempt is returned (time, status or
error, seconds) for the job's record. The ``webhook-id`` is the same on every attempt of one event, so a
receiver that got it twice can tell.
"""

from __future__ import annotations

import ipaddress
import json
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import urlsplit

from deskgen.errors import InvalidParameter
from deskgen_client.webhooks import sign

RETRY_STATUSES = frozenset({408, 429})
MAX_URL_CHARS = 2000


@dataclass(frozen=True)
class Attempt:
    at: float
    status: int | None
    error: str | None
    seconds: float


@dataclass
class Delivery:
    webhook_id: str
    event: str
    delivered: bool = False
    attempts: list[Attempt] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"webhook_id": self.webhook_id, "event": self.event, "delivered": self.delivered,
                "attempts": [asdict(a) for a in self.attempts]}  # fmt: skip


def _allowed(host: str, address: ipaddress.IPv4Address | ipaddress.IPv6Address, allow: Sequence[str]) -> bool:
    for entry in allow:
        if entry.lower() == host.lower():
            return True
        try:
            if address in ipaddress.ip_network(entry, strict=False):
                return True
        except ValueError:
            continue
    return False


def check_target(url: str, allow: Sequence[str] = (), *, resolve: Callable[[str], list[str]] | None = None,
                 field: str = "webhook") -> str:  # fmt: skip
    """``url`` if a webhook may be sent there; else InvalidParameter naming ``field`` and the rule."""
    if not isinstance(url, str) or not url or len(url) > MAX_URL_CHARS:
        raise InvalidParameter(f"`{field}` must be an http(s) URL of at most {MAX_URL_CHARS} characters.", field=field)
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidParameter(f"`{field}` must be an http:// or https:// URL with a host, not {url[:100]!r}.", field=field)
    if parts.username or parts.password:
        raise InvalidParameter(f"`{field}` must not carry credentials in the URL.", field=field)
    host = parts.hostname
    try:
        addresses = (resolve or _resolve)(host)
    except OSError as exc:
        raise InvalidParameter(f"`{field}`: the host {host!r} does not resolve ({exc}).", field=field) from None
    for text in addresses:
        address = ipaddress.ip_address(text.split("%")[0])
        public = not (address.is_loopback or address.is_private or address.is_link_local or address.is_multicast
                      or address.is_reserved or address.is_unspecified)  # fmt: skip
        if not public and not _allowed(host, address, allow):
            raise InvalidParameter(
                f"`{field}`: {host} resolves to {address}, a loopback, private or reserved address, which is not "
                "in the webhook allow-list (`webhook_allow` in the Ingress user_config).",
                field=field,
            )
    return url


def _resolve(host: str) -> list[str]:
    return sorted({str(info[4][0]) for info in socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)})


def deliver(
    url: str,
    secret: str,
    webhook_id: str,
    event: str,
    payload: dict[str, Any],
    *,
    allow: Sequence[str] = (),
    max_attempts: int = 6,
    base_delay_s: float = 1.0,
    max_total_s: float = 120.0,
    timeout_s: float = 10.0,
    sleep: Callable[[float], None] = time.sleep,
) -> Delivery:
    """Send one event until a 2xx, a final 4xx, or the attempts or time run out; see the module docstring."""
    import httpx

    body = json.dumps({"type": event, "data": payload}, sort_keys=True, separators=(",", ":")).encode()
    delivery = Delivery(webhook_id, event)
    waited = 0.0
    for attempt in range(max_attempts):
        t0 = time.monotonic()
        status: int | None = None
        error: str | None = None
        try:
            check_target(url, allow)
            headers = {"content-type": "application/json", "user-agent": "deskgen-webhooks/1",
                       **sign(secret, webhook_id, body)}  # fmt: skip
            with httpx.Client(timeout=timeout_s, follow_redirects=False) as client:
                status = client.post(url, content=body, headers=headers).status_code
        except InvalidParameter as exc:
            error = exc.message
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}"[:300]
        delivery.attempts.append(Attempt(at=time.time(), status=status, error=error, seconds=time.monotonic() - t0))
        if status is not None and 200 <= status < 300:
            delivery.delivered = True
            return delivery
        final = (error is not None and "allow-list" in error) or (
            status is not None and 400 <= status < 500 and status not in RETRY_STATUSES
        )
        delay = base_delay_s * 2**attempt
        spent = waited + sum(a.seconds for a in delivery.attempts)
        if final or attempt + 1 == max_attempts or spent + delay > max_total_s:
            return delivery
        sleep(delay)
        waited += delay
    return delivery
