"""Where model files live. Relative paths are resolved against the project root, not the cwd,
so a Ray worker (whose cwd is its own) finds the same files as the shell that started it."""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent

#: Default folder of the tiny models built by ``python -m deskgen.tools.tiny``; override with DESKGEN_MODELS.
DEFAULT_MODELS_DIR = "models/tiny"


def models_dir() -> Path:
    return resolve(os.environ.get("DESKGEN_MODELS", DEFAULT_MODELS_DIR))


def resolve(path: str | os.PathLike[str]) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else PROJECT_ROOT / p


def resolve_model_id(model_id: str) -> str:
    """A hub id (``owner/name``) stays as it is unless a local folder of that relative path exists;
    anything that looks like a path is resolved against the project root."""
    local = resolve(model_id)
    if local.exists() or model_id.startswith((".", "/", "~")) or model_id.startswith("models/"):
        return str(local)
    return model_id
