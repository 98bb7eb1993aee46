"""schemathesis against the live OpenAPI document of the real app: every check (`--checks all`; the
response-time check is off unless asked for), a fixed seed. The app is redeployed for the run with sizes
a CPU generates quickly (64-128 px, 1-2 steps): the document states the live limits, so the generated
requests stay within them. The session's config is restored afterwards."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from deskgen.paths import PROJECT_ROOT

from .conftest import deploy, deployment

pytestmark = pytest.mark.serve

SMALL = {"min_side": 64, "max_side": 128, "max_steps": 2}
#: schemathesis's settings for this project (the statuses valid data may meet) and its hooks (one known
#: false positive of multipart forms dropped), next to this test.
CONFIG = Path(__file__).with_name("schemathesis.toml")


def test_schemathesis_finds_no_failure(serve_app: dict[str, Any], client: httpx.Client, tmp_path: Path) -> None:
    config = copy.deepcopy(serve_app["config"])
    deployment(config, "Ingress")["user_config"].update(SMALL)
    deploy(config)
    try:
        deadline = time.monotonic() + 60
        while client.get("/v1/limits").json()["max_side"] != SMALL["max_side"]:
            assert time.monotonic() < deadline, "the small limits never applied"
            time.sleep(0.2)
        st = Path(sys.executable).with_name("st")
        run = subprocess.run(
            [str(st), "--config-file", str(CONFIG), "run", f"{serve_app['url']}/openapi.json", "--checks", "all",
             "--seed", "20261129", "--max-examples", "25", "--workers", "1", "--request-timeout", "120",
             "--report", "junit", "--report-dir", str(tmp_path)],
            capture_output=True, text=True, timeout=1200, cwd=PROJECT_ROOT,
            env=os.environ | {"SCHEMATHESIS_HOOKS": "tests.serve.schemathesis_hooks", "PYTHONPATH": str(PROJECT_ROOT)},
        )  # fmt: skip
        print(run.stdout[-6000:])
        assert run.returncode == 0, run.stdout[-20000:] + run.stderr[-4000:]
    finally:
        deploy(serve_app["config"])
        while client.get("/v1/limits").json()["max_side"] == SMALL["max_side"]:
            time.sleep(0.2)
