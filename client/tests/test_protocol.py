"""The client distribution on its own: it imports nothing of the server, needs httpx and pydantic only, and
its protocol reads and writes the API's JSON. Runs with only ``deskgen-client`` installed
(``pip install './client[test]' && pytest client/tests``) and in the server's unit tier."""

from __future__ import annotations

import ast
import base64
import json
import subprocess
import sys
import typing
from importlib import metadata
from pathlib import Path

import httpx
import pytest
from pydantic import ValidationError

from deskgen_client import Deskgen, GenerateKwargs, GenerationKwargs, NotADesk
from deskgen_client.protocol import (
    FeedbackRequest,
    GenerateRequest,
    GenerationOptions,
    GenerationResult,
    Located,
    ProductLocation,
    Step,
    Text2ImgRequest,
    event_data,
    event_name,
    read_event,
)
from deskgen_client.rules import MAX_SEED, MIX_SPEC_PATTERN

pytestmark = pytest.mark.unit

PACKAGE = Path(__file__).resolve().parents[1] / "deskgen_client"
HEAVY = ("torch", "tensorflow", "keras", "ray", "diffusers", "transformers", "deskgen", "deployments", "fastapi", "starlette")


def test_the_package_imports_only_itself_httpx_pydantic_and_the_standard_library() -> None:
    allowed = {"deskgen_client", "httpx", "pydantic", "__future__"} | set(sys.stdlib_module_names)
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                assert name.split(".")[0] in allowed, f"{path.name} imports {name}"


def test_importing_the_client_and_its_cli_loads_nothing_heavy() -> None:
    code = ("import sys, deskgen_client, deskgen_client.cli, deskgen_client.protocol; "
            f"print(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r}))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out


def test_the_distribution_requires_httpx_and_pydantic_only() -> None:
    requires = [r for r in metadata.requires("deskgen-client") or [] if "extra ==" not in r]
    assert sorted(r.split(">")[0].split("=")[0].split("<")[0].strip() for r in requires) == ["httpx", "pydantic"]


def test_the_keyword_arguments_are_the_protocol_fields() -> None:
    """The client's typed keyword arguments are the request model's fields: no shape kept by hand."""
    assert set(typing.get_type_hints(GenerationKwargs)) == set(GenerationOptions.model_fields)
    assert set(typing.get_type_hints(GenerateKwargs)) == set(GenerateRequest.model_fields) - {"image_b64"}
    assert set(Text2ImgRequest.model_fields) - set(GenerationOptions.model_fields) == {"prompt"}


def test_request_models_state_and_apply_the_rules() -> None:
    assert Text2ImgRequest(prompt="a desk", mix="ott:0.7+3d:0.5", seed=0, concept="auto").mix == "ott:0.7+3d:0.5"
    for bad in ({"prompt": ""}, {"prompt": "a", "seed": -1}, {"prompt": "a", "mix": "ott 0.7"},
                {"prompt": "a", "products": ["a,b"]}, {"prompt": "a", "concept": "Not A Name"}, {"prompt": "a", "wat": 1}):  # fmt: skip
        with pytest.raises(ValidationError):
            Text2ImgRequest.model_validate(bad)
    with pytest.raises(ValidationError, match="control or format characters"):
        GenerateRequest(style="retro\u200b")
    assert GenerateRequest(style="  retro  ").style == "retro"
    with pytest.raises(ValidationError):
        FeedbackRequest.model_validate({"image_id": "img-1", "event": "love"})
    schema = GenerationOptions.model_json_schema()["properties"]
    assert schema["mix"]["pattern"] == MIX_SPEC_PATTERN and schema["seed"]["anyOf"][0]["maximum"] == MAX_SEED


def answer_json(**extra: object) -> dict[str, object]:
    png = b"\x89PNG\r\n\x1a\n" + b"\0" * 8
    located = {"status": "ok", "threshold": 0.1, "width": 64, "height": 64, "source": "prompt",
               "items": [{"product": "monitor", "found": True,
                          "instances": [{"box": [1, 2, 30, 40], "box_normalized": [0.0, 0.0, 0.5, 0.6], "score": 0.8}]},
                         {"product": "mug", "found": False, "instances": []}],
               "found_fraction": 0.5}  # fmt: skip
    return {"request_id": "rid-1", "image_b64": base64.b64encode(png).decode(), "media_type": "image/png",
            "mix": {"id": "ott:1", "name": "ott_only", "weights": {"ott": 1.0}, "source": "ab", "arm": "ott_only"},
            "timings": {"generate_s": 0.5}, "products": located, "prompt": "a desk", "negative_prompt": "",
            "seed": 1, "steps": 2, "guidance": 5.0, "width": 64, "height": 64, "metadata": {}, **extra}  # fmt: skip


def test_a_generation_answer_round_trips_and_keeps_fields_a_newer_server_adds() -> None:
    data = answer_json(queue_position=3)
    result = GenerationResult.model_validate(data)
    assert result.png.startswith(b"\x89PNG") and result.image_id == "rid-1" and result.mix.label == "ott_only (ott:1)"
    assert result.products is not None and result.products.found("Monitor") and result.products.missing == ("mug",)
    assert result.products.found_fraction == 0.5 and result.model_extra == {"queue_position": 3}
    assert json.loads(result.model_dump_json(exclude_unset=True)) == data


def test_stream_events_read_and_write_the_same_json() -> None:
    step = read_event("step", {"step": 1, "total": 2})
    assert step == Step(step=1, total=2) and event_name(step) == "step" and event_data(step) == {"step": 1, "total": 2}
    located = read_event("located", answer_json()["products"])
    assert isinstance(located, Located) and event_name(located) == "located"
    assert event_data(located) == ProductLocation.model_validate(answer_json()["products"]).model_dump(mode="json")
    done = read_event("done", answer_json())
    assert event_name(done) == "done" and event_data(done) == answer_json()
    other = read_event("queued", {"position": 3})
    assert event_name(other) == "queued" and event_data(other) == {"position": 3}


def test_the_client_reads_answers_and_errors_through_the_protocol() -> None:
    def server(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/text2img":
            assert json.loads(request.read()) == {"prompt": "a desk", "seed": 1}
            return httpx.Response(200, json=answer_json())
        error = {"error": {"code": "not_a_desk_setup", "message": "not a desk", "field": "image", "score": 0.1,
                           "threshold": 0.5}, "request_id": "rid-2"}  # fmt: skip
        return httpx.Response(422, json=error)

    http = httpx.Client(base_url="http://h", transport=httpx.MockTransport(server))
    with Deskgen("http://h", http_client=http) as client:
        assert client.text2img("a desk", seed=1).products is not None
        with pytest.raises(NotADesk) as refused:
            client.generate(b"\xff\xd8\xff" + b"\0" * 8)
    assert refused.value.score == 0.1 and refused.value.field == "image"
