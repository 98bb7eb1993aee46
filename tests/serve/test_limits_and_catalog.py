"""One source of limits, validation before any model runs, and a LoRA catalogue that follows ``lora_dir``.

Each test that changes the app restores the session's config in ``finally``, so the tests of this tier
run in any order.
"""

from __future__ import annotations

import copy
import io
import shutil
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from deployments.ingress_models import IngressConfig
from deskgen.pngmeta import read_png_metadata
from deskgen.tools.samples import desk_scene

from .conftest import deploy, deployment, stage_stats
from .helpers import wait_until

pytestmark = pytest.mark.serve


@pytest.fixture(scope="module")
def desk_jpeg() -> bytes:
    buffer = io.BytesIO()
    desk_scene(np.random.default_rng(99), 128).save(buffer, format="JPEG")
    return buffer.getvalue()


def ingress_config(config: dict[str, Any]) -> dict[str, Any]:
    return dict(deployment(config, "Ingress")["user_config"])


def test_a_limit_raised_by_serve_deploy_holds_in_every_stage(client: httpx.Client, serve_app: dict[str, Any]) -> None:
    """The ingress's max_side is the only max_side: raising it lets the generator draw the larger image too."""
    limit = ingress_config(serve_app["config"])["max_side"]
    wide = limit + 8
    refused = client.post("/v1/text2img", json={"prompt": "desk", "steps": 1, "width": wide, "height": 64})
    assert refused.status_code == 400, refused.text
    assert refused.json()["error"]["field"] == "width" and str(limit) in refused.json()["error"]["message"]

    config = copy.deepcopy(serve_app["config"])
    deployment(config, "Ingress")["user_config"]["max_side"] = wide
    deploy(config)
    try:
        wait_until(lambda: client.get("/v1/limits").json()["max_side"] == wide, "the new max_side", timeout_s=60)
        response = client.post("/v1/text2img", json={"prompt": "desk", "steps": 1, "width": wide, "height": 64})
        assert response.status_code == 200, response.text
        assert Image.open(io.BytesIO(response.content)).size == (wide, 64)
    finally:
        deploy(serve_app["config"])
        wait_until(lambda: client.get("/v1/limits").json()["max_side"] == limit, "the original max_side", timeout_s=60)


@pytest.mark.parametrize(
    ("fields", "status", "field"),
    [
        ({"steps": "100000"}, 400, "steps"),
        ({"width": "65"}, 400, "width"),
        ({"guidance": "-1"}, 400, "guidance"),
        ({"seed": "-3"}, 400, "seed"),
        ({"colour": "red"}, 400, "colour"),
        ({"mix": "nope:1.0"}, 404, "mix"),
    ],
)
def test_a_refused_generate_request_costs_no_model_compute(
    client: httpx.Client, desk_jpeg: bytes, fields: dict[str, str], status: int, field: str
) -> None:
    before = stage_stats()
    response = client.post("/v1/generate", files={"image": ("d.jpg", desk_jpeg, "image/jpeg")}, data=fields)
    assert response.status_code == status, response.text
    assert response.json()["error"]["field"] == field
    assert stage_stats() == before  # no photo gated, none captioned, nothing generated


def test_a_lora_file_added_to_lora_dir_is_usable_without_a_restart(
    client: httpx.Client, serve_app: dict[str, Any], lora_dir: Path
) -> None:
    ttl = IngressConfig.model_validate(ingress_config(serve_app["config"])).catalog_ttl_s
    replica = client.get("/healthz").json()["replica"]
    added = lora_dir / "neon.safetensors"
    shutil.copy2(lora_dir / "dalle.safetensors", added)
    try:
        # The ingress re-lists lora_dir once its list is older than catalog_ttl_s.
        wait_until(lambda: "neon" in client.get("/v1/mixes").json()["adapters"], "neon listed", timeout_s=ttl + 30)
        response = client.post("/v1/text2img", json={"prompt": "desk", "steps": 1, "mix": "neon:0.8"})
        assert response.status_code == 200, response.text
        assert read_png_metadata(response.content)["mix_id"] == "neon:0.8"
        assert client.get("/healthz").json()["replica"] == replica  # no restart
    finally:
        added.unlink(missing_ok=True)
    wait_until(lambda: "neon" not in client.get("/v1/mixes").json()["adapters"], "neon dropped", timeout_s=ttl + 30)
    gone = client.post("/v1/text2img", json={"prompt": "desk", "steps": 1, "mix": "neon:0.8"})
    assert gone.status_code == 404 and gone.json()["error"]["field"] == "mix", gone.text
    assert "neon" in gone.json()["error"]["message"]
