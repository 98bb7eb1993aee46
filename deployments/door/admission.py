"""Admission control: shed generation requests at the door, before their body is parsed or a photo
decoded, when the generator could not take them anyway.

Each ingress replica counts the generation requests it holds (admitted, not yet answered). Serve queues
``max_queued_requests`` *per caller* and runs ``max_ongoing_requests`` per replica, so one caller among
``ingresses`` may hold at most ``max_queued + ceil(replicas * max_ongoing / ingresses)``
(:func:`caller_capacity`, read from the Serve controller): the door never admits more. Serve's router
refuses somewhat earlier in practice (it learns a replica's free slot only when the replica reports it),
and a request the door admitted but the router refused has walked the whole ingress for nothing — so the
door's ``limit`` follows the router: one less after each such refusal (503 from inside), one more after
``limit`` answers in a row while full, never above the capacity (additive increase, like TCP's window).
A door left empty by an answer starts again from the capacity: with nothing of this caller's in the
router, what a past refusal taught no longer holds, and a lowered limit would refuse a request that an
idle generator could take (a limit only climbs while full, so after a burst it would stay low for good).

The ``Retry-After`` of a refusal is a place in a virtual queue. The door measures the time between two
answers while busy (exponentially averaged) and keeps a virtual tail: each refusal moves it one interval
further, and the client is told to come back when its turn comes (whole seconds, HTTP's unit, at least 1
and at most the configured ``retry_after_s``; the tail never runs further ahead than that). Polite
clients then return about as fast as the generator frees slots instead of all at once; a door that has
room admits whoever comes, whatever the tail says.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

#: Weight of the newest observation in the moving average of the time between answers.
EWMA_ALPHA = 0.2
#: Two answers further apart than this were not in one busy period: the gap says nothing of the rate.
BUSY_GAP_S = 10.0


def caller_capacity(replicas: int, max_ongoing: int, max_queued: int, ingresses: int) -> int | None:
    """Generation requests one ingress replica may hold before the generator refuses it; None when Serve
    queues without bound (``max_queued_requests: -1``): then nothing is shed here."""
    if max_queued < 0:
        return None
    return max_queued + math.ceil(max(replicas, 0) * max_ongoing / max(ingresses, 1))


@dataclass
class AdmissionStats:
    capacity: int | None = None
    #: What the door admits now: the capacity, less what the router's refusals taught it.
    limit: int | None = None
    in_flight: int = 0
    admitted: int = 0
    shed: int = 0
    refused_inside: int = 0
    interval_s: float | None = None
    #: Seconds until the last refused request's turn (the virtual queue's length in time).
    virtual_wait_s: float = 0.0
    generator_replicas: int = 0
    ingress_replicas: int = 1


class Admission:
    """The door of one ingress replica. Unknown capacity (before the first look at the deployment, or an
    unbounded queue) admits everything."""

    def __init__(self) -> None:
        self.stats = AdmissionStats()
        self._tail = 0.0  # monotonic time of the last refused request's turn
        self._last_answer: float | None = None
        self._full_answers = 0

    def set_topology(self, *, generator_replicas: int, max_ongoing: int, max_queued: int, ingress_replicas: int) -> None:
        stats = self.stats
        stats.generator_replicas = generator_replicas
        stats.ingress_replicas = max(1, ingress_replicas)
        capacity = caller_capacity(generator_replicas, max_ongoing, max_queued, ingress_replicas)
        if capacity != stats.capacity:
            stats.capacity = capacity
            stats.limit = capacity  # a new shape: start from what it allows
        if capacity is not None and stats.limit is not None:
            stats.limit = max(1, min(stats.limit, capacity))

    def reset_limit(self) -> None:
        """Forget what the router's refusals taught (a new config: start from the capacity again)."""
        self.stats.limit = self.stats.capacity
        self._full_answers = 0

    def try_enter(self) -> bool:
        limit = self.stats.limit
        if limit is not None and self.stats.in_flight >= limit:
            self.stats.shed += 1
            return False
        self.stats.in_flight += 1
        self.stats.admitted += 1
        return True

    def leave(self, status: int, now: float) -> None:
        """A request admitted by :meth:`try_enter` is answered with ``status``."""
        stats = self.stats
        was_full = stats.limit is not None and stats.in_flight >= stats.limit
        stats.in_flight = max(0, stats.in_flight - 1)
        if status == 503 and stats.limit is not None:
            # Refused inside (the generator's router): the door let in one too many.
            stats.refused_inside += 1
            stats.limit = max(1, stats.limit - 1)
            self._full_answers = 0
            return
        if stats.in_flight == 0:
            # Empty: nothing of this caller's is queued at the router, so it has its whole capacity again.
            stats.limit = stats.capacity
            self._full_answers = 0
        if status != 200:
            return
        if self._last_answer is not None and now - self._last_answer < BUSY_GAP_S:
            gap = now - self._last_answer
            stats.interval_s = gap if stats.interval_s is None else (1 - EWMA_ALPHA) * stats.interval_s + EWMA_ALPHA * gap
        self._last_answer = now
        if was_full and stats.limit is not None and stats.capacity is not None and stats.limit < stats.capacity:
            self._full_answers += 1
            if self._full_answers >= stats.limit:
                stats.limit += 1
                self._full_answers = 0

    def retry_after_s(self, ceiling_s: int) -> int:
        """Whole seconds until a slot is likely free, between 1 and ``ceiling_s`` (no queue position taken)."""
        if self.stats.interval_s is None:
            return ceiling_s
        return max(1, min(ceiling_s, math.ceil(self.stats.interval_s)))

    def take_turn(self, ceiling_s: int, now: float) -> int:
        """A refused request's ``Retry-After``: its place in the virtual queue, in whole seconds (1..ceiling)."""
        interval = self.stats.interval_s
        if interval is None:
            return ceiling_s
        self._tail = min(max(self._tail, now) + interval, now + ceiling_s)
        wait = self._tail - now
        self.stats.virtual_wait_s = wait
        return max(1, min(ceiling_s, math.ceil(wait)))
