"""The image store: delivered PNGs by image id, in one folder, bounded in size and kept for a while.

Exposures record what was shown (mix, arm, outcome) but no image bytes; the store keeps the bytes, so that
images users liked can train the service's own style LoRA (``python -m deskgen.train_lora --liked``) and,
later, so that asynchronous jobs can serve their results. Each image is ``<dir>/<id[:2]>/<id>.png``
(the PNG carries its own recipe: prompt, mix, seed), written to a temporary name and renamed, so a
reader never sees half an image.

Bounds: an image older than ``retention_s`` is removed; when the folder holds more than ``max_bytes``,
the oldest images go first until it fits. :meth:`ImageStore.sweep` enforces both from what is on disk,
so several writers (ingress replicas sharing the folder, on a cluster a shared volume like ``lora_dir``)
keep one bound between them: each writer sweeps at most every ``sweep_interval_s`` and whenever its own
writes since its last sweep pass a tenth of ``max_bytes``. Between sweeps the folder may exceed the bound
by what was written since (at most a tenth of it per writer).
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from deskgen.errors import InvalidParameter
from deskgen.limits import REQUEST_ID_PATTERN
from deskgen.paths import resolve

log = logging.getLogger(__name__)

#: Image ids are request ids (their one pattern); one starting with a dot (``..``) never names a file here.
IMAGE_ID_RE = re.compile(REQUEST_ID_PATTERN)
SUFFIX = ".png"


class ImageStoreSettings(BaseModel):
    """serve_config.yaml ``args.image_store``: where delivered images are kept, how much, how long."""

    model_config = ConfigDict(extra="forbid")

    dir: str | None = Field("build/images", description="folder (relative: under the project root); null: keep none")
    max_mb: float = Field(2048.0, gt=0, description="the folder's bound; the oldest images go first")
    retention_h: float = Field(168.0, gt=0, description="hours an image is kept")

    def build(self) -> ImageStore | None:
        if self.dir is None:
            return None
        return ImageStore(resolve(self.dir), max_bytes=int(self.max_mb * 1e6), retention_s=self.retention_h * 3600)


@dataclass(frozen=True)
class SweepReport:
    kept: int
    kept_bytes: int
    expired: int
    evicted: int


class ImageStore:
    """See the module docstring."""

    def __init__(self, folder: Path, *, max_bytes: int, retention_s: float, sweep_interval_s: float = 30.0) -> None:
        if max_bytes < 1:
            raise InvalidParameter(f"`image_store.max_mb` must be positive but gives {max_bytes} bytes.", field="image_store")
        if retention_s <= 0:
            raise InvalidParameter("`image_store.retention_h` must be positive.", field="image_store")
        self.folder = folder
        self.max_bytes = max_bytes
        self.retention_s = retention_s
        self.sweep_interval_s = sweep_interval_s
        self._lock = threading.Lock()
        self._written_since_sweep = 0
        self._last_sweep = 0.0

    def path(self, image_id: str) -> Path:
        if not IMAGE_ID_RE.fullmatch(image_id) or image_id.startswith("."):
            raise InvalidParameter(f"`image_id` {image_id!r} is not an image id.", field="image_id")
        return self.folder / image_id[:2] / f"{image_id}{SUFFIX}"

    def put(self, image_id: str, png: bytes, *, now: float | None = None) -> Path:
        """Store ``png`` under ``image_id`` (replacing a previous one), then sweep if due."""
        path = self.path(image_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.partial")
        partial.write_bytes(png)
        os.replace(partial, path)
        if now is not None:
            os.utime(path, (now, now))
        with self._lock:
            self._written_since_sweep += len(png)
            due = (time.monotonic() - self._last_sweep >= self.sweep_interval_s
                   or self._written_since_sweep * 10 >= self.max_bytes)  # fmt: skip
        if due:
            self.sweep(now=now)
        return path

    def get(self, image_id: str) -> bytes | None:
        """The PNG of ``image_id``, or None when it was never stored or is gone (expired, evicted)."""
        try:
            return self.path(image_id).read_bytes()
        except FileNotFoundError:
            return None

    def sweep(self, *, now: float | None = None) -> SweepReport:
        """Remove expired images, then the oldest until the folder fits ``max_bytes``."""
        now = time.time() if now is None else now
        with self._lock:
            self._written_since_sweep = 0
            self._last_sweep = time.monotonic()
        files: list[tuple[float, int, Path]] = []
        expired = evicted = 0
        for path in self.folder.glob(f"*/*{SUFFIX}"):
            try:
                stat = path.stat()
            except FileNotFoundError:  # another writer's sweep took it
                continue
            if now - stat.st_mtime > self.retention_s:
                path.unlink(missing_ok=True)
                expired += 1
            else:
                files.append((stat.st_mtime, stat.st_size, path))
        total = sum(size for _, size, _ in files)
        files.sort()
        while files and total > self.max_bytes:
            _, size, path = files.pop(0)
            path.unlink(missing_ok=True)
            total -= size
            evicted += 1
        if expired or evicted:
            log.info("image store %s: %d expired, %d evicted, %d kept (%.1f MB)", self.folder, expired, evicted,
                     len(files), total / 1e6)  # fmt: skip
        return SweepReport(kept=len(files), kept_bytes=total, expired=expired, evicted=evicted)

    def usage(self) -> tuple[int, int]:
        """(images, bytes) on disk now."""
        sizes = [p.stat().st_size for p in self.folder.glob(f"*/*{SUFFIX}")]
        return len(sizes), sum(sizes)
