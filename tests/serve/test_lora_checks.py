"""A LoRA file that cannot be loaded, in the app's ``lora_dir`` (issue 14, point 3): listed unavailable with
its reason in ``/v1/mixes``, a request naming it a 422 naming adapter and reason, every other mix 200, the
generator replica unaffected. The files are removed afterwards, so the other tests see the usual folder."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from deskgen.pngmeta import read_png_metadata
from deskgen.tools.tiny_sdxl import write_lora_variant
from deskgen_client import Deskgen

from .conftest import generator_info

pytestmark = pytest.mark.serve

#: Longer than the ingress's catalog_ttl_s (5 s): the catalogue re-reads lora_dir at most that often.
WAIT_S = 40


def wait_until(predicate: Any, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not within {WAIT_S} s")
        time.sleep(0.2)


@pytest.fixture()
def bad_files(lora_dir: Path, tiny_models: Path, client: httpx.Client) -> Iterator[dict[str, Path]]:
    """``broken`` (DoRA: the ingress's header check refuses it) and ``offmodel`` (a layer the model lacks:
    only a replica can tell) in the app's lora_dir, removed afterwards."""
    files = {
        "broken": write_lora_variant("dora", tiny_models / "loras", lora_dir / "broken.safetensors"),
        "offmodel": write_lora_variant("extra_layer", tiny_models / "loras", lora_dir / "offmodel.safetensors"),
    }
    try:
        yield files
    finally:
        for path in files.values():
            path.unlink(missing_ok=True)
        wait_until(lambda: not {"broken", "offmodel"} & set(client.get("/v1/mixes").json()["unavailable"]),
                   "bad files dropped")  # fmt: skip


def test_a_bad_lora_file_is_listed_refused_with_422_and_harms_no_other_mix(
    client: httpx.Client, bad_files: dict[str, Path]
) -> None:
    health_before = client.get("/readyz").json()
    replica = generator_info()["replica"]
    wait_until(lambda: "broken" in client.get("/v1/mixes").json()["unavailable"], "broken listed unavailable")
    mixes = client.get("/v1/mixes").json()
    assert mixes["unavailable"]["broken"].startswith("a DoRA file (")
    assert "broken" not in mixes["adapters"] and {"3d", "dalle", "ott"} <= set(mixes["adapters"])
    with Deskgen(str(client.base_url)) as dg:  # the Python client reads it too
        assert dg.mixes().unavailable["broken"] == mixes["unavailable"]["broken"]

    # Named by an ad-hoc mix, alone or with good adapters: 422 naming the adapter and the reason.
    for mix in ("broken:0.8", "ott:0.5+broken:1"):
        response = client.post("/v1/text2img", json={"prompt": "a desk", "steps": 1, "mix": mix})
        assert response.status_code == 422, response.text
        error = response.json()["error"]
        assert (error["code"], error["field"], error["adapter"]) == ("adapter_unavailable", "mix", "broken")
        assert error["reason"] == mixes["unavailable"]["broken"]
        assert error["message"].startswith("`mix`: adapter 'broken' is unavailable: a DoRA file")

    # A file only a replica can judge (its keys name a layer the model lacks): the replica checks new files
    # in the background, so it is listed before any request names it; a request gets the same 422.
    wait_until(lambda: "offmodel" in client.get("/v1/mixes").json()["unavailable"], "offmodel listed unavailable")
    response = client.post("/v1/text2img", json={"prompt": "a desk", "steps": 1, "mix": "offmodel:1"})
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert (error["code"], error["adapter"]) == ("adapter_unavailable", "offmodel")
    assert error["reason"].startswith("only 152 of its 153 layers match this model")
    info = generator_info()
    assert info["unavailable"]["offmodel"] == error["reason"] and "broken" in info["unavailable"]
    # The ingress learns the replica's verdict in the background and lists it too.
    wait_until(lambda: "offmodel" in client.get("/v1/mixes").json()["unavailable"], "offmodel listed unavailable")
    assert client.get("/v1/mixes").json()["unavailable"]["offmodel"] == error["reason"]
    assert "offmodel" not in client.get("/v1/mixes").json()["adapters"]

    # Every other mix keeps working, on the same replica, which stays healthy.
    ok = client.post("/v1/text2img", json={"prompt": "a desk", "steps": 1, "mix": "ott_only", "seed": 3})
    assert ok.status_code == 200, ok.text
    assert read_png_metadata(ok.content)["mix_id"] == "ott:1.0"
    assert generator_info()["replica"] == replica
    assert client.get("/readyz").json()["stages"] == health_before["stages"]


def test_a_wider_lora_added_later_is_served_without_a_restart(
    client: httpx.Client, lora_dir: Path, tiny_models: Path
) -> None:
    """Issue 24, part 2: a file added while the app runs, with twice the rank of every adapter and layers
    none of them adapts, is listed and generates (every mix fused: no slots to outgrow), on the same
    replica: no base load, no restart."""
    before = generator_info()
    path = write_lora_variant("wider", tiny_models / "loras", lora_dir / "wider.safetensors")
    try:
        wait_until(lambda: "wider" in client.get("/v1/mixes").json()["adapters"], "wider listed")
        assert "wider" not in client.get("/v1/mixes").json()["unavailable"]
        response = client.post("/v1/text2img", json={"prompt": "a desk", "steps": 1, "mix": "wider:0.8+ott:0.4"})
        assert response.status_code == 200, response.text
        assert read_png_metadata(response.content)["mix_id"] == "ott:0.4+wider:0.8"
        after = generator_info()
        assert (after["replica"], after["base_loads"]) == (before["replica"], before["base_loads"])
        assert "wider" in after["loaded_adapters"]
    finally:
        path.unlink(missing_ok=True)
        wait_until(lambda: "wider" not in client.get("/v1/mixes").json()["adapters"], "wider dropped")
