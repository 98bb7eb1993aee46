"""The ingress's pure decisions: A/B arm choice, response format, error mapping."""

from __future__ import annotations

import collections
from collections.abc import Awaitable, Callable

import pytest

from deployments.http_errors import error_for
from deployments.http_io import choose_format
from deskgen.ab import pick_arm
from deskgen.errors import NotADeskSetup, UnknownMix

pytestmark = pytest.mark.unit


def test_pick_arm_is_sticky_and_proportional() -> None:
    split = {"dalle_ott": 0.7, "ott_3d": 0.3}
    arms = [pick_arm(split, f"user-{i}", "salt") for i in range(4000)]
    assert [pick_arm(split, f"user-{i}", "salt") for i in range(50)] == arms[:50]
    share = collections.Counter(arms)["dalle_ott"] / len(arms)
    assert 0.67 <= share <= 0.73
    # Another salt reshuffles users between arms but keeps the proportions.
    reshuffled = [pick_arm(split, f"user-{i}", "other") for i in range(4000)]
    assert reshuffled != arms
    assert 0.67 <= reshuffled.count("dalle_ott") / 4000 <= 0.73


def test_pick_arm_single_arm_and_unnormalised_shares() -> None:
    assert {pick_arm({"mix": 5.0}, f"u{i}", "s") for i in range(100)} == {"mix"}
    arms = [pick_arm({"a": 1, "b": 3}, f"u{i}", "s") for i in range(4000)]
    assert 0.22 <= arms.count("a") / 4000 <= 0.28


@pytest.mark.parametrize(
    ("accept", "expected"),
    [("", "png"), ("*/*", "png"), ("image/png", "png"), ("application/json", "json"),
     ("text/event-stream", "sse"), ("application/json, text/event-stream;q=0.9", "sse")],
)
def test_choose_format(accept: str, expected: str) -> None:
    assert choose_format(accept) == expected


def test_error_mapping() -> None:
    from ray.serve.exceptions import BackPressureError

    status, body, headers = error_for(NotADeskSetup("low", field="image", score=0.1, threshold=0.5), 5)
    assert status == 422 and body["error"] == {"code": "not_a_desk_setup", "message": "low", "field": "image", "score": 0.1, "threshold": 0.5}
    assert error_for(UnknownMix("x", field="mix"), 5)[0] == 404
    status, body, headers = error_for(BackPressureError(num_queued_requests=3, max_queued_requests=2), 7)
    assert status == 503 and headers == {"Retry-After": "7"} and body["error"]["code"] == "overloaded"
    assert error_for(TimeoutError(), 5)[0] == 504


def test_the_experiment_is_the_split_salt_and_arm_mixes_of_the_config() -> None:
    from deployments.ingress_models import IngressConfig

    base = IngressConfig(ab_split={"dalle_ott": 0.7, "ott_3d": 0.3})
    assert base.experiment.split == {"dalle_ott": 0.7, "ott_3d": 0.3}
    assert base.experiment.mixes == {"dalle_ott": base.mixes["dalle_ott"], "ott_3d": base.mixes["ott_3d"]}
    same = IngressConfig(ab_split={"dalle_ott": 0.7, "ott_3d": 0.3}, default_steps=4,
                         mixes=base.mixes | {"3d_only": {"3d": 0.9}})  # fmt: skip
    assert same.experiment.id == base.experiment.id  # knobs and mixes outside the split: same experiment
    changed = [
        IngressConfig(ab_split={"dalle_ott": 0.5, "ott_3d": 0.5}),
        IngressConfig(ab_split={"dalle_ott": 0.7, "ott_3d": 0.3}, ab_salt="v2"),
        IngressConfig(ab_split={"dalle_ott": 0.7, "ott_3d": 0.3}, mixes=base.mixes | {"ott_3d": {"ott": 0.6, "3d": 0.5}}),
    ]
    assert len({c.experiment.id for c in changed} | {base.experiment.id}) == 4
    # Without a split, the default mix is the experiment's only arm (its guardrails are still reported).
    assert IngressConfig(default_mix="mix").experiment.split == {"mix": 1.0}


@pytest.mark.parametrize(
    ("body", "field", "fragment"),
    [
        (b"[" * 100_000 + b"]" * 100_000, "body", "100000 levels deep"),
        (b'{"a": ' * 65 + b"1" + b"}" * 65, "body", "at most 64"),
        (b'{"prompt": "x", "prompt": "y"}', "prompt", "appears twice"),
        (b'{"prompt": "\xff\xfe"}', "body", "not valid JSON"),
        (b"[1, 2]", "body", "must be a JSON object"),
        (b"{", "body", "not valid JSON"),
    ],
)
def test_hostile_json_bodies_are_400_naming_the_rule(body: bytes, field: str, fragment: str) -> None:
    from deployments.http_io import json_object
    from deskgen.errors import InvalidParameter

    with pytest.raises(InvalidParameter) as refused:
        json_object(body)
    assert refused.value.field == field and fragment in refused.value.message


def test_nesting_is_counted_outside_strings_only() -> None:
    from deployments.http_io import json_object, max_nesting

    assert max_nesting(b'{"a": "[[[[{{{{\\"]]]", "b": [[1]]}') == 3
    assert json_object(b'{"prompt": "' + b"[" * 10_000 + b'"}') == {"prompt": "[" * 10_000}


def test_a_generation_the_router_refuses_is_sent_again_after_each_pause_then_answered() -> None:
    """Serve's router refuses requests that arrive together while a replica is still free (it counts a
    request as queued until a replica accepts it): the pipeline sends such a generation again after each
    pause, answers the last refusal (503), gives up at once when a pause would pass the deadline, and
    never repeats a call that failed for another reason."""
    import asyncio
    import time

    from ray.serve.exceptions import BackPressureError

    from deployments.pipeline import past_router

    def sender(refusals: int, other: Exception | None = None) -> tuple[list[float], Callable[[], Awaitable[str]]]:
        sent: list[float] = []

        async def send() -> str:
            sent.append(time.perf_counter())
            if other is not None:
                raise other
            if len(sent) <= refusals:
                raise BackPressureError(num_queued_requests=2, max_queued_requests=2)
            return "image"

        return sent, send

    pauses = (0.01, 0.03, 0.1)
    sent, send = sender(refusals=2)
    assert asyncio.run(past_router(send, None, pauses)) == "image"
    assert len(sent) == 3 and sent[1] - sent[0] >= 0.01 and sent[2] - sent[1] >= 0.03

    sent, send = sender(refusals=10)
    with pytest.raises(BackPressureError):
        asyncio.run(past_router(send, None, pauses))
    assert len(sent) == len(pauses) + 1

    sent, send = sender(refusals=10)
    with pytest.raises(BackPressureError):
        asyncio.run(past_router(send, time.perf_counter() + 0.005, pauses))
    assert len(sent) == 1  # the first pause would pass the deadline: answered at once

    sent, send = sender(refusals=0, other=TimeoutError())
    with pytest.raises(TimeoutError):
        asyncio.run(past_router(send, None, pauses))
    assert len(sent) == 1


def test_router_retry_pauses_are_validated() -> None:
    from pydantic import ValidationError

    from deployments.ingress_models import IngressConfig

    assert IngressConfig().router_retry_s == [0.01, 0.03, 0.1] and IngressConfig(router_retry_s=[]).router_retry_s == []
    for bad in ([0.0], [2.0], [0.01] * 9):
        with pytest.raises(ValidationError, match="router_retry_s"):
            IngressConfig(router_retry_s=bad)
