from __future__ import annotations

import os

# Tiny models run at their fastest on one thread: on 2 busy cores, torch's default thread pool
# spins and made single tiny calls 10-100x slower (measured). Set before torch is imported.
os.environ.setdefault("OMP_NUM_THREADS", "1")

from pathlib import Path

import pytest

from deskgen.paths import models_dir
from deskgen.tools.tiny import build_all, is_built


@pytest.fixture(scope="session")
def tiny_models() -> Path:
    """The tiny models folder, built on first use (the same folder `make serve` uses)."""
    out = models_dir()
    if not is_built(out):
        build_all(out)
    return out
