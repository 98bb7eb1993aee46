"""Helpers of cluster/local.sh, and the local cluster's description for tests and scripts.

    python -m cluster.local token PATH            # create the cluster's auth token file (0600) if missing
    python -m cluster.local pids STATE_DIR        # the PIDs of the processes this cluster started
    python -m cluster.local kill STATE_DIR        # SIGTERM them, then SIGKILL what is left
    python -m cluster.local serve-start STATE_DIR CONFIG   # start Serve with CONFIG's http_options, host/port from STATE_DIR
    python -m cluster.local deployable STATE_DIR CONFIG --redis-port P
                                                  # the config to deploy (path printed): CONFIG, with a Redis of
                                                  # the cluster's own for jobs whose redis_url is on this machine
    python -m cluster.local wait STATE_DIR        # until every app is RUNNING and /readyz answers 200
    python -m cluster.local describe STATE_DIR    # nodes and where each replica runs

local.sh writes ``STATE_DIR/cluster.env`` (``KEY=value`` lines) when it starts a cluster;
:class:`LocalCluster` reads it back. Which processes belong to a cluster: every process whose
environment carries ``DESKGEN_CLUSTER_MARK=<the mark in STATE_DIR/mark>`` (local.sh sets it on each
``ray start`` and Ray passes its environment down to GCS, raylets, agents and workers), every
process whose command line names the cluster's Ray temp dir, and all their descendants (some Ray
processes rewrite their title, which also hides their environment). Nothing else is touched:
other Ray clusters on the machine keep running.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import os
import secrets
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import yaml

from cluster.dashboard import Dashboard

MARK_VAR = "DESKGEN_CLUSTER_MARK"


@dataclass(frozen=True)
class LocalCluster:
    """A running local cluster, as described by its ``cluster.env``."""

    state_dir: Path
    values: dict[str, str]

    @classmethod
    def load(cls, state_dir: str | Path) -> LocalCluster:
        """Read ``state_dir/cluster.env``; raises FileNotFoundError when local.sh never started one there."""
        state = Path(state_dir)
        values = {}
        for line in (state / "cluster.env").read_text().splitlines():
            if line and not line.startswith("#") and "=" in line:
                key, _, value = line.partition("=")
                values[key] = value.strip("'\"")
        return cls(state, values)

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.values['HTTP_PORT']}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.values['DASHBOARD_PORT']}"

    @property
    def gcs_address(self) -> str:
        return f"127.0.0.1:{self.values['GCS_PORT']}"

    @property
    def metrics_targets(self) -> list[str]:
        """Each node's Ray metrics export endpoint (host:port), head first: what Prometheus scrapes."""
        return self.values["METRICS_TARGETS"].split()

    @property
    def token_path(self) -> Path:
        return self.state_dir / "auth_token"

    @property
    def token(self) -> str:
        return self.token_path.read_text().strip()

    def dashboard(self) -> Dashboard:
        return Dashboard(self.dashboard_url, self.token)

    def client_env(self) -> dict[str, str]:
        """Environment for a Ray client process (serve CLI, a driver) talking to this cluster."""
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_OVERRIDE_RESOURCES")}
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(self.token_path))
        return env


# ----------------------------------------------------------------------------------------------
# Processes
# ----------------------------------------------------------------------------------------------


def _parent_pids() -> dict[int, int]:
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            # The command name (field 2) may contain spaces and parentheses: split after the last ")".
            parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    return parents


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return b""


def cluster_pids(state_dir: str | Path) -> list[int]:
    """PIDs of every live process the cluster in ``state_dir`` started (see the module docstring)."""
    state = Path(state_dir).resolve()
    mark_file = state / "mark"
    mark = mark_file.read_text().strip() if mark_file.exists() else ""
    needle_env = f"{MARK_VAR}={mark}".encode()
    needle_cmd = str(state / "ray").encode()
    parents = _parent_pids()
    roots = set()
    for pid in parents:
        environ = _read(f"/proc/{pid}/environ").split(b"\0")
        if mark and needle_env in environ:
            roots.add(pid)
            continue
        # By command line only Ray's own programs (python, raylet, gcs_server), not e.g. a `tail -f` of a log.
        argv = _read(f"/proc/{pid}/cmdline").split(b"\0")
        if needle_cmd in b" ".join(argv) and any(s in argv[0] for s in (b"python", b"raylet", b"gcs_server")):
            roots.add(pid)
    found = set(roots)
    grew = True
    while grew:
        grew = False
        for pid, parent in parents.items():
            if parent in found and pid not in found:
                found.add(pid)
                grew = True
    # Never this process or its ancestors (the shell running local.sh).
    me = os.getpid()
    while me > 1:
        found.discard(me)
        me = parents.get(me, 1)
    return sorted(found)


def kill_cluster(state_dir: str | Path, grace_s: float = 3.0) -> int:
    """SIGTERM the cluster's processes, SIGKILL those still alive after ``grace_s``; returns how many.

    Most Ray processes exit on SIGTERM at once; the GCS server and the autoscaler monitor linger
    (over 8 s measured), and a local cluster has no state worth their graceful exit."""
    pids = cluster_pids(state_dir)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace_s
    alive = pids
    while alive and time.monotonic() < deadline:
        time.sleep(0.2)
        alive = [p for p in alive if Path(f"/proc/{p}").exists() and not _is_zombie(p)]
    for pid in alive + cluster_pids(state_dir):  # and anything spawned meanwhile
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return len(pids)


def _is_zombie(pid: int) -> bool:
    stat = _read(f"/proc/{pid}/stat").decode(errors="replace")
    return bool(stat) and stat.rsplit(")", 1)[1].split()[0] == "Z"


# ----------------------------------------------------------------------------------------------
# Serve
# ----------------------------------------------------------------------------------------------


def make_token(path: Path) -> None:
    """A fresh random token (what ``ray get-auth-token --generate`` makes) unless ``path`` has one.

    The cluster gets its own token file, so it never depends on, or overwrites, ``~/.ray/auth_token``."""
    if path.exists() and path.read_text().strip():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))


def serve_start(cluster: LocalCluster, config_path: Path) -> None:
    """Start Serve on the cluster with the config's ``http_options``, bound to the local host and port.

    ``serve deploy`` cannot change HTTP options once Serve runs (it only warns), so starting Serve
    first is how the unchanged production config is deployed on a local port."""
    from deskgen.serve_config import load_serve_config

    config = load_serve_config(config_path)
    http_options = dict(config.get("http_options") or {})
    http_options.update(host=cluster.values["HTTP_HOST"], port=int(cluster.values["HTTP_PORT"]))
    os.environ.update(cluster.client_env())
    import ray
    from ray import serve

    ray.init(address=cluster.gcs_address, log_to_driver=False, logging_level=logging.WARNING)
    try:
        serve.start(http_options=http_options, proxy_location=config.get("proxy_location", "EveryNode"))
    finally:
        ray.shutdown()


def deployable(state_dir: Path, config_path: Path, redis_port: int) -> Path:
    """The config local.sh deploys, written to ``state_dir/serve_config.deploy.yaml``: ``config_path``
    unchanged, except that when its jobs' Redis is on this machine (``args.jobs.redis_url`` on a loopback
    host, as serve_config.yaml's is for ``make serve``) the cluster gets a Redis of its own, started here
    on ``redis_port`` with its data in ``state_dir/redis`` (local.sh stops it with the cluster), and the
    URL points at it: a local cluster never shares ``make serve``'s queue, and never sends Redis commands
    to another server that happens to listen on the configured port. A remote redis_url (a cluster's real
    Redis) is kept as it is."""
    from deskgen.serve_config import load_serve_config
    from deskgen.tools.redis import start as start_redis

    config = load_serve_config(config_path)
    (app,) = config["applications"]
    jobs = (app.get("args") or {}).get("jobs")
    if isinstance(jobs, dict) and _is_loopback(str(jobs.get("redis_url", ""))):
        url = urlsplit(str(jobs["redis_url"]))
        own = urlsplit(start_redis(state_dir / "redis", redis_port))
        jobs["redis_url"] = urlunsplit((url.scheme, own.netloc, url.path or "/0", url.query, ""))
    path = state_dir / "serve_config.deploy.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _is_loopback(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def wait_ready(cluster: LocalCluster, timeout_s: float) -> dict[str, Any]:
    """Poll until every application is RUNNING and ``/readyz`` answers 200.

    Raises RuntimeError at once when an application is DEPLOY_FAILED (with Serve's message) and
    TimeoutError after ``timeout_s`` (with the last statuses)."""
    deadline = time.monotonic() + timeout_s
    last: dict[str, Any] = {}
    with cluster.dashboard() as dashboard, httpx.Client(base_url=cluster.http_url, timeout=10) as http:
        while True:
            try:
                apps = dashboard.applications()
                last = {name: app["status"] for name, app in apps.items()}
                failed = {n: a.get("message", "") for n, a in apps.items() if a["status"] == "DEPLOY_FAILED"}
                if failed:
                    raise RuntimeError(f"deploy failed: {json.dumps(failed, indent=1)}")
                if apps and all(a["status"] == "RUNNING" for a in apps.values()):
                    ready = http.get("/readyz")
                    last["readyz"] = ready.status_code
                    if ready.status_code == 200:
                        return {"applications": last, "readyz": ready.json()}
            except httpx.HTTPError as exc:  # the dashboard or the proxy is still starting
                last["error"] = repr(exc)
            if time.monotonic() > deadline:
                raise TimeoutError(f"not ready after {timeout_s:.0f} s; last seen: {last}")
            time.sleep(1.0)


def describe(cluster: LocalCluster) -> str:
    """Nodes (kind, resources) and every replica's node and pid, as text."""
    with cluster.dashboard() as dashboard:
        nodes = {n.node_id: n for n in dashboard.nodes() if n.alive}
        names = {}
        lines = ["nodes:"]
        gpu_index = 0
        for node in sorted(nodes.values(), key=lambda n: (not n.is_head, n.node_id)):
            if node.is_head:
                names[node.node_id] = "head"
            else:
                gpu_index += 1
                names[node.node_id] = f"{node.kind}-{gpu_index}"
            shown = {k: v for k, v in node.resources.items() if k in ("CPU", "GPU", "cpu_node", "gpu_node")}
            lines.append(f"  {names[node.node_id]:8} {node.node_id[:12]}  {shown}")
        lines.append("replicas:")
        for app in dashboard.applications():
            for r in dashboard.replicas(app):
                where = names.get(r.node_id, r.node_id[:12] or "-")
                lines.append(f"  {app}/{r.deployment:11} {r.replica_id:10} {r.state:9} node={where:8} pid={r.pid}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("token").add_argument("path", type=Path)
    for name in ("pids", "kill", "wait", "describe"):
        p = sub.add_parser(name)
        p.add_argument("state_dir", type=Path)
        if name == "wait":
            p.add_argument("--timeout", type=float, default=300.0)
    p = sub.add_parser("serve-start")
    p.add_argument("state_dir", type=Path)
    p.add_argument("config", type=Path)
    p = sub.add_parser("deployable")
    p.add_argument("state_dir", type=Path)
    p.add_argument("config", type=Path)
    p.add_argument("--redis-port", type=int, required=True)
    args = parser.parse_args(argv)

    if args.command == "token":
        make_token(args.path)
    elif args.command == "pids":
        print(" ".join(str(p) for p in cluster_pids(args.state_dir)))
    elif args.command == "kill":
        print(f"ended {kill_cluster(args.state_dir)} processes")
    elif args.command == "serve-start":
        serve_start(LocalCluster.load(args.state_dir), args.config)
    elif args.command == "deployable":
        from deskgen.tools.redis import RedisError

        try:
            print(deployable(args.state_dir, args.config, args.redis_port))
        except RedisError as exc:
            print(f"error: the cluster's Redis (DESKGEN_CLUSTER_REDIS_PORT={args.redis_port}): {exc}", file=sys.stderr)
            return 1
    elif args.command == "wait":
        start = time.monotonic()
        try:
            result = wait_ready(LocalCluster.load(args.state_dir), args.timeout)
        except (RuntimeError, TimeoutError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        print(f"ready in {time.monotonic() - start:.1f} s: {json.dumps(result)}")
    elif args.command == "describe":
        print(describe(LocalCluster.load(args.state_dir)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
