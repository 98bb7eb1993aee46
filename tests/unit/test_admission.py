"""The door's arithmetic: the capacity one caller has at the generator, the limit that follows the router's
refusals, and Retry-After as a place in a virtual queue."""

from __future__ import annotations

import pytest

from deployments.door.admission import Admission, caller_capacity

pytestmark = pytest.mark.unit


def test_caller_capacity_is_its_queue_plus_its_share_of_the_running_slots() -> None:
    assert caller_capacity(replicas=1, max_ongoing=1, max_queued=2, ingresses=1) == 3
    assert caller_capacity(replicas=4, max_ongoing=2, max_queued=16, ingresses=1) == 24
    assert caller_capacity(replicas=4, max_ongoing=2, max_queued=16, ingresses=3) == 16 + 3  # ceil(8 / 3)
    assert caller_capacity(replicas=0, max_ongoing=2, max_queued=16, ingresses=1) == 16  # scaled to zero: its queue
    assert caller_capacity(replicas=2, max_ongoing=2, max_queued=-1, ingresses=1) is None  # unbounded: no shedding


def door(capacity_queued: int = 2) -> Admission:
    admission = Admission()
    admission.set_topology(generator_replicas=1, max_ongoing=1, max_queued=capacity_queued, ingress_replicas=1)
    return admission


def test_unknown_capacity_admits_everything_and_a_full_door_sheds() -> None:
    open_door = Admission()
    assert all(open_door.try_enter() for _ in range(100))
    full = door()
    assert [full.try_enter() for _ in range(5)] == [True, True, True, False, False]
    assert full.stats.shed == 2 and full.stats.in_flight == 3
    full.leave(200, now=1.0)
    assert full.try_enter() and not full.try_enter()


def test_limit_drops_after_a_refusal_inside_and_climbs_back_while_full() -> None:
    admission = door()
    for _ in range(3):
        admission.try_enter()
    admission.leave(503, now=0.0)  # the router refused one the door let in
    assert admission.stats.limit == 2 and admission.stats.refused_inside == 1
    assert admission.try_enter() is False  # 2 in flight = the new limit
    # `limit` answers in a row while full raise it by one, never above the capacity.
    now = 1.0
    for _ in range(10):
        admission.leave(200, now)
        assert admission.try_enter()
        now += 0.25
    assert admission.stats.limit == 3
    admission.reset_limit()
    assert admission.stats.limit == admission.stats.capacity == 3


def test_a_door_left_empty_starts_again_from_the_capacity() -> None:
    """After a burst the limit is low and nothing fills the door to raise it: the door, once empty, admits
    the whole capacity again rather than refusing a request an idle generator would take."""
    admission = door()
    for _ in range(3):
        admission.try_enter()
    admission.leave(503, now=0.0)
    admission.leave(200, now=0.5)
    assert admission.stats.limit == 2 and admission.stats.in_flight == 1  # still busy: the lesson holds
    admission.leave(503, now=0.75)  # a refusal that empties the door still lowers the limit
    assert admission.stats.limit == 1 and admission.stats.in_flight == 0
    admission.try_enter()
    admission.leave(200, now=1.0)  # answered, and nothing else in flight
    assert admission.stats.limit == 3
    assert [admission.try_enter() for _ in range(4)] == [True, True, True, False]


def test_retry_after_is_a_place_in_a_virtual_queue() -> None:
    admission = door()
    assert admission.take_turn(ceiling_s=5, now=0.0) == 5  # no rate measured yet: the configured wait
    for _ in range(3):
        admission.try_enter()
    for now in (1.0, 1.375):  # two answers 0.375 s apart (a binary fraction: exact sums below)
        admission.leave(200, now)
        admission.try_enter()
    assert admission.stats.interval_s == 0.375
    # Refused at once, they are told to come back one interval apart (whole seconds, at least 1, at most 5).
    waits = [admission.take_turn(ceiling_s=5, now=2.0) for _ in range(16)]
    assert waits == [1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 5, 5, 5, 5, 5, 5]
    # The tail never runs more than the ceiling ahead, and time passing shortens it.
    assert admission.take_turn(ceiling_s=5, now=4.0) == 4
    assert admission.retry_after_s(ceiling_s=5) == 1
