"""cluster.local.deployable: what cluster/local.sh deploys. A config whose jobs' Redis is on this machine
(serve_config.yaml's, for `make serve`) gets a Redis of the cluster's own; nothing else changes. Before,
the local cluster deployed serve_config.yaml's redis_url as it was, a port that the cluster's own GCS may
hold: the jobs then spoke Redis to another server."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from cluster.local import deployable
from deskgen.serve_config import load_serve_config
from deskgen.tools.redis import _ping, free_port, stop

pytestmark = pytest.mark.unit


def write(tmp_path: Path, config: dict[str, Any]) -> Path:
    path = tmp_path / "in.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def jobs_of(config: dict[str, Any]) -> Any:
    return config["applications"][0]["args"]["jobs"]


def test_a_local_redis_url_gets_the_clusters_own_redis(tmp_path: Path) -> None:
    config = load_serve_config()
    assert jobs_of(config)["redis_url"].startswith("redis://127.0.0.1:")  # the premise: make serve's Redis
    jobs_of(config)["redis_url"] = "redis://localhost:6380/3"
    state = tmp_path / "state"
    state.mkdir()
    port = free_port()
    try:
        out = deployable(state, write(tmp_path, config), port)
        assert out == state / "serve_config.deploy.yaml"
        deployed = yaml.safe_load(out.read_text())
        assert jobs_of(deployed)["redis_url"] == f"redis://127.0.0.1:{port}/3"  # the database index kept
        assert _ping(port)
        assert (state / "redis" / "redis.conf").is_file()
        expected = copy.deepcopy(config)
        jobs_of(expected)["redis_url"] = jobs_of(deployed)["redis_url"]
        assert deployed == expected  # nothing else changed
    finally:
        stop(state / "redis")
    assert not _ping(port)


@pytest.mark.parametrize("jobs", [{"redis_url": "redis://:secret@redis.deskgen.svc:6379/0"}, None])
def test_a_remote_redis_or_no_jobs_is_deployed_as_it_is(tmp_path: Path, jobs: dict[str, Any] | None) -> None:
    config = load_serve_config()
    config["applications"][0]["args"]["jobs"] = jobs
    out = deployable(tmp_path, write(tmp_path, config), free_port())
    assert yaml.safe_load(out.read_text()) == config
    assert not (tmp_path / "redis").exists()
