from __future__ import annotations

import os

# Tiny models run at their fastest on one thread: on 2 busy cores, torch's default thread pool
# spins and made single tiny calls 10-100x slower (measured). Set before torch is imported.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# MKL's results may depend on a buffer's memory alignment on AVX-512 CPUs (measured here: a LoRA-wrapped
# UNet, base weights untouched, gave a base image one grey level off in one pixel). Tests that compare
# images bit for bit need MKL's conditional numerical reproducibility; set before torch loads MKL.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

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
