"""Ask the running app's replicas about themselves through Serve handles, from outside the cluster.

    python -m cluster.probe STATE_DIR generator-info [--mix MIX_ID] [--calls N]

Prints one JSON list: ``Generator.info()`` of every distinct replica that answered ``N`` calls
(routing spreads plain calls over replicas). With ``--mix`` the calls carry that multiplexed model
id, so Serve routes them as it routes a generation of that mix: to a replica holding it.

It runs as its own short-lived Ray driver (connecting to the cluster with its token), so a test
process that already runs a local Ray for another tier is never mixed up with this cluster.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from cluster.local import LocalCluster


def generator_info(cluster: LocalCluster, app: str, mix: str | None, calls: int) -> list[dict[str, Any]]:
    """``Generator.info()`` of each replica that answered, keyed by nothing: one dict per replica."""
    os.environ.update(cluster.client_env())
    import ray
    from ray import serve

    ray.init(address=cluster.gcs_address, log_to_driver=False, logging_level=logging.WARNING)
    try:
        handle = serve.get_deployment_handle("Generator", app_name=app)
        if mix is not None:
            handle = handle.options(multiplexed_model_id=mix)
        seen: dict[str, dict[str, Any]] = {}
        for _ in range(calls):
            info = handle.info.remote().result(timeout_s=30)
            seen[info["replica"]] = info
        return list(seen.values())
    finally:
        ray.shutdown()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("state_dir", type=Path)
    parser.add_argument("what", choices=["generator-info"])
    parser.add_argument("--app", default="deskgen")
    parser.add_argument("--mix", default=None, help="a canonical mix id: route like a generation of that mix")
    parser.add_argument("--calls", type=int, default=8)
    args = parser.parse_args(argv)
    infos = generator_info(LocalCluster.load(args.state_dir), args.app, args.mix, args.calls)
    print(json.dumps(infos))
    return 0


if __name__ == "__main__":
    sys.exit(main())
