"""deskgen/tools/redis.py: a real redis-server from the project's own files, on loopback, its data kept in
the append-only file across a restart (the jobs' queue must survive one, issue 25)."""

from __future__ import annotations

from pathlib import Path

import pytest

from deskgen.tools.redis import _ping, redis_binary, running_redis, stop

pytestmark = pytest.mark.unit


def test_a_restarted_server_keeps_its_data(tmp_path: Path) -> None:
    import redis

    assert redis_binary() is not None, "redis-server is missing: run `make system-deps`"
    with running_redis(tmp_path) as url:
        assert url.startswith("redis://127.0.0.1:")
        client = redis.Redis.from_url(url)
        client.rpush("queue", b"job-1", b"job-2")
        port = client.connection_pool.connection_kwargs["port"]
    assert not _ping(port)  # stopped
    assert (tmp_path / "appendonlydir").is_dir()
    with running_redis(tmp_path) as again:
        assert again == url  # the same port, from the folder's config
        assert redis.Redis.from_url(again).lrange("queue", 0, -1) == [b"job-1", b"job-2"]
    stop(tmp_path)  # stopping a stopped server is a no-op
