"""When the client tries again, and after how long: the one retry rule both clients follow.

Retried: 429 (rate limited) and 503 (overloaded, a replica or the experiment store unavailable) — the
answers that say "not now" — and a connection that failed before the request left this machine.
Never retried: any other 4xx (the same request fails the same way), 500, 504 (the request's own
deadline), a 503 ``locator_unavailable`` (a deployment without a product locator: it will not have one
in a few seconds either), or a failure after the request was sent (it may have run).

A request sent with an ``Idempotency-Key`` may also be retried where it may have run: a failure after it
was sent, a 500 or 502 (a replica died under it), and a 409 ``idempotency_conflict`` (its first attempt
still runs). The server answers such a retry with the first attempt's answer, or runs it afresh when the
first never finished, so it cannot make a second image or exposure.

The wait is the server's ``Retry-After`` when it sent one — honoured, never shortened; when it asks for
more than ``max_retry_after_s`` the client gives up at once and raises the error (carrying
``retry_after``) rather than calling back early or sleeping longer than its caller allows. Without
``Retry-After`` the wait is exponential backoff with jitter.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from deskgen_client.errors import DeskgenConnectionError, DeskgenError, Overloaded, RateLimited


@dataclass(frozen=True)
class RetryPolicy:
    """``max_retries`` attempts after the first at most; backoff ``backoff_s * 2**n`` (n = retries so far)
    capped at ``max_backoff_s``, half of it random ("equal jitter": clients that failed together do
    not come back together); a ``Retry-After`` above ``max_retry_after_s`` is not waited for."""

    max_retries: int = 3
    backoff_s: float = 0.5
    max_backoff_s: float = 10.0
    max_retry_after_s: float = 60.0

    def __post_init__(self) -> None:
        if self.max_retries < 0:
            raise ValueError(f"`max_retries` must be >= 0 but is {self.max_retries}.")
        if not 0 <= self.backoff_s <= self.max_backoff_s:
            raise ValueError(
                f"`backoff_s` must be in [0, max_backoff_s={self.max_backoff_s}] but is {self.backoff_s}."
            )
        if self.max_retry_after_s < 0:
            raise ValueError(f"`max_retry_after_s` must be >= 0 but is {self.max_retry_after_s}.")

    def delay(self, retries_done: int, error: DeskgenError, rng: random.Random | None = None, *,
              idempotent: bool = False) -> float | None:  # fmt: skip
        """Seconds to wait before the next attempt, or ``None``: raise ``error``. ``idempotent``: the request
        carries an Idempotency-Key (see the module docstring)."""
        if retries_done >= self.max_retries or not retryable(error, idempotent=idempotent):
            return None
        if error.retry_after is not None:
            return error.retry_after if error.retry_after <= self.max_retry_after_s else None
        return self.backoff(retries_done, rng)

    def backoff(self, retries_done: int, rng: random.Random | None = None) -> float:
        ceiling = min(self.max_backoff_s, self.backoff_s * 2**retries_done)
        return ceiling / 2 + (rng or random).uniform(0, ceiling / 2)


#: 503 codes that say "never here" rather than "not now".
PERMANENT_503_CODES = frozenset({"locator_unavailable"})


def retryable(error: DeskgenError, *, idempotent: bool = False) -> bool:
    """429, 503 (but not a permanent one), or a connection that failed before anything was sent; with an
    Idempotency-Key also one that failed after, a 500, a 502 and a 409 ``idempotency_conflict``."""
    if isinstance(error, DeskgenConnectionError):
        return idempotent or not error.sent
    if idempotent and (error.status in (500, 502) or error.code == "idempotency_conflict"):
        return True
    return isinstance(error, (RateLimited, Overloaded)) and error.code not in PERMANENT_503_CODES
