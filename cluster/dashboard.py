"""A small client for the Ray dashboard's REST API: Serve status and where each replica runs.

Ray 2.60 turns token authentication on by default, so every call carries
``Authorization: Bearer <token>`` (the dashboard answers 401 without it). Only the endpoints the
cluster scripts and tests need: ``/api/serve/applications/`` (Serve's details: applications,
deployments, replicas with their node and pid) and ``/api/v0/nodes`` (the state API's nodes with
their declared resources).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx


@dataclass(frozen=True)
class NodeInfo:
    """A Ray node as the state API reports it."""

    node_id: str
    is_head: bool
    alive: bool
    resources: dict[str, float]

    @property
    def kind(self) -> str:
        """``gpu`` for a node declaring ``gpu_node``, ``cpu`` for one declaring ``cpu_node``, else ``other``."""
        if "gpu_node" in self.resources:
            return "gpu"
        if "cpu_node" in self.resources:
            return "cpu"
        return "other"


@dataclass(frozen=True)
class ReplicaInfo:
    """One Serve replica: its id (what ``X-Deskgen-Replica`` reports), state, node and worker pid."""

    deployment: str
    replica_id: str
    state: str
    node_id: str  # "" while the replica is not placed yet
    pid: int | None
    actor_id: str


class Dashboard:
    """The dashboard REST API of one cluster, authenticated with its token."""

    def __init__(self, url: str, token: str, *, timeout_s: float = 10.0) -> None:
        self.url = url.rstrip("/")
        self._client = httpx.Client(
            base_url=self.url, timeout=timeout_s, headers={"Authorization": f"Bearer {token}"}
        )

    @classmethod
    def from_token_file(cls, url: str, token_path: str | Path, **kwargs: Any) -> Dashboard:
        return cls(url, Path(token_path).read_text().strip(), **kwargs)

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> Dashboard:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def get(self, path: str, **params: Any) -> Any:
        """GET ``path`` and return its JSON; raises httpx.HTTPStatusError on a non-2xx answer."""
        response = self._client.get(path, params=params or None)
        response.raise_for_status()
        return response.json()

    # -- Serve -------------------------------------------------------------------------------------

    def serve_details(self) -> dict[str, Any]:
        """Serve's full details: ``applications``, ``proxies``, ``http_options``, ..."""
        return self.get("/api/serve/applications/")  # type: ignore[no-any-return]

    def applications(self) -> dict[str, dict[str, Any]]:
        return self.serve_details().get("applications") or {}

    def replicas(self, app: str, deployment: str | None = None) -> list[ReplicaInfo]:
        """The replicas of one deployment (or of every deployment) of ``app``, in any state."""
        application = self.applications().get(app)
        if application is None:
            return []
        out = []
        for name, d in application["deployments"].items():
            if deployment is not None and name != deployment:
                continue
            for r in d.get("replicas", []):
                out.append(
                    ReplicaInfo(
                        deployment=name,
                        replica_id=r["replica_id"],
                        state=r["state"],
                        node_id=r.get("node_id") or "",  # empty until the actor is placed
                        pid=r.get("pid"),
                        actor_id=r.get("actor_id") or "",
                    )
                )
        return out

    def running_replicas(self, app: str, deployment: str) -> list[ReplicaInfo]:
        return [r for r in self.replicas(app, deployment) if r.state == "RUNNING"]

    # -- State API ---------------------------------------------------------------------------------

    def nodes(self) -> list[NodeInfo]:
        """Every node the state API knows, alive or dead."""
        data = self.get("/api/v0/nodes", detail=1, limit=1000)
        return [
            NodeInfo(
                node_id=n["node_id"],
                is_head=bool(n.get("is_head_node")),
                alive=n.get("state") == "ALIVE",
                resources={k: float(v) for k, v in (n.get("resources_total") or {}).items()},
            )
            for n in data["data"]["result"]["result"]
        ]
