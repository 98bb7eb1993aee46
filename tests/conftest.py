from __future__ import annotations

from pathlib import Path

import pytest

from deskgen.paths import models_dir
from deskgen.tiny import build_all, is_built


@pytest.fixture(scope="session")
def tiny_models() -> Path:
    """The tiny models folder, built on first use (the same folder `make serve` uses)."""
    out = models_dir()
    if not is_built(out):
        build_all(out)
    return out
