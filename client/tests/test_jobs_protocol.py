"""The jobs protocol (deskgen_client.protocol.jobs): exactly one body, a bounded batch varying one option."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from deskgen_client.protocol.jobs import MAX_BATCH, JobRequest

pytestmark = pytest.mark.unit


def test_a_job_names_one_body_and_a_bounded_batch() -> None:
    job = JobRequest.model_validate({"text2img": {"prompt": "a desk"}, "batch": {"concepts": ["monday", "tuesday"]}})
    assert job.images == 2 and job.webhook_events == ["completed"]
    assert JobRequest.model_validate({"generate": {"image_b64": "aGk="}}).images == 1
    bad = [
        ({}, "exactly one of text2img, generate"),
        ({"text2img": {"prompt": "x"}, "generate": {"image_b64": "aGk="}}, "exactly one of text2img, generate"),
        ({"generate": {}}, "generate needs image_b64"),
        ({"text2img": {"prompt": "x"}, "batch": {"seeds": [1], "mixes": ["ott_only"]}}, "exactly one of seeds, mixes"),
        ({"text2img": {"prompt": "x"}, "batch": {"seeds": list(range(MAX_BATCH + 1))}}, "at most 16 items"),
        ({"text2img": {"prompt": "x"}, "batch": {"seeds": [-1]}}, "seeds must be from 0"),
        ({"text2img": {"prompt": "x"}, "webhook_events": ["finished"]}, "'start', 'progress' or 'completed'"),
        ({"text2img": {"prompt": "x"}, "hook": "x"}, "Extra inputs are not permitted"),
    ]
    for body, message in bad:
        with pytest.raises(ValidationError, match=message):
            JobRequest.model_validate(body)
