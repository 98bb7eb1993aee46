"""Reading serve_config.yaml, the production source of truth: every reader goes through this module (the
serve and cluster test tiers, the benchmarks, the cluster renderer and launcher). The tools that deploy
variants of it change a few fields and keep the rest."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from deskgen.paths import PROJECT_ROOT

SERVE_CONFIG = PROJECT_ROOT / "serve_config.yaml"


def read_serve_config(path: Path = SERVE_CONFIG) -> tuple[str, dict[str, Any]]:
    """The config's text (the cluster renderer embeds it verbatim) and its parsed form."""
    text = path.read_text()
    return text, yaml.safe_load(text)


def load_serve_config(path: Path = SERVE_CONFIG) -> dict[str, Any]:
    """The config as plain data (a fresh copy each call)."""
    return read_serve_config(path)[1]


def app_args(config: dict[str, Any]) -> dict[str, Any]:
    """The ``args`` of the (single) application: what ``graph:app`` is built with."""
    (app,) = config["applications"]
    return dict(app.get("args") or {})


def deployment_config(config: dict[str, Any], name: str) -> dict[str, Any]:
    """The ``deployments`` entry called ``name`` of the (single) application; KeyError if absent."""
    (app,) = config["applications"]
    for deployment in app["deployments"]:
        if deployment["name"] == name:
            return deployment  # type: ignore[no-any-return]
    raise KeyError(f"no deployment {name!r} in the config")


def with_models(config: dict[str, Any], models: Path, **args: Any) -> dict[str, Any]:
    """A copy of ``config`` whose app ``args`` point at the model folder ``models`` (the layout
    ``python -m deskgen.tools.tiny`` writes); ``args`` override single entries."""
    config = copy.deepcopy(config)
    (app,) = config["applications"]
    app["args"] = {
        **app.get("args", {}),
        "classifier_model": str(models / "classifier" / "desk_gate.keras"),
        "captioner_model": str(models / "blip"),
        "generator_model": str(models / "sdxl"),
        "lora_dir": str(models / "loras"),
        "locator_model": str(models / "owlv2"),
        **args,
    }
    return config


def without_jobs(config: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``config`` with no jobs (``args.jobs: null``, no JobConsumer deployment): for runs that
    start no Redis (the benchmarks of the synchronous routes)."""
    config = copy.deepcopy(config)
    (app,) = config["applications"]
    app["args"] = {**app.get("args", {}), "jobs": None}
    app["deployments"] = [d for d in app["deployments"] if d["name"] != "JobConsumer"]
    return config
