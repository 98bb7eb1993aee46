"""A/B assignment of LoRA mixes: which arm of a split a user lands in."""

from __future__ import annotations

import hashlib
import random


def pick_arm(split: dict[str, float], user_id: str | None, salt: str) -> str:
    """An arm of ``split`` in proportion to its share: sticky per ``user_id`` (a hash of ``salt`` and the
    id, so changing the salt reshuffles users), random without one."""
    if user_id is None:
        u = random.random()
    else:
        digest = hashlib.sha256(f"{salt}:{user_id}".encode()).digest()
        u = int.from_bytes(digest[:8], "big") / 2**64
    total = sum(split.values())
    cumulative = 0.0
    for arm, share in split.items():
        cumulative += share / total
        if u < cumulative:
            return arm
    return next(reversed(split))
